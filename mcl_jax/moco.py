"""Self-supervised MCL on MoCo (docs/SPEC.md 2.3): the state, the step, the task.

`build_task(setup)` makes the MoCo task that `loop.fit` drives (the contract is in
`mcl_jax.loop`; docs/MOCO.md is the user guide). Each of the M members has a query encoder
(trained) and a key encoder (an EMA of it, momentum `moco.key_momentum`, never
differentiated); the M query encoders are one `models.Cohort` over stacked variables
(without the supervised projection head, `head='none'`), and so are the M key encoders.
MoCo's projection (`moco.mlp`): False, the backbone's classifier IS the d-dimensional
output (official `base_encoder(num_classes=dim)`; also what the official "v2" runs
trained, their `--mlp` being a no-op); True, an MLP Dense(F, F) - ReLU - Dense(F, d) whose
first layer is the classifier and whose second is stored per member under
`params['members']['mlp']`. Export takes member m's query backbone (trunk + branch +
classifier) without the MLP's second layer, the key encoder or the queue.

Queues: one FIFO queue per member, `queues` [M, K, d], replicated on every device (each
device scores its share of the queries against every queue, so it needs them whole); after
each step every member enqueues the keys of the whole global batch at `queue_ptr` (one
pointer for all; `K % global batch == 0` is validated, so a batch never wraps).
The two views come from `mcl_jax.data.views` (`ssl.views` names the recipe).

Shuffle-BN (`moco.shuffle_bn`, default on as the official code; docs/MOCO.md): the official
code trains with DistributedDataParallel and no SyncBN, so BN in BOTH encoders normalises
over one GPU's share of the batch, and the key encoder's input is first shuffled across GPUs
(`_batch_shuffle_ddp`) and its keys unshuffled after (`_batch_unshuffle_ddp`), so a query
and its positive key never share batch statistics. Here the global batch is cut into G
groups of `moco.bn_group_size` consecutive images (the per-GPU batch; 0: one group per
device), each normalised with its own statistics (`apply_in_groups`: a vmap of the encoders
over the groups); the keys are computed from a permutation of the batch drawn from the
state's rng each step and put back in the original order. Off, BN runs over the global batch
in both encoders. Running statistics: the mean over the groups of each group's update (the
official keeps one copy per GPU and checkpoints GPU 0's).

Order within a step (official `MoCo.forward`): momentum update of the key encoders from
the current (pre-step) query encoders, keys from the updated key encoders, the loss, the
SGD step of the query encoders, then the enqueue.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mcl_jax import knn
from mcl_jax import loop
from mcl_jax import losses
from mcl_jax import metrics as metrics_lib
from mcl_jax import models
from mcl_jax import numerics
from mcl_jax import regimes
from mcl_jax import sharding as sharding_lib
from mcl_jax import train_state
from mcl_jax.data import protocol as data_protocol
from mcl_jax.data import views as data_views
from mcl_jax.errors import ConfigError
from mcl_jax.models import layers

Array = jax.Array


class MocoState(flax.struct.PyTreeNode):
  """Everything a MoCo-MCL run resumes from (all replicated)."""

  step: jax.Array
  params: Any  # query encoders: {'trunk'?, 'members': {'backbone', 'mlp'?}}
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key: checkpoints as a plain array.
  key_params: Any  # key encoders: same structure as params, EMA of them.
  key_batch_stats: Any
  queues: jax.Array  # [M, K, d] float32, L2-normalised rows.
  queue_ptr: jax.Array  # int32 scalar: where the next global batch of keys goes.


# ----------------------------------------------------------------------------- encoders


def feature_width(arch: str, image_shape: tuple[int, ...]) -> int:
  """F, the pooled feature width of `arch` (no real init)."""
  net = models.create(arch, 1)
  (_, features), _ = jax.eval_shape(
    lambda: net.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), False)
  )
  return int(features.shape[-1])


class MocoEncoders:
  """M MoCo encoders (query or key: same functions, other variables) on one Cohort.

  The Cohort has no projection head of its own (`head='none'`): MoCo's projection is the
  backbone's classifier (Dense(F, d), or the MLP's Dense(F, F)) plus, for the MLP, a second
  layer stored per member. Variables: {'params': {'trunk'?, 'members': {'backbone', 'mlp'?
  (kernel [M, F, d], bias [M, d])}}, 'batch_stats': {...}}. `apply` returns the
  L2-normalised embeddings [M, B, d], the pooled backbone features [M, B, F] (what a
  linear probe and the kNN monitor see) and, when training, the new batch statistics.
  """

  def __init__(self, cohort: models.Cohort, image_shape: tuple[int, ...], *, dim: int, mlp: bool):
    if cohort.head != "none":
      raise ValueError(
        f"MoCo's encoders project with their classifier; the Cohort must "
        f"have head='none', not {cohort.head!r}."
      )
    self.cohort, self.dim, self.mlp = cohort, dim, mlp
    self.image_shape = tuple(image_shape)

  @property
  def num_members(self) -> int:
    return self.cohort.num_members

  def init(self, rng: Array) -> dict[str, Any]:
    cohort_rng, mlp_rng = jax.random.split(rng)
    x = jnp.zeros((1, *self.image_shape), jnp.float32)
    variables = self.cohort.init(cohort_rng, x, train=False)
    params = {**variables["params"], "members": dict(variables["params"]["members"])}
    if self.mlp:
      width = self.cohort.num_classes  # the classifier is the MLP's Dense(F, F)
      dense = layers.linear(self.dim, width, dtype=jnp.float32, name="mlp")
      keys = jax.random.split(mlp_rng, self.num_members)
      params["members"]["mlp"] = jax.vmap(lambda k: dense.init(k, jnp.zeros((1, width)))["params"])(
        keys
      )
    return {"params": params, "batch_stats": variables.get("batch_stats", {})}

  def apply(
    self, variables: dict[str, Any], images: Array, train: bool
  ) -> tuple[Array, Array, Any]:
    """(embeddings [M, B, d] L2-normalised, features [M, B, F], new batch_stats or None)."""
    return self.apply_with_hidden(variables, images, train)[:3]

  def apply_with_hidden(
    self, variables: dict[str, Any], images: Array, train: bool
  ) -> tuple[Array, Array, Any, Array | None]:
    """`apply`, plus the MLP head's pre-ReLU hidden layer [M, B, F] (None without MLP):
    what `metrics.embedding_health` counts dead units of."""
    params = dict(variables["params"])
    params["members"] = {k: v for k, v in params["members"].items() if k != "mlp"}
    cohort_vars = {"params": params, "batch_stats": variables["batch_stats"]}
    new_stats = None
    if train:
      out, mutated = self.cohort.apply(cohort_vars, images, train=True, mutable=["batch_stats"])
      new_stats = mutated["batch_stats"]
    else:
      out = self.cohort.apply(cohort_vars, images, train=False)
    z = out["logits"]  # [M, B, num_classes]: d (linear head) or F (the MLP's hidden layer)
    mlp = variables["params"]["members"].get("mlp")
    hidden = None
    if mlp is not None:
      hidden = z
      z = jnp.einsum("mbf,mfd->mbd", jax.nn.relu(z), mlp["kernel"]) + mlp["bias"][:, None]
    return numerics.l2_normalize(z), out["features"], new_stats, hidden


def apply_in_groups(
  encoders: MocoEncoders, variables: dict[str, Any], images: Array, num_groups: int
) -> tuple[Array, Array, Any, Array | None]:
  """`encoders.apply_with_hidden` in training mode with BN statistics per group of
  B / num_groups consecutive images (official: per GPU), outputs back in batch order
  (`layers.apply_in_bn_groups`; running statistics: the mean over the groups of each
  group's update). One group is plain global BN.
  """

  def apply(x):
    z, features, stats, hidden = encoders.apply_with_hidden(variables, x, train=True)
    return (z, features, hidden), stats

  (z, features, hidden), stats = layers.apply_in_bn_groups(apply, images, num_groups)
  return z, features, stats, hidden


def num_bn_groups(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """G, the shuffle-BN groups of a global batch (0: shuffle-BN off, global BN).

  `moco.bn_group_size` images per group, 0 meaning one group per device; a group size at
  least the global batch gives one group (validated: config_lib).
  """
  if not config.moco.shuffle_bn:
    return 0
  batch, size = config.input.global_batch_size, config.moco.bn_group_size
  return num_devices if size == 0 else layers.num_bn_groups(batch, size)


def build_encoders(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> MocoEncoders:
  """The query/key encoders of `config` (moco.mlp False: linear head, True: MLP head)."""
  dim, mlp = config.model.embed_dim, bool(config.moco.mlp)
  num_classes = feature_width(config.model.arch, image_shape) if mlp else dim
  cohort = models.Cohort(
    arch=config.model.arch,
    num_classes=num_classes,
    num_members=config.cohort.num_members,
    shared_stages=config.model.shared_stages,
    embed_dim=dim,
    strategy=config.model.strategy,
    head="none",
    dtype=train_state.compute_dtype(config),
  )
  return MocoEncoders(cohort, image_shape, dim=dim, mlp=mlp)


def init_queues(rng: Array, num_members: int, size: int, dim: int) -> Array:
  """[M, K, d] L2-normalised Gaussian rows (official `randn(M, dim, K)` normalised over dim)."""
  return numerics.l2_normalize(jax.random.normal(rng, (num_members, size, dim), jnp.float32))


def state_init(
  encoders: MocoEncoders, tx: optax.GradientTransformation, queue_size: int
) -> Callable[[Array], MocoState]:
  """rng -> the initial state (pure: what `create_state` compiles and `abstract_state`
  traces); key encoders start as copies of the queries."""

  def init(rng):
    enc_rng, queue_rng, state_rng = jax.random.split(rng, 3)
    variables = encoders.init(enc_rng)
    params, stats = variables["params"], variables["batch_stats"]
    return MocoState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=stats,
      opt_state=tx.init(params),
      rng=state_rng,
      key_params=jax.tree.map(jnp.copy, params),
      key_batch_stats=jax.tree.map(jnp.copy, stats),
      queues=init_queues(queue_rng, encoders.num_members, queue_size, encoders.dim),
      queue_ptr=jnp.zeros((), jnp.int32),
    )

  return init


def create_state(
  encoders: MocoEncoders,
  tx: optax.GradientTransformation,
  rng: Array,
  mesh: jax.sharding.Mesh,
  *,
  queue_size: int,
) -> MocoState:
  """The state, created already replicated (`train_state.initialise`)."""
  init = state_init(encoders, tx, queue_size)
  abstract = jax.eval_shape(init, rng)
  shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), abstract)
  return train_state.initialise(init, rng, shardings)


# ----------------------------------------------------------------------------- the step


def momentum_update(key_params: Any, params: Any, momentum: float) -> Any:
  """k <- m k + (1 - m) q for every parameter (official `_momentum_update_key_encoder`)."""
  return jax.tree.map(lambda k, q: momentum * k + (1.0 - momentum) * q, key_params, params)


def compute_keys(
  encoders: MocoEncoders,
  key_variables: dict[str, Any],
  images: Array,
  *,
  shuffle_bn_groups: int = 0,
  shuffle_rng: Array | None = None,
) -> tuple[Array, Any]:
  """Keys [M, B, d] of the key encoders (train-mode BN, as the official), no gradient.

  shuffle_bn_groups = 0: BN over the whole batch. G > 0: shuffle-BN, the official
  `_batch_shuffle_ddp` / `_batch_unshuffle_ddp` with G GPUs: the keys of images[perm]
  (perm a permutation drawn from `shuffle_rng`) with BN per group of B / G consecutive
  shuffled images, put back in the order of `images`.
  """
  if not shuffle_bn_groups:
    k, _, stats = encoders.apply(key_variables, images, train=True)
    return jax.lax.stop_gradient(k), stats
  if shuffle_rng is None:
    raise ValueError(f"shuffle_bn_groups={shuffle_bn_groups} needs a shuffle_rng.")
  perm = jax.random.permutation(shuffle_rng, images.shape[0])
  k, _, stats, _ = apply_in_groups(encoders, key_variables, images[perm], shuffle_bn_groups)
  return jax.lax.stop_gradient(k[:, jnp.argsort(perm)]), stats


def enqueue(queues: Array, ptr: Array, keys: Array) -> tuple[Array, Array]:
  """Writes keys [M, B, d] at rows [ptr, ptr + B) of every queue; returns (queues, new ptr)."""
  queues = jax.lax.dynamic_update_slice(
    queues, keys.astype(queues.dtype), (jnp.zeros((), ptr.dtype), ptr, jnp.zeros((), ptr.dtype))
  )
  return queues, (ptr + keys.shape[1]) % queues.shape[1]


def moco_loss(
  params: Any,
  batch_stats: Any,
  images: Array,
  keys: Array,
  queues: Array,
  *,
  encoders: MocoEncoders,
  loss_cfg: ml_collections.ConfigDict,
  soft_scale: Array | float = 1.0,
  interactive_scale: Array | float = 1.0,
  bn_groups: int = 0,
  icl_keys: str = "queue",
) -> tuple[Array, tuple[dict[str, Array], Any, Array]]:
  """docs/SPEC.md 2.3 total: weighted VCL + ICL + SoftVCL + SoftICL of the queries of
  `images` (+ CO2 with `loss.co2_weight`).

  `soft_scale` multiplies the soft terms' weights (`losses.soft_term_ramp`),
  `interactive_scale` the ICL and Soft ICL weights (`losses.interactive_term_ramp`).
  `bn_groups` G > 1: BN per group of B / G consecutive images (shuffle-BN's query side).
  `icl_keys` (`config.moco.icl_keys`): what ICL contrasts a member's queries with, the
  other member's key and queue ("queue", the paper's) or its keys of this batch ("batch",
  `losses.batch_icl_logits`).

  Returns (loss, (metrics, new query batch_stats, queries)). Per-member metrics: `ce`
  (the member's own InfoNCE, CE(logits_aa, 0)), `instance_accuracy` (how often the
  positive key outscores all K queue keys) and the collapse signals of
  `metrics.cohort_health` (of the queries; chance of `ce`: log(1 + K)).
  """
  q, _, new_stats, hidden = apply_in_groups(
    encoders, {"params": params, "batch_stats": batch_stats}, images, bn_groups
  )
  terms = losses.moco_mcl(
    q, keys, queues, tau=loss_cfg.tau, kd_temperature=loss_cfg.kd_temperature, icl_keys=icl_keys
  )
  total = losses.weighted_mcl(terms, loss_cfg, soft_scale, interactive_scale=interactive_scale)
  metrics = dict(terms)
  if loss_cfg.co2_weight:
    metrics["co2"] = losses.co2(
      q, keys, queues, temperature=loss_cfg.co2_temperature, cross=loss_cfg.co2_cross
    )
    total = total + loss_cfg.co2_weight * metrics["co2"]
  metrics["loss"] = total
  # Per member, from the detached queries: logits_aa = [q_a . k_a, q_a Q_a^T] / tau.
  qs = jax.lax.stop_gradient(q)
  l_pos = jnp.einsum("mbd,mbd->mb", qs, keys)
  l_neg = jnp.einsum(
    "mbd,mkd->mbk", qs, jax.lax.stop_gradient(queues), precision=jax.lax.Precision.HIGHEST
  )
  logits = jnp.concatenate([l_pos[..., None], l_neg], axis=-1) / loss_cfg.tau
  metrics["ce"] = jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0], axis=-1)
  metrics["instance_accuracy"] = jnp.mean(l_pos > l_neg.max(-1), axis=-1)
  metrics.update(
    metrics_lib.cohort_health(
      qs, own_loss=metrics["ce"], num_candidates=1 + queues.shape[1], head_hidden=hidden
    )
  )
  metrics["finite"] = metrics_lib.all_finite(metrics)
  return total, (metrics, new_stats, qs)


def train_step(
  state: MocoState,
  batch: dict[str, Array],
  consts: dict[str, Array],
  *,
  encoders: MocoEncoders,
  tx: optax.GradientTransformation,
  loss_cfg: ml_collections.ConfigDict,
  key_momentum: float,
  materialize: Callable[..., dict[str, Array]] = data_protocol.as_given,
  views: Callable[[Array, dict[str, Array]], tuple[Array, Array]],
  soft_ramp_steps: float = 0.0,
  icl_ramp_steps: float = 0.0,
  shuffle_bn_groups: int = 0,
  icl_keys: str = "queue",
) -> tuple[MocoState, dict[str, Array]]:
  """One MoCo-MCL step of the whole cohort (order: module docstring).

  batch: what the source's train_batches yielded; `materialize(consts, batch)` and
  `views(rng, batch)` (the source's, data.protocol.Source) make the query and key views
  from it on device.
  shuffle_bn_groups: 0 (the default), BN over the global batch in both encoders; G > 0,
  shuffle-BN with G groups (`num_bn_groups`; module docstring), its permutation drawn from
  the state's rng.
  soft_ramp_steps, icl_ramp_steps: steps over which the soft terms' and the interactive
  terms' weights ramp in (losses.soft_term_ramp, losses.interactive_term_ramp).
  icl_keys: "queue" or "batch" (moco_loss).
  """
  batch = materialize(consts, batch)
  shuffle_rng = None
  if shuffle_bn_groups:
    rng, view_rng, shuffle_rng = jax.random.split(state.rng, 3)
  else:
    rng, view_rng = jax.random.split(state.rng)
  x_q, x_k = views(view_rng, batch)
  key_params = momentum_update(state.key_params, state.params, key_momentum)
  keys, key_stats = compute_keys(
    encoders,
    {"params": key_params, "batch_stats": state.key_batch_stats},
    x_k,
    shuffle_bn_groups=shuffle_bn_groups,
    shuffle_rng=shuffle_rng,
  )
  grad_fn = jax.grad(
    functools.partial(
      moco_loss,
      encoders=encoders,
      loss_cfg=loss_cfg,
      soft_scale=losses.soft_term_ramp(state.step, soft_ramp_steps),
      interactive_scale=losses.interactive_term_ramp(state.step, icl_ramp_steps),
      bn_groups=shuffle_bn_groups,
      icl_keys=icl_keys,
    ),
    has_aux=True,
  )
  grads, (metrics, batch_stats, _) = grad_fn(
    state.params, state.batch_stats, x_q, keys, state.queues
  )
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  queues, queue_ptr = enqueue(state.queues, state.queue_ptr, keys)
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    batch_stats=batch_stats,
    opt_state=opt_state,
    rng=rng,
    key_params=key_params,
    key_batch_stats=key_stats,
    queues=queues,
    queue_ptr=queue_ptr,
  )
  return new_state, metrics


def embed_step(
  params: Any,
  batch_stats: Any,
  images: Array,
  *,
  encoders: MocoEncoders,
  preprocess: Callable[[Array], Array],
) -> Array:
  """Pooled backbone features [M, B, F] of the query encoders, BN in eval mode."""
  _, features, _ = encoders.apply(
    {"params": params, "batch_stats": batch_stats}, preprocess(images), train=False
  )
  return features.astype(jnp.float32)


# ----------------------------------------------------------------------------- the task


class MocoTask:
  """MoCo-MCL pre-training as a `loop.Task`: the state, the step, the kNN monitor, meta.

  `views` replaces the recipe named by `config.ssl.views` (tests pass an identity recipe);
  the loss, head and tau stay the config's. evaluate(state) -> the kNN monitor's accuracies
  (`knn.Monitor`).
  """

  # What loop.CollapseWatch's warning recommends (docs/MOCO.md, "Collapse").
  collapse_remedy = (
    "MoCo + MCL collapsed this way on Fashion-MNIST through its ICL term: "
    "neither shuffle-BN nor the soft terms changed it, and a lower ICL "
    "weight (config.loss.icl_weight=0.1, the Fashion-MNIST recipe's) kept the "
    "members from staying collapsed (3 seeds, 10 epochs: docs/RESULTS.md)."
  )
  # A healthy MoCo run's queries start at a mean cosine of 0.97-0.99 and spread within the
  # first epoch (Fashion-MNIST, docs/RESULTS.md): judged after it.
  collapse_cosine_grace_epochs = 1.0

  def __init__(self, setup: loop.Setup, views: data_views.ViewSpec | None = None):
    self.setup = setup
    config, mesh, source = setup.config, setup.mesh, setup.source
    self.spec = views or data_views.VIEW_SPECS[config.ssl.views]
    self.encoders = build_encoders(config, source.image_shape)
    self.views = source.two_views(self.spec, self.encoders.cohort.dtype)
    self.eval_every_epochs = config.ssl.knn_every_epochs
    self.consts = setup.device_arrays()
    self.consts.pop("train_label", None)  # no labels in self-supervised training
    self.shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), self.abstract_state())
    self.bn_groups = num_bn_groups(config, mesh.size)
    if self.bn_groups and config.input.global_batch_size // self.bn_groups < 2:
      raise ConfigError(
        f"config.moco.bn_group_size=0 gives one shuffle-BN group per device, here "
        f"{config.input.global_batch_size // self.bn_groups} image(s) each: BN needs at "
        f"least 2; set config.moco.bn_group_size or a larger global batch."
      )
    bn = (
      f"shuffle-BN, {self.bn_groups} groups of {config.input.global_batch_size // self.bn_groups}"
      if self.bn_groups
      else "global BN"
    )
    self.describe = (
      f"MoCo ({config.ssl.views} views, "
      f"{'MLP' if config.moco.mlp else 'linear'} head, {bn}) pre-training "
      f"{config.model.arch} x{config.cohort.num_members}"
    )
    self.compiled_train_step = sharding_lib.compile_step(
      functools.partial(
        train_step,
        encoders=self.encoders,
        tx=setup.tx,
        loss_cfg=config.loss,
        key_momentum=config.moco.key_momentum,
        materialize=functools.partial(source.materialize, labels=False),
        views=self.views,
        soft_ramp_steps=config.loss.soft_warmup_epochs * setup.steps_per_epoch,
        icl_ramp_steps=config.loss.icl_warmup_epochs * setup.steps_per_epoch,
        shuffle_bn_groups=self.bn_groups,
        icl_keys=config.moco.icl_keys,
      ),
      self.shardings,
      mesh,
    )
    self.compiled_eval_step = sharding_lib.compile_embed(
      functools.partial(embed_step, encoders=self.encoders, preprocess=source.eval_preprocess), mesh
    )
    self.monitor = knn.Monitor(setup, self.compiled_eval_step)

  def abstract_state(self) -> MocoState:
    init = state_init(self.encoders, self.setup.tx, self.setup.config.moco.queue_size)
    return jax.eval_shape(init, jax.random.PRNGKey(self.setup.config.seed))

  def init_state(self) -> MocoState:
    config = self.setup.config
    return create_state(
      self.encoders,
      self.setup.tx,
      jax.random.PRNGKey(config.seed),
      self.setup.mesh,
      queue_size=config.moco.queue_size,
    )

  def eval_step_inputs(self, state: Any, batch: dict[str, Any]) -> tuple:
    """The kNN monitor's feature step takes the query backbones' variables and images."""
    return (state.params, state.batch_stats, batch["image"])

  def train_step(self, state: MocoState, batch: dict[str, Array]) -> tuple[MocoState, dict]:
    return self.compiled_train_step(state, batch, self.consts)

  def evaluate(self, state: MocoState) -> dict[str, dict[str, np.ndarray]]:
    """`knn.monitor` of the members' backbone features (knn.Monitor)."""
    return self.monitor.evaluate(state)

  eval_scalars = staticmethod(knn.monitor_scalars)
  format_eval = staticmethod(knn.format_monitor)

  def meta(self) -> dict[str, Any]:
    """What export needs (the query encoders' backbone), plus MoCo's head and views (the
    config does not name the augmentation when `views` replaced it)."""
    return loop.export_meta(
      self.setup,
      num_classes=self.encoders.cohort.num_classes,
      moco_mlp=bool(self.setup.config.moco.mlp),
      views=dataclasses.asdict(self.spec),
    )


# ----------------------------------------------------------------------------- the regime


def check_config(config: ml_collections.ConfigDict) -> None:
  """MoCo's own config checks (config_lib.validate runs them)."""
  batch, moco = config.input.global_batch_size, config.moco
  if moco.queue_size < 1 or moco.queue_size % batch:
    raise ConfigError(
      f"config.moco.queue_size={moco.queue_size} is not a positive multiple of the "
      f"global batch {batch}; the FIFO queue takes whole batches."
    )
  if not 0.0 <= moco.key_momentum <= 1.0:
    raise ConfigError(f"config.moco.key_momentum={moco.key_momentum} must be in [0, 1].")
  if moco.shuffle_bn and moco.bn_group_size:  # 0: one group per device
    layers.check_bn_group_size(
      moco.bn_group_size, batch, "moco.bn_group_size", "one group per device"
    )
  if config.model.bn_group_size:
    raise ConfigError(
      "config.model.bn_group_size is the supervised trainer's; MoCo's BN groups are "
      "config.moco.bn_group_size (shuffle-BN)."
    )
  knn.check_monitor_config(config)


def export_note(meta: dict[str, Any]) -> str:
  """What an exported member's `fc` is: MoCo's projection (or the MLP's first layer)."""
  # Checkpoints from before `moco.mlp` recorded `moco_version` (2: the MLP head).
  if meta.get("moco_mlp", meta.get("moco_version") == 2):
    return (
      "MoCo MLP projection, first layer: fc maps the pooled features F -> F (the MLP's "
      "second layer is not exported); replace fc for a linear probe"
    )
  return (
    "MoCo projection: fc maps the pooled features to the (unnormalised) "
    f"{meta.get('embed_dim', 128)}-d embedding; replace fc for a linear probe"
  )


REGIME = regimes.Regime(
  name="moco",
  module=__name__,
  loss_regimes=("moco",),
  self_supervised=True,
  two_views=True,
  supports_co2=True,
  eval_metric="knn_top1",
  check=check_config,
  # The positive key and the K keys of the member's queue.
  contrastive_candidates=lambda config: 1 + config.moco.queue_size,
  export_note=export_note,
)


def build_task(setup: loop.Setup, views: data_views.ViewSpec | None = None) -> MocoTask:
  return MocoTask(setup, views)
