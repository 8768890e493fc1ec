"""In-batch self-supervised MCL (SimCLR-style): two views, no queue, no key encoder.

`build_task(setup)` makes the task `loop.fit` drives (`config.trainer = 'simclr'`,
`loss.regime = 'simclr'`). Every image of the batch gives two augmented views
(`mcl_jax.data.views`, `ssl.views`); every member embeds all 2B views (the `Cohort` with
its projection head) and the four MCL terms are the in-batch ones of docs/SPEC.md 2.1 with
the image as the class: `losses.batch_mcl(z, image_ids)`, where the two views of an image
share an id. So for a view, the only positive is the other view of the same image and the
2B - 2 other views are the negatives, the diagonal left out of the denominator: VCL of one
network is SimCLR's NT-Xent (Chen et al. 2020); ICL contrasts member a's view against
member b's embeddings of all 2B views; the soft terms mimic the members' similarity
distributions, as in the supervised regime. With one member and only `vcl_weight` on, this
is plain SimCLR.

Negatives come from the GLOBAL batch on any number of devices: the step computes the
embeddings of the whole batch-sharded input and the [2B, 2B] similarities over all of it
(XLA all-gathers the embeddings inside the jitted step), so 1 and 8 devices give the same
losses (tests/test_simclr.py). The two views of an image sit in adjacent rows on the same
device, and BatchNorm normalises over the global batch of views (SimCLR's global BN).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

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
from mcl_jax import regimes
from mcl_jax import sharding as sharding_lib
from mcl_jax import train_state
from mcl_jax.data import protocol as data_protocol
from mcl_jax.data import views as data_views
from mcl_jax.errors import ConfigError

Array = jax.Array


def interleave(x1: Array, x2: Array) -> tuple[Array, Array]:
  """The 2B views [x1_0, x2_0, x1_1, x2_1, ...] and their image ids [0, 0, 1, 1, ...]:
  the two views of an image stay on the device that holds the image."""
  batch = x1.shape[0]
  views = jnp.stack([x1, x2], axis=1).reshape(2 * batch, *x1.shape[1:])
  return views, jnp.repeat(jnp.arange(batch, dtype=jnp.int32), 2)


def simclr_loss(
  params: Any,
  batch_stats: Any,
  views: Array,
  image_ids: Array,
  *,
  model: models.Cohort,
  loss_cfg: ml_collections.ConfigDict,
  soft_scale: Array | float = 1.0,
  interactive_scale: Array | float = 1.0,
) -> tuple[Array, tuple[dict, Any]]:
  """Weighted VCL + ICL + Soft VCL + Soft ICL of the 2B views (module docstring); the
  factors on the weights: losses.weighted_mcl."""
  out, mutated = model.apply(
    {"params": params, "batch_stats": batch_stats}, views, train=True, mutable=["batch_stats"]
  )
  z = out["embeddings"]
  terms = losses.batch_mcl(z, image_ids, tau=loss_cfg.tau, kd_temperature=loss_cfg.kd_temperature)
  total = losses.weighted_mcl(terms, loss_cfg, soft_scale, interactive_scale=interactive_scale)
  metrics = {**terms, "loss": total}
  # Per member: how often the other view is the nearest of the 2B - 1 (instance accuracy).
  zs = jax.lax.stop_gradient(z)
  sims = jnp.einsum("mid,mjd->mij", zs, zs) - 3.0 * jnp.eye(z.shape[1])
  partner = jnp.arange(z.shape[1]) ^ 1  # 2i <-> 2i + 1
  metrics["instance_accuracy"] = jnp.mean(jnp.argmax(sims, -1) == partner, axis=-1)
  # Collapse signals; a view's candidates are the 2B - 1 other views of the global batch.
  metrics.update(
    metrics_lib.cohort_health(
      z,
      own_loss=metrics_lib.in_batch_own_loss(z, image_ids, tau=loss_cfg.tau),
      num_candidates=z.shape[1] - 1,
      head_hidden=out.get("head_hidden"),
    )
  )
  metrics["finite"] = metrics_lib.all_finite(metrics)
  return total, (metrics, mutated["batch_stats"])


def train_step(
  state: train_state.TrainState,
  batch: dict[str, Array],
  consts: dict[str, Array],
  *,
  model: models.Cohort,
  tx: optax.GradientTransformation,
  loss_cfg: ml_collections.ConfigDict,
  materialize: Callable[..., dict[str, Array]] = data_protocol.as_given,
  views: Callable[[Array, dict[str, Array]], tuple[Array, Array]],
  soft_ramp_steps: float = 0.0,
  icl_ramp_steps: float = 0.0,
) -> tuple[train_state.TrainState, dict[str, Array]]:
  """One step: two views of every image, the in-batch MCL terms, SGD.

  batch: what the source's train_batches yielded; `materialize(consts, batch)` and
  `views(rng, batch)` (the source's, data.protocol.Source) make the two views on device.
  soft_ramp_steps, icl_ramp_steps: steps over which the soft terms' and the interactive
  terms' weights ramp in (losses.soft_term_ramp, losses.interactive_term_ramp).
  """
  batch = materialize(consts, batch)
  rng, view_rng = jax.random.split(state.rng)
  x, ids = interleave(*views(view_rng, batch))
  grad_fn = jax.grad(
    functools.partial(
      simclr_loss,
      model=model,
      loss_cfg=loss_cfg,
      soft_scale=losses.soft_term_ramp(state.step, soft_ramp_steps),
      interactive_scale=losses.interactive_term_ramp(state.step, icl_ramp_steps),
    ),
    has_aux=True,
  )
  grads, (metrics, batch_stats) = grad_fn(state.params, state.batch_stats, x, ids)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(
    step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, rng=rng
  ), metrics


def embed_step(
  params: Any,
  batch_stats: Any,
  images: Array,
  *,
  model: models.Cohort,
  preprocess: Callable[[Array], Array],
) -> Array:
  """Pooled backbone features [M, B, F], BN in eval mode (the kNN monitor's)."""
  variables = {"params": params, "batch_stats": batch_stats}
  # Flax types apply's result as output-or-(output, mutated); without `mutable` it is the
  # output alone.
  out: dict[str, Array] = model.apply(variables, preprocess(images), train=False)  # type: ignore[assignment]
  return out["features"].astype(jnp.float32)


class SimclrTask:
  """SimCLR-MCL pre-training as a `loop.Task`; evaluate(state) -> `knn.monitor`.

  `views` replaces the recipe named by `config.ssl.views` (tests).
  """

  # What loop.CollapseWatch's warning recommends: only the supervised regime's remedy is
  # known; the soft terms are minimised by collapse here too.
  collapse_remedy = (
    "No remedy has been measured for SimCLR-MCL; the supervised regime's "
    "is to ramp the soft terms in (config.loss.soft_warmup_epochs, "
    "docs/RESULTS.md)."
  )
  # Freshly initialised embeddings point nearly one way in healthy runs too (as MoCo's).
  collapse_cosine_grace_epochs = 1.0

  def __init__(self, setup: loop.Setup, views: data_views.ViewSpec | None = None):
    self.setup = setup
    config, mesh, source = setup.config, setup.mesh, setup.source
    self.spec = views or data_views.VIEW_SPECS[config.ssl.views]
    self.num_classes = train_state.num_classes(config, source)  # the (unused) classifier's width
    self.model = train_state.build_model(config, self.num_classes)
    self.views = source.two_views(self.spec, self.model.dtype)
    self.describe = (
      f"SimCLR ({config.ssl.views} views) pre-training {config.model.arch} "
      f"x{config.cohort.num_members}"
    )
    self.eval_every_epochs = config.ssl.knn_every_epochs
    self.consts = setup.device_arrays()
    self.consts.pop("train_label", None)  # no labels in self-supervised training
    self.shardings = train_state.state_shardings(self.abstract_state(), mesh)
    self.compiled_train_step = sharding_lib.compile_step(
      functools.partial(
        train_step,
        model=self.model,
        tx=setup.tx,
        loss_cfg=config.loss,
        materialize=functools.partial(source.materialize, labels=False),
        views=self.views,
        soft_ramp_steps=config.loss.soft_warmup_epochs * setup.steps_per_epoch,
        icl_ramp_steps=config.loss.icl_warmup_epochs * setup.steps_per_epoch,
      ),
      self.shardings,
      mesh,
    )
    self.compiled_eval_step = sharding_lib.compile_embed(
      functools.partial(embed_step, model=self.model, preprocess=source.eval_preprocess), mesh
    )
    self.monitor = knn.Monitor(setup, self.compiled_eval_step)

  def abstract_state(self) -> train_state.TrainState:
    setup = self.setup
    return train_state.abstract_train_state(
      self.model, setup.tx, setup.source.image_shape, setup.mesh
    )

  def init_state(self) -> train_state.TrainState:
    setup = self.setup
    return train_state.create_train_state(
      self.model,
      setup.tx,
      setup.source.image_shape,
      jax.random.PRNGKey(setup.config.seed),
      setup.mesh,
    )

  def eval_step_inputs(self, state: Any, batch: dict[str, Any]) -> tuple:
    """The kNN monitor's feature step takes the query backbones' variables and images."""
    return (state.params, state.batch_stats, batch["image"])

  def train_step(
    self, state: train_state.TrainState, batch: dict[str, Array]
  ) -> tuple[train_state.TrainState, dict]:
    return self.compiled_train_step(state, batch, self.consts)

  def evaluate(self, state: train_state.TrainState) -> dict[str, dict[str, np.ndarray]]:
    """`knn.monitor` of the members' backbone features (knn.Monitor)."""
    return self.monitor.evaluate(state)

  eval_scalars = staticmethod(knn.monitor_scalars)
  format_eval = staticmethod(knn.format_monitor)

  def meta(self) -> dict[str, Any]:
    return loop.export_meta(
      self.setup, num_classes=self.num_classes, views=dataclasses.asdict(self.spec)
    )


def check_config(config: ml_collections.ConfigDict) -> None:
  """SimCLR's own config checks (config_lib.validate runs them)."""
  if config.model.head == "none":
    raise ConfigError(
      "config.model.head='none' leaves SimCLR no embeddings; use 'mlp' or 'linear'."
    )
  if config.model.bn_group_size:
    raise ConfigError(
      "config.model.bn_group_size is the supervised trainer's; SimCLR normalises over "
      "the whole global batch (global BN)."
    )
  knn.check_monitor_config(config)


REGIME = regimes.Regime(
  name="simclr",
  module=__name__,
  loss_regimes=("simclr",),
  self_supervised=True,
  two_views=True,
  eval_metric="knn_top1",
  check=check_config,
  # A view's candidates: the 2B - 1 other views of the global batch.
  contrastive_candidates=lambda config: 2 * config.input.global_batch_size - 1,
  export_note=lambda meta: (
    "untrained: SimCLR trains the backbone and the projection head "
    "only; replace fc for a linear probe"
  ),
)


def build_task(setup: loop.Setup, views: data_views.ViewSpec | None = None) -> SimclrTask:
  return SimclrTask(setup, views)
