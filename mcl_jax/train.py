"""Supervised MCL trainer: train state, the jitted step, evaluation, and the loop.

Library, not script: `main.py` calls `train_and_evaluate(config, workdir)`; tests call the
pieces. Durations come in epochs and are turned into steps here; the loop only sees steps.

The step is one compiled function for the whole cohort: M members' forward and backward
passes, their cross-entropies, the four MCL terms over all M x M pairs, optional logit KD,
and the optimizer update. In-memory datasets (digits, CIFAR) live on device; the step
receives only the batch's example indices, gathers the images and augments them inside the
same jit, so the host never touches pixels.
"""
from __future__ import annotations

import dataclasses
import functools
import logging as py_logging
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mcl_jax import checkpointing
from mcl_jax import config_lib
from mcl_jax import losses
from mcl_jax import memory_bank
from mcl_jax import metrics as metrics_lib
from mcl_jax import models
from mcl_jax import numerics
from mcl_jax import sharding as sharding_lib
from mcl_jax.data import augment as augment_lib

class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key: checkpoints as a plain array.
  bank: jax.Array | None = None  # [M, N, d] memory bank (loss.regime == "bank"), row-sharded.


# ----------------------------------------------------------------------------- model, optim


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> models.Cohort:
  return models.Cohort(
      arch=config.model.arch,
      num_classes=num_classes,
      num_members=config.cohort.num_members,
      shared_stages=config.model.shared_stages,
      embed_dim=config.model.embed_dim,
      strategy=config.model.strategy,  # 'auto': see models.resolve_strategy
      dtype=jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32,
      head_norm=config.model.head_norm)


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
  """LR as a function of the step; epochs are whole (official) or fractional (per step).

  `schedule.warmup_epochs` > 0 multiplies it by a linear ramp (step + 1) / warm-up steps,
  updated every step, over the first warm-up steps.
  """
  sched, base_lr = config.schedule, config.optim.lr
  boundaries = sorted(sched.boundaries) or [sched.epochs + 1]
  warmup_steps = sched.get("warmup_epochs", 0.0) * steps_per_epoch

  def schedule(step):
    # The default float dtype: float32, or float64 under jax.enable_x64 (a float32 LR would
    # round 0.01 by 2e-8, which tests/test_step_parity.py sees in float64).
    step = jnp.asarray(step, jnp.result_type(float))
    epoch = step / steps_per_epoch
    if sched.per_epoch:
      epoch = jnp.floor(epoch)
    if sched.kind == "cosine":
      lr = base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / sched.epochs))
    else:  # bisect_right(milestones, epoch) as in the official adjust_lr.
      lr = base_lr * sched.decay_factor ** jnp.sum(epoch >= jnp.asarray(boundaries, step.dtype))
    if warmup_steps > 0:
      lr = lr * jnp.minimum(1.0, (step + 1) / warmup_steps)
    return lr

  return schedule


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """SGD (+Nesterov) with coupled weight decay on every parameter, like torch.optim.SGD."""
  schedule = learning_rate_schedule(config, steps_per_epoch)
  tx = optax.chain(
      optax.add_decayed_weights(config.optim.weight_decay),
      optax.sgd(schedule, momentum=config.optim.momentum or None,
                nesterov=config.optim.nesterov))
  return tx, schedule


def _init_variables(model: models.Cohort, tx: optax.GradientTransformation,
                    image_shape: tuple[int, ...], rng: jax.Array) -> dict[str, Any]:
  variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
          "opt_state": tx.init(variables["params"])}


def _init_bank(model: models.Cohort, bank_rows: int, num_devices: int,
               rng: jax.Array) -> jax.Array:
  """The bank drawn for exactly `bank_rows` rows, zero-padded to split over the devices."""
  bank = memory_bank.init(rng, model.num_members, bank_rows, model.embed_dim)
  padding = _round_up(bank_rows, num_devices) - bank_rows
  return jnp.pad(bank, ((0, 0), (0, padding), (0, 0)))


def abstract_train_state(model: models.Cohort, tx: optax.GradientTransformation,
                         image_shape: tuple[int, ...], mesh: jax.sharding.Mesh, *,
                         bank_rows: int = 0) -> TrainState:
  """Shapes and dtypes of the state without allocating it (memory planning, restores)."""

  def init(rng):
    init_rng, bank_rng, state_rng = jax.random.split(rng, 3)
    bank = _init_bank(model, bank_rows, mesh.size, bank_rng) if bank_rows else None
    return TrainState(step=jnp.zeros((), jnp.int32), rng=state_rng, bank=bank,
                      **_init_variables(model, tx, image_shape, init_rng))

  return jax.eval_shape(init, jax.random.PRNGKey(0))


def create_train_state(model: models.Cohort, tx: optax.GradientTransformation,
                       image_shape: tuple[int, ...], rng: jax.Array,
                       mesh: jax.sharding.Mesh, *, bank_rows: int = 0) -> TrainState:
  """The state, created already sharded (params replicated, bank split along its rows).

  bank_rows: the number of training examples (0: no bank). The bank is drawn for exactly
  those rows, then zero-padded to a multiple of the device count so it splits evenly: the
  same seed gives the same bank on any number of devices, and padding rows are never
  sampled (indices come from the class table of the real examples).
  """
  init_rng, bank_rng, state_rng = jax.random.split(rng, 3)
  # Params are initialised op by op, not under jit: compiling the init of M deep networks
  # inlines a random-bits kernel per parameter and takes minutes (resnet110: 21 s jitted vs
  # 0.9 s eager once the ops are cached, per member); they are replicated anyway, so
  # nothing is gained by creating them sharded.
  variables = _init_variables(model, tx, image_shape, init_rng)
  state = TrainState(step=jnp.zeros((), jnp.int32), rng=state_rng, bank=None, **variables)
  replicated = sharding_lib.replicated(mesh)
  state = jax.tree.map(lambda x: _to_global(np.asarray(x), replicated), state)
  if bank_rows:
    # The bank is the one large part: drawn directly in its sharded layout, so no device
    # ever holds all of it.
    bank = jax.jit(functools.partial(_init_bank, model, bank_rows, mesh.size),
                   out_shardings=sharding_lib.bank_sharded(mesh))(bank_rng)
    state = state.replace(bank=bank)
  return state


def _to_global(value: np.ndarray, sharding: jax.sharding.NamedSharding) -> jax.Array:
  """A global array from a host value every process holds identically (multi-host safe)."""
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def state_shardings(state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
  replicated = sharding_lib.replicated(mesh)
  shardings = jax.tree.map(lambda _: replicated, state)
  if state.bank is not None:
    shardings = shardings.replace(bank=sharding_lib.bank_sharded(mesh))
  return shardings


# ----------------------------------------------------------------------------- losses


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy per member: logits [M, B, C], labels [B] -> [M]."""
  return optax.softmax_cross_entropy_with_integer_labels(
      numerics.at_least_float32(logits), labels[None, :]).mean(axis=-1)


def total_loss(outputs: dict[str, jax.Array], labels: jax.Array,
               loss_cfg: ml_collections.ConfigDict, *,
               bank_terms: dict[str, jax.Array] | None = None,
               soft_scale: jax.Array | float = 1.0) -> tuple[jax.Array, dict]:
  """SPEC 2.5: sum_m CE_m + alpha VCL + beta ICL + gamma SoftVCL + lambda SoftICL (+ KD).

  Terms with weight 0 are not computed at all (the baseline pays nothing for MCL).
  `bank_terms`: the four terms already computed against the memory bank (ImageNet).
  `soft_scale` multiplies the soft terms' weights (`losses.soft_term_ramp`).
  """
  logits = outputs["logits"]
  ce = cross_entropy(logits, labels)
  metrics = {"ce": ce, "accuracy": (logits.argmax(-1) == labels[None]).mean(axis=-1)}
  total = ce.sum()
  weights = losses.mcl_weights(loss_cfg)
  if logits.shape[0] > 1 and any(w != 0 for w in weights.values()):
    terms = bank_terms
    if terms is None:
      terms = losses.batch_mcl(outputs["embeddings"], labels, tau=loss_cfg.tau,
                               kd_temperature=loss_cfg.kd_temperature)
    for name, weight in weights.items():
      metrics[name] = terms[name]
      scale = soft_scale if name in losses.SOFT_TERMS else 1.0
      total = total + weight * scale * terms[name]
  if loss_cfg.logit_kd_weight != 0:
    kd = losses.logit_kd(logits, temperature=loss_cfg.kd_temperature,
                         targets=loss_cfg.logit_kd_targets)
    metrics["logit_kd"] = kd
    total = total + loss_cfg.logit_kd_weight * kd
  metrics["loss"] = total
  return total, metrics


# ----------------------------------------------------------------------------- steps


def eval_step(state: TrainState, batch: dict[str, jax.Array], *,
              model: models.Cohort, preprocess: Callable[[jax.Array], jax.Array]) -> dict:
  """Correct-prediction counts of every member and the ensemble (mean of logits).

  Returns sums, not means: padded examples carry mask 0, so summing over batches and
  dividing by the split size is exact on any device count.
  """
  outputs = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                        preprocess(batch["image"]), train=False)
  logits = outputs["logits"].astype(jnp.float32)  # [M, B, C]
  logits = jnp.concatenate([logits, logits.mean(axis=0, keepdims=True)], axis=0)
  top1, top5 = metrics_lib.topk_correct(logits, batch["label"], batch["mask"])
  return {"top1": top1, "top5": top5, "count": batch["mask"].astype(jnp.float32).sum()}


@dataclasses.dataclass(frozen=True)
class BankOps:
  """The memory-bank regime's on-device operations (SPEC 2.2), bound to a mesh.

  The bank [M, N, d] is split along N over the mesh. Each step samples 1 + P positives and
  K negatives per example from the class table, dots exactly those rows with the batch's
  embeddings with `memory_bank.gather_similarities` (each device dots the rows it holds;
  the similarities, not the rows, are reduce-scattered to the devices that hold the
  batch's examples: no all-gather of the bank, d / M times less traffic than moving the
  rows), and after the step writes each example's row on the device that owns it
  (`update_sharded`).
  """
  mesh: jax.sharding.Mesh
  num_positives: int
  num_negatives: int
  tau: float
  kd_temperature: float

  def sample(self, rng, labels, own_idx, table):
    return memory_bank.sample_indices(rng, labels, own_idx, table,
                                      num_positives=self.num_positives,
                                      num_negatives=self.num_negatives)

  def losses(self, z, bank, pos_idx, neg_idx):
    idx = jnp.concatenate([pos_idx, neg_idx], axis=1)
    sims = memory_bank.gather_similarities(bank, idx, z, self.mesh)
    return losses.bank_mcl_from_similarities(
        sims, num_positives=self.num_positives, tau=self.tau,
        kd_temperature=self.kd_temperature)

  def update(self, bank, own_idx, z, momentum):
    return memory_bank.update_sharded(bank, own_idx, z, momentum, self.mesh)


def train_step(state: TrainState, batch: dict[str, jax.Array], consts: dict[str, jax.Array],
               *, model: models.Cohort, tx: optax.GradientTransformation,
               loss_cfg: ml_collections.ConfigDict,
               preprocess: Callable[[jax.Array, jax.Array], jax.Array],
               bank_ops: BankOps | None = None,
               bank_momentum: float = 0.5,
               soft_ramp_steps: float = 0.0) -> tuple[TrainState, dict]:
  """One SGD step of the whole cohort.

  batch: either image [B, ...], label [B], index [B] (streamed from the host), or only
  index [B], gathered here from the training set kept on device (consts['train_image'],
  consts['train_label']). consts also carries the bank's class table.
  soft_ramp_steps: steps over which the soft terms' weights ramp in (losses.soft_term_ramp).
  """
  if "image" not in batch:  # In-memory dataset: the batch is its example indices.
    batch = {"image": consts["train_image"][batch["index"]],
             "label": consts["train_label"][batch["index"]], "index": batch["index"]}
  rng, aug_rng, sample_rng = jax.random.split(state.rng, 3)
  images = preprocess(aug_rng, batch["image"])
  labels, own_idx = batch["label"], batch["index"]
  if bank_ops is not None:
    pos_idx, neg_idx = bank_ops.sample(sample_rng, labels, own_idx, consts)

  def loss_fn(params):
    outputs, mutated = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"])
    bank_terms = None
    if bank_ops is not None:
      bank_terms = bank_ops.losses(outputs["embeddings"], state.bank, pos_idx, neg_idx)
    loss, metrics = total_loss(outputs, labels, loss_cfg, bank_terms=bank_terms,
                               soft_scale=losses.soft_term_ramp(state.step, soft_ramp_steps))
    metrics.update(metrics_lib.embedding_health(outputs["embeddings"], outputs["head_hidden"]))
    return loss, (metrics, mutated["batch_stats"], outputs["embeddings"])

  grads, (metrics, batch_stats, embeddings) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  bank = state.bank
  if bank_ops is not None:  # After the step, from this step's embeddings (official order).
    bank = bank_ops.update(bank, own_idx, embeddings, bank_momentum)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, rng=rng, bank=bank)
  return new_state, metrics


# ----------------------------------------------------------------------------- the loop


class PreemptionGuard:
  """Turns SIGTERM (a TPU preemption notice, SLURM's --signal before the time limit) into
  "save at this step and stop".

  Single process: our own handler sets a flag. Several processes: JAX's preemption
  service (on by default with jax.distributed) catches the signal and agrees on a step at
  which every host saves; `reached_preemption_sync_point` must then be asked every step.
  """

  def __init__(self):
    self._requested = False
    self._previous = None
    self._multi = jax.process_count() > 1
    self._reported = False
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def reached(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils
      if not self._reported:
        # JAX puts the sync point one past the largest step the hosts have reported, and a
        # host that has reported nothing counts as step 0. A notice that came before this
        # first report (while a resumed run restored and compiled) thus set it to step 1,
        # which a run resumed at a later step never reports, and the notice was ignored.
        # Asking for step 1 once turns such a notice into a stop at this first step.
        self._reported = True
        self._requested = multihost_utils.reached_preemption_sync_point(1)
      return multihost_utils.reached_preemption_sync_point(step) or self._requested
    return self._requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _progress(total_steps: int, initial: int):
  """A bar in a terminal; plain log lines (from clu's ReportProgress) otherwise."""
  if sys.stderr.isatty() and jax.process_index() == 0:
    from tqdm import tqdm
    return tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True)
  return None


class _QuietLibraries(py_logging.Filter):
  """Keeps INFO lines of our own code; libraries (Orbax logs every save step) only warn.

  clu's lines are ours too: its metric writer logs the training metrics (`[step] train/...`
  every config.log_every_steps) and ReportProgress the steps/s and ETA, the only progress
  a run without a terminal (SLURM, nohup on a TPU host) shows between evals.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (record.levelno >= py_logging.WARNING or "/mcl_jax/" in record.pathname
            or "/clu/" in record.pathname)


def quiet_library_logs() -> None:
  """For the command-line tools: absl's log output keeps our lines, drops libraries' INFO."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


class CollapseWatch:
  """Warns once when a member's embeddings have collapsed to one direction.

  Reads the logged `embed_cosine/member_m` (metrics.embedding_health): above
  metrics.COLLAPSE_COSINE every in-batch similarity is about the same, the contrastive
  terms sit at log(B - 1) per row and give almost no gradient, so MCL is effectively off
  until the embeddings spread again (docs/RESULTS.md, "The collapse").
  """

  def __init__(self):
    self.warned = False

  def check(self, step: int, train_metrics: dict[str, float]) -> None:
    if self.warned:
      return
    for name, value in train_metrics.items():
      if name.startswith("embed_cosine/") and value > metrics_lib.COLLAPSE_COSINE:
        member = name.split("member_")[-1]
        logging.warning(
            "Step %d: member %s's embeddings have collapsed (mean pairwise cosine %.3f > "
            "%.2f), so the contrastive terms give almost no gradient; ramping the soft "
            "terms in (config.loss.soft_warmup_epochs=1) avoids this (docs/RESULTS.md).",
            step, member, value, metrics_lib.COLLAPSE_COSINE)
        self.warned = True
        return


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
  """[M]-vectors become one scalar per member (`ce/member_0`)."""
  flat = {}
  for name, value in metrics.items():
    value = np.asarray(value)
    if value.ndim == 0:
      flat[prefix + name] = float(value)
    else:
      for m, v in enumerate(value):
        flat[f"{prefix}{name}/member_{m}"] = float(v)
  return flat


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


class Trainer:
  """Wires a config to data, state, the compiled step, eval and checkpoints.

  `train_and_evaluate` is the whole job; the pieces are public so tests can drive a few
  steps, check shardings, or compare two runs.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
               mesh: jax.sharding.Mesh | None = None):
    self._start(config, workdir, mesh)
    self._load_data()
    num_classes = config.model.num_classes or self.dataset.num_classes
    self.model = build_model(config, num_classes)
    self.bank_ops = None
    replicated = sharding_lib.replicated(self.mesh)
    bank_rows = 0
    weights = (config.loss.vcl_weight, config.loss.icl_weight, config.loss.soft_vcl_weight,
               config.loss.soft_icl_weight)
    if config.loss.regime == "bank" and any(w != 0 for w in weights):
      bank_rows = self.dataset.num_train
      table = memory_bank.class_index_table(np.asarray(self.dataset.train_labels), num_classes)
      self.consts.update({k: jax.device_put(v, replicated) for k, v in table.items()})
      self.bank_ops = BankOps(self.mesh, config.bank.num_positives, config.bank.num_negatives,
                              config.loss.tau, config.loss.kd_temperature)
    self._put_training_set(with_labels=True)
    self.state = create_train_state(
        self.model, self.tx, self.image_shape, jax.random.PRNGKey(config.seed),
        self.mesh, bank_rows=bank_rows)
    self.shardings = state_shardings(self.state, self.mesh)
    self._train_step = self._compile_train_step()
    self._eval_step = jax.jit(functools.partial(
        eval_step, model=self.model, preprocess=self._eval_preprocess))

  # -- set-up shared by every trainer (MocoTrainer and LinclsTrainer build their own state)
  def _start(self, config: ml_collections.ConfigDict, workdir: str,
             mesh: jax.sharding.Mesh | None) -> None:
    self.config, self.workdir = config, workdir
    self.mesh = mesh or sharding_lib.make_mesh()
    config_lib.validate(config, num_devices=self.mesh.size, workdir=workdir)

  def _load_data(self) -> None:
    """The dataset, the step counts and the optimizer that depends on them."""
    from mcl_jax import data as data_lib  # TensorFlow stays unimported for in-memory data.
    config = self.config
    self.dataset = data_lib.make_source(config.input)
    self.streaming = bool(getattr(self.dataset, "streaming", False))
    self.image_shape = tuple(self.dataset.image_shape)
    self.global_batch = config.input.global_batch_size
    num_train = self.dataset.num_train
    self.steps_per_epoch = num_train // self.global_batch
    if self.steps_per_epoch < 1:
      raise config_lib.ConfigError(
          f"config.input.global_batch_size={self.global_batch} is larger than the "
          f"{num_train} training examples.")
    self.total_steps = config.schedule.num_train_steps or (
        config.schedule.epochs * self.steps_per_epoch)
    self.tx, self.schedule = make_optimizer(config, self.steps_per_epoch)
    self.consts = {}  # Replicated arrays every step reads.

  def _put_training_set(self, *, with_labels: bool) -> None:
    """In-memory data: the training set, once, on every device; steps gather by index."""
    if self.streaming:
      return
    replicated = sharding_lib.replicated(self.mesh)
    self.consts["train_image"] = jax.device_put(self.dataset.train_images, replicated)
    if with_labels:
      self.consts["train_label"] = jax.device_put(
          self.dataset.train_labels.astype(np.int32), replicated)

  # Preprocessing is traced into the step. Streamed images come cropped and flipped.
  def _train_preprocess(self, rng: jax.Array, images: jax.Array) -> jax.Array:
    if self.streaming:
      return augment_lib.normalize(images, self.dataset.mean, self.dataset.std)
    return augment_lib.train_augment(rng, images, self.dataset.augment,
                                     mean=self.dataset.mean, std=self.dataset.std)

  def _eval_preprocess(self, images: jax.Array) -> jax.Array:
    return augment_lib.normalize(images, self.dataset.mean, self.dataset.std)

  def _compile_train_step(self):
    step = functools.partial(
        train_step, model=self.model, tx=self.tx, loss_cfg=self.config.loss,
        preprocess=self._train_preprocess, bank_ops=self.bank_ops,
        bank_momentum=self.config.bank.momentum,
        soft_ramp_steps=self.config.loss.soft_warmup_epochs * self.steps_per_epoch)
    replicated = sharding_lib.replicated(self.mesh)
    return jax.jit(
        step,
        in_shardings=(self.shardings, sharding_lib.batch_sharded(self.mesh), replicated),
        out_shardings=(self.shardings, replicated),
        donate_argnums=(0,))

  # -- data order: a pure function of (seed, epoch), so a resumed run sees the same batches.
  def epoch_indices(self, epoch: int) -> np.ndarray:
    from mcl_jax.data import sampler
    cfg = self.config.input
    if cfg.samples_per_class > 0:
      return sampler.class_aware_epoch(
          self.dataset.train_labels, epoch=epoch, seed=self.config.seed,
          global_batch_size=self.global_batch, samples_per_class=cfg.samples_per_class)
    return sampler.shuffled_epoch(self.dataset.num_train, epoch=epoch, seed=self.config.seed,
                                  global_batch_size=self.global_batch)

  def local_batches(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(step, this process's share of the batch) from the state's step to the end."""
    step = int(self.state.step)
    while step < self.total_steps:
      epoch, offset = divmod(step, self.steps_per_epoch)
      if self.streaming:
        batches = self.dataset.train_batches(epoch, seed=self.config.seed,
                                             global_batch_size=self.global_batch,
                                             start_step=offset)
      else:
        batches = ({"index": idx[sharding_lib.process_slice(len(idx))].astype(np.int32)}
                   for idx in self.epoch_indices(epoch)[offset:])
      for batch in batches:
        if step >= self.total_steps:
          return
        yield step, batch
        step += 1

  def step(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    self.state, metrics = self._train_step(
        self.state, sharding_lib.global_batch(local_batch, self.mesh), self.consts)
    return metrics

  def train_steps(self, num_steps: int | None = None) -> list[dict]:
    """Runs `num_steps` steps (all remaining by default); returns per-step metrics."""
    history = []
    for _, batch in self.local_batches():
      if num_steps is not None and len(history) >= num_steps:
        break
      history.append(self.step(batch))
    return history

  def eval_split_names(self) -> tuple[str, ...]:
    """'test', then 'validation' when the dataset holds one out (in-memory sources)."""
    if self.streaming:
      return ("test",)
    return tuple(self.dataset.eval_splits())

  def eval_local_batches(self, split: str = "test") -> Iterator[dict[str, np.ndarray]]:
    batch_size = _round_up(self.config.input.eval_batch_size, self.mesh.size)
    if self.streaming:
      yield from self.dataset.eval_batches(batch_size)
      return
    from mcl_jax.data import pipeline
    images, labels = self.dataset.eval_splits()[split]
    for batch in pipeline.eval_batches(images, labels, batch_size):
      yield {k: v[sharding_lib.process_slice(len(v))] for k, v in batch.items()}

  def evaluate_split(self, split: str = "test") -> dict[str, np.ndarray]:
    """Top-1/top-5 [M + 1] of every member and the ensemble over one whole split."""
    totals = None
    for local in self.eval_local_batches(split):
      local = {k: local[k] for k in ("image", "label", "mask")}
      counts = self._eval_step(self.state, sharding_lib.global_batch(local, self.mesh))
      counts = jax.tree.map(np.asarray, counts)
      totals = counts if totals is None else jax.tree.map(np.add, totals, counts)
    return metrics_lib.cohort_accuracy(totals)

  def evaluate(self) -> dict[str, dict[str, np.ndarray]]:
    """{split: {'top1', 'top5'}} for the test split and, if held out, the validation split."""
    return {split: self.evaluate_split(split) for split in self.eval_split_names()}

  def restore_or_keep(self, ckpt: checkpointing.Checkpointer) -> bool:
    restored = ckpt.restore_latest(self.state)
    if restored is None:
      return False
    self.state = restored[0]
    return True

  def meta(self) -> dict[str, Any]:
    """What export needs to rebuild a member without the config file."""
    return {"arch": self.config.model.arch, "num_members": self.config.cohort.num_members,
            "shared_stages": self.config.model.shared_stages,
            "num_classes": int(self.model.num_classes), "trainer": self.config.trainer,
            "embed_dim": self.config.model.embed_dim,
            "image_shape": list(self.dataset.image_shape),
            "mean": np.asarray(self.dataset.mean).tolist(),
            "std": np.asarray(self.dataset.std).tolist(),
            "config": self.config.to_json_best_effort()}


def fit(trainer: Trainer, *, describe: str, evaluate: Callable[[], Any],
        eval_every_epochs: int, eval_scalars: Callable[[Any], dict[str, float]],
        format_eval: Callable[[Any], str]) -> dict[str, Any]:
  """The job loop every trainer shares: resume, train, report, evaluate, checkpoint.

  Resumes from the trainer's workdir, runs the remaining steps with a progress display,
  logs the mean training metrics every `log_every_steps`, evaluates every
  `eval_every_epochs` epochs (0: only at the end) and once more for the final state,
  checkpoints every `checkpoint.every_epochs` and at the end. On SIGTERM (or JAX's
  preemption notice) it saves at the current step and returns early with preempted=True.

  `evaluate` returns a result or None when there is nothing to evaluate; `eval_scalars`
  names its scalars for TensorBoard (e.g. `eval/top1/member_0`) and `format_eval` makes
  the log line. The embedding-health metrics of the training step (`embed_cosine`) are
  watched: the first logged mean above metrics.COLLAPSE_COSINE gives one warning.
  Returns {"eval": the last evaluation, "train": the last logged training metrics,
  "steps": the step reached, "preempted": bool}.
  """
  from clu import metric_writers, periodic_actions
  from mcl_jax.data import _tf
  _tf.tf()  # clu's TensorBoard writer runs on TensorFlow: hide the GPUs from it first.
  config, workdir = trainer.config, trainer.workdir
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=False)
  ckpt = checkpointing.Checkpointer(workdir, keep=config.checkpoint.keep)
  if trainer.restore_or_keep(ckpt):
    logging.info("Resumed from %s at step %d.", workdir, int(trainer.state.step))
  start_step = int(trainer.state.step)
  spe, total = trainer.steps_per_epoch, trainer.total_steps
  logging.info("%s for %d steps (%d per epoch) on %d devices.", describe, total, spe,
               trainer.mesh.size)
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                           every_secs=30)
  bar = _progress(total, start_step)
  guard = PreemptionGuard()
  pending, last_train, done = [], {}, start_step
  evaluated: dict[str, Any] = {"result": None, "step": None}
  collapse = CollapseWatch()

  def run_eval():
    result = evaluate()
    evaluated.update(result=result, step=done)
    if result is not None:
      writer.write_scalars(done, eval_scalars(result))
      logging.info("step %d (epoch %.2f) %s", done, done / spe, format_eval(result))

  def summary(preempted: bool) -> dict[str, Any]:
    return {"eval": evaluated["result"], "train": last_train, "steps": done,
            "preempted": preempted}

  t0 = time.time()
  try:
    for step, batch in trainer.local_batches():
      pending.append(trainer.step(batch))
      done = step + 1
      report(done)
      if bar is not None:
        bar.update(1)
      if done % config.log_every_steps == 0 or done == total:
        last_train = _mean_metrics(pending)
        last_train["learning_rate"] = float(trainer.schedule(step))
        writer.write_scalars(done, {f"train/{k}": v for k, v in last_train.items()})
        collapse.check(done, last_train)
        if bar is not None:
          bar.set_postfix(loss=f"{last_train['loss']:.3f}")
        pending = []
      if guard.reached(done):
        ckpt.save(done, trainer.state, trainer.meta())
        logging.warning("Preemption signal: saved step %d in %s; rerun the same command "
                        "to resume.", done, workdir)
        return summary(preempted=True)
      epoch_end = done % spe == 0
      if (eval_every_epochs and epoch_end and (done // spe) % eval_every_epochs == 0
          ) or done == total:
        run_eval()
      if (epoch_end and (done // spe) % config.checkpoint.every_epochs == 0) or done == total:
        ckpt.save(done, trainer.state, trainer.meta())
    if evaluated["step"] != done:  # Resumed after the last step: report the final state.
      run_eval()
  finally:
    guard.close()
    if bar is not None:
      bar.close()
    ckpt.close()
    writer.flush()
  final = evaluated["result"]
  logging.info("Finished %d steps in %.1f s.%s", done - start_step, time.time() - t0,
               "" if final is None else f" Final {format_eval(final)}")
  return summary(preempted=False)


def cohort_eval_scalars(result: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
  """`eval/top1/member_0`, ..., `eval/top1/best_member`, `eval/top1/ensemble` for the test
  split and `val/...` for the validation split."""
  scalars = {}
  for split, accuracy in result.items():
    prefix = "eval/" if split == "test" else "val/"
    scalars.update(metrics_lib.accuracy_scalars(accuracy, prefix))
  return scalars


def format_cohort_eval(result: dict[str, dict[str, np.ndarray]]) -> str:
  return "  |  ".join(f"{split} top-1/top-5 %: {metrics_lib.format_cohort_accuracy(acc)}"
                      for split, acc in result.items())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the cohort, evaluating every `eval_every_epochs`; resumes from `workdir`.

  Returns {"eval": {"test": {"top1": [M + 1], "top5": [M + 1]}, and "validation": the same
  when the dataset holds one out} (last entry = ensemble), "train": the last logged
  training metrics, "steps": the step reached, "preempted": bool}. On SIGTERM it saves at
  the current step and returns early with preempted=True.
  """
  trainer = Trainer(config, workdir)
  return fit(trainer,
             describe=f"Training {config.model.arch} x{config.cohort.num_members}",
             evaluate=trainer.evaluate, eval_every_epochs=config.eval_every_epochs,
             eval_scalars=cohort_eval_scalars, format_eval=format_cohort_eval)


def _mean_metrics(history: list[dict]) -> dict[str, float]:
  host = jax.device_get(history)
  mean = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *host)
  return flatten_metrics(mean)
