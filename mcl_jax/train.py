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
import sys
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
from mcl_jax import models
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
      dtype=jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32)


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
  """LR as a function of the step; epochs are whole (official) or fractional (per step)."""
  sched, base_lr = config.schedule, config.optim.lr
  boundaries = jnp.asarray(sorted(sched.boundaries) or [sched.epochs + 1], jnp.float32)

  def schedule(step):
    epoch = step / steps_per_epoch
    if sched.per_epoch:
      epoch = jnp.floor(epoch)
    if sched.kind == "cosine":
      return base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / sched.epochs))
    # bisect_right(milestones, epoch) as in the official adjust_lr.
    return base_lr * sched.decay_factor ** jnp.sum(epoch >= boundaries)

  return schedule


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """SGD (+Nesterov) with coupled weight decay on every parameter, like torch.optim.SGD."""
  schedule = learning_rate_schedule(config, steps_per_epoch)
  tx = optax.chain(
      optax.add_decayed_weights(config.optim.weight_decay),
      optax.sgd(schedule, momentum=config.optim.momentum or None,
                nesterov=config.optim.nesterov))
  return tx, schedule


def create_train_state(model: models.Cohort, tx: optax.GradientTransformation,
                       image_shape: tuple[int, ...], rng: jax.Array,
                       mesh: jax.sharding.Mesh, *, bank_rows: int = 0) -> TrainState:
  """The state, created already sharded (params replicated, bank split along its rows)."""

  def init(rng):
    init_rng, bank_rng, state_rng = jax.random.split(rng, 3)
    variables = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    bank = None
    if bank_rows:
      bank = memory_bank.init(bank_rng, model.num_members, bank_rows, model.embed_dim)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=state_rng, bank=bank)

  abstract = jax.eval_shape(init, rng)
  shardings = state_shardings(abstract, mesh)
  return jax.jit(init, out_shardings=shardings)(rng)


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
      logits.astype(jnp.float32), labels[None, :]).mean(axis=-1)


def total_loss(outputs: dict[str, jax.Array], labels: jax.Array,
               loss_cfg: ml_collections.ConfigDict, *,
               bank_terms: dict[str, jax.Array] | None = None) -> tuple[jax.Array, dict]:
  """SPEC 2.5: sum_m CE_m + alpha VCL + beta ICL + gamma SoftVCL + lambda SoftICL (+ KD).

  Terms with weight 0 are not computed at all (the baseline pays nothing for MCL).
  `bank_terms`: the four terms already computed against the memory bank (ImageNet).
  """
  logits = outputs["logits"]
  ce = cross_entropy(logits, labels)
  metrics = {"ce": ce, "accuracy": (logits.argmax(-1) == labels[None]).mean(axis=-1)}
  total = ce.sum()
  weights = {"vcl": loss_cfg.vcl_weight, "icl": loss_cfg.icl_weight,
             "soft_vcl": loss_cfg.soft_vcl_weight, "soft_icl": loss_cfg.soft_icl_weight}
  if logits.shape[0] > 1 and any(w != 0 for w in weights.values()):
    terms = bank_terms
    if terms is None:
      terms = losses.batch_mcl(outputs["embeddings"], labels, tau=loss_cfg.tau,
                               kd_temperature=loss_cfg.kd_temperature)
    for name, weight in weights.items():
      metrics[name] = terms[name]
      total = total + weight * terms[name]
  if loss_cfg.logit_kd_weight != 0:
    kd = losses.logit_kd(logits, temperature=loss_cfg.kd_temperature,
                         targets=loss_cfg.logit_kd_targets)
    metrics["logit_kd"] = kd
    total = total + loss_cfg.logit_kd_weight * kd
  metrics["loss"] = total
  return total, metrics


# ----------------------------------------------------------------------------- steps


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: models.Cohort,
               tx: optax.GradientTransformation, loss_cfg: ml_collections.ConfigDict,
               preprocess: Callable[[jax.Array, jax.Array], jax.Array],
               bank_cfg: ml_collections.ConfigDict | None = None,
               bank_ops: "BankOps | None" = None) -> tuple[TrainState, dict]:
  """One SGD step of the whole cohort. batch: image [B, ...], label [B], index [B]."""
  rng, aug_rng, sample_rng = jax.random.split(state.rng, 3)
  images = preprocess(aug_rng, batch["image"])
  labels = batch["label"]
  bank_idx = None
  if bank_ops is not None:
    bank_idx = bank_ops.sample(sample_rng, labels, batch["index"])

  def loss_fn(params):
    outputs, mutated = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"])
    bank_terms = None
    if bank_ops is not None:
      bank_terms = bank_ops.losses(outputs["embeddings"], state.bank, *bank_idx)
    loss, metrics = total_loss(outputs, labels, loss_cfg, bank_terms=bank_terms)
    return loss, (metrics, mutated["batch_stats"], outputs["embeddings"])

  grads, (metrics, batch_stats, embeddings) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  bank = state.bank
  if bank_ops is not None:
    bank = bank_ops.update(bank, batch["index"], embeddings, bank_cfg.momentum)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, rng=rng, bank=bank)
  return new_state, metrics


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
  labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  correct5 = (top5 == labels[None, :, None]).any(-1)
  correct1 = top5[..., 0] == labels[None]
  return {"top1": (correct1 * mask).sum(-1), "top5": (correct5 * mask).sum(-1),
          "count": mask.sum()}


@dataclasses.dataclass(frozen=True)
class BankOps:
  """The memory-bank regime's three on-device operations, bound to a mesh and a class table.

  Kept as one object so `train_step` stays free of sharding details.
  """
  sample: Callable[..., tuple[jax.Array, jax.Array]]
  losses: Callable[..., dict[str, jax.Array]]
  update: Callable[..., jax.Array]


# ----------------------------------------------------------------------------- the loop


def _progress(total_steps: int, initial: int):
  """A bar in a terminal; plain log lines (from clu's ReportProgress) otherwise."""
  if sys.stderr.isatty() and jax.process_index() == 0:
    from tqdm import tqdm
    return tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True)
  return None


def format_accuracy(acc: dict[str, np.ndarray]) -> str:
  names = [f"member {m}" for m in range(len(acc["top1"]) - 1)] + ["ensemble"]
  return "  ".join(f"{n}: {100 * t1:.2f}/{100 * t5:.2f}"
                   for n, t1, t5 in zip(names, acc["top1"], acc["top5"]))


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
  """[M]-vectors become one scalar per member (`ce/member_0`), plus their sum for CE."""
  flat = {}
  for name, value in metrics.items():
    value = np.asarray(value)
    if value.ndim == 0:
      flat[prefix + name] = float(value)
    else:
      for m, v in enumerate(value):
        flat[f"{prefix}{name}/member_{m}"] = float(v)
  return flat


class Trainer:
  """Wires a config to data, state, compiled steps, checkpoints and metric writers.

  `train_and_evaluate` is the whole job; the attributes are there so tests can drive a
  few steps, check shardings, or compare two runs.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
               mesh: jax.sharding.Mesh | None = None):
    from mcl_jax import data as data_lib  # TensorFlow stays unimported for in-memory data.
    self.config, self.workdir = config, workdir
    self.mesh = mesh or sharding_lib.make_mesh()
    config_lib.validate(config, num_devices=self.mesh.size, workdir=workdir)
    self.dataset = data_lib.make_source(config.input)
    num_classes = config.model.num_classes or self.dataset.num_classes
    self.model = build_model(config, num_classes)
    self.global_batch = config.input.global_batch_size
    self.steps_per_epoch = len(self.dataset.train_labels) // self.global_batch
    if self.steps_per_epoch < 1:
      raise config_lib.ConfigError(
          f"config.input.global_batch_size={self.global_batch} is larger than the "
          f"{len(self.dataset.train_labels)} training examples.")
    self.total_steps = config.schedule.num_train_steps or (
        config.schedule.epochs * self.steps_per_epoch)
    self.tx, self.schedule = make_optimizer(config, self.steps_per_epoch)
    image_shape = self.dataset.train_images.shape[1:]
    self.state = create_train_state(
        self.model, self.tx, image_shape, jax.random.PRNGKey(config.seed), self.mesh)
    self.shardings = state_shardings(self.state, self.mesh)
    # The training set, once, on every device: steps gather their batch from it by index.
    replicated = sharding_lib.replicated(self.mesh)
    self.train_data = {
        "image": jax.device_put(self.dataset.train_images, replicated),
        "label": jax.device_put(self.dataset.train_labels.astype(np.int32), replicated)}
    self._train_step = self._compile_train_step()
    self._eval_step = jax.jit(functools.partial(
        eval_step, model=self.model, preprocess=self._eval_preprocess))

  # Preprocessing is data-dependent (mean/std, crop padding) and jit-traced with the step.
  def _train_preprocess(self, rng: jax.Array, images: jax.Array) -> jax.Array:
    return augment_lib.train_augment(rng, images, self.dataset.augment,
                                     mean=self.dataset.mean, std=self.dataset.std)

  def _eval_preprocess(self, images: jax.Array) -> jax.Array:
    return augment_lib.normalize(images, self.dataset.mean, self.dataset.std)

  def _compile_train_step(self):
    step = functools.partial(train_step, model=self.model, tx=self.tx,
                             loss_cfg=self.config.loss, preprocess=self._train_preprocess)

    def step_on_indices(state, data, idx):
      batch = {"image": data["image"][idx], "label": data["label"][idx], "index": idx}
      return step(state, batch)

    return jax.jit(
        step_on_indices,
        in_shardings=(self.shardings, sharding_lib.replicated(self.mesh),
                      sharding_lib.batch_sharded(self.mesh)),
        out_shardings=(self.shardings, sharding_lib.replicated(self.mesh)),
        donate_argnums=(0,))

  # -- data order: a pure function of (seed, epoch), so a resumed run sees the same batches.
  def epoch_indices(self, epoch: int) -> np.ndarray:
    from mcl_jax.data import sampler
    cfg = self.config.input
    if cfg.samples_per_class > 0:
      return sampler.class_aware_epoch(
          self.dataset.train_labels, epoch=epoch, seed=self.config.seed,
          global_batch_size=self.global_batch, samples_per_class=cfg.samples_per_class)
    return sampler.shuffled_epoch(len(self.dataset.train_labels), epoch=epoch,
                                  seed=self.config.seed, global_batch_size=self.global_batch)

  def step_indices(self) -> Iterator[tuple[int, np.ndarray]]:
    """(step, global index batch) from the state's step to the end of training."""
    step = int(self.state.step)
    while step < self.total_steps:
      epoch, offset = divmod(step, self.steps_per_epoch)
      for idx in self.epoch_indices(epoch)[offset:]:
        if step >= self.total_steps:
          return
        yield step, idx
        step += 1

  def train_steps(self, num_steps: int | None = None) -> list[dict]:
    """Runs steps (all remaining by default); returns per-step host metrics."""
    history = []
    for step, idx in self.step_indices():
      if num_steps is not None and len(history) >= num_steps:
        break
      local = np.asarray(idx[sharding_lib.process_slice(len(idx))], np.int32)
      self.state, metrics = self._train_step(
          self.state, self.train_data, sharding_lib.global_batch(local, self.mesh))
      history.append(metrics)
    return history

  def evaluate(self) -> dict[str, np.ndarray]:
    """Top-1/top-5 of every member and the ensemble over the whole eval split."""
    from mcl_jax.data import pipeline
    batch_size = _round_up(self.config.input.eval_batch_size, self.mesh.size)
    totals = None
    for batch in pipeline.eval_batches(self.dataset.eval_images, self.dataset.eval_labels,
                                       batch_size):
      local = {k: v[sharding_lib.process_slice(len(v))] for k, v in batch.items()}
      counts = self._eval_step(self.state, sharding_lib.global_batch(local, self.mesh))
      counts = jax.tree.map(np.asarray, counts)
      totals = counts if totals is None else jax.tree.map(np.add, totals, counts)
    return {"top1": totals["top1"] / totals["count"], "top5": totals["top5"] / totals["count"]}

  # -- checkpoints
  def restore_or_keep(self, ckpt: checkpointing.Checkpointer) -> bool:
    restored = ckpt.restore_latest(self.state)
    if restored is None:
      return False
    self.state = restored[0]
    return True

  def meta(self) -> dict[str, Any]:
    return {"arch": self.config.model.arch, "num_members": self.config.cohort.num_members,
            "shared_stages": self.config.model.shared_stages,
            "num_classes": int(self.model.num_classes), "trainer": self.config.trainer,
            "embed_dim": self.config.model.embed_dim,
            "image_shape": list(self.dataset.train_images.shape[1:]),
            "mean": np.asarray(self.dataset.mean).tolist(),
            "std": np.asarray(self.dataset.std).tolist(),
            "config": self.config.to_json_best_effort()}


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the cohort, evaluating every `eval_every_epochs`; resumes from `workdir`.

  Returns the final evaluation ({"top1": [M + 1], "top5": [M + 1]}, last entry = ensemble)
  and the last step's training metrics.
  """
  from clu import metric_writers, periodic_actions
  trainer = Trainer(config, workdir)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=False)
  ckpt = checkpointing.Checkpointer(workdir, keep=config.checkpoint.keep)
  if trainer.restore_or_keep(ckpt):
    logging.info("Resumed from %s at step %d.", workdir, int(trainer.state.step))
  start_step = int(trainer.state.step)
  spe, total = trainer.steps_per_epoch, trainer.total_steps
  logging.info("Training %s x%d for %d steps (%d per epoch) on %d devices.",
               config.model.arch, config.cohort.num_members, total, spe, trainer.mesh.size)
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                           every_secs=30)
  bar = _progress(total, start_step)
  train_metrics: list[dict] = []
  last_train = {}
  eval_result = None
  t0 = time.time()
  for step, idx in trainer.step_indices():
    local = np.asarray(idx[sharding_lib.process_slice(len(idx))], np.int32)
    trainer.state, metrics = trainer._train_step(
        trainer.state, trainer.train_data, sharding_lib.global_batch(local, trainer.mesh))
    train_metrics.append(metrics)
    done = step + 1
    report(done)
    if bar is not None:
      bar.update(1)
    if done % config.log_every_steps == 0 or done == total:
      last_train = _mean_metrics(train_metrics)
      last_train["learning_rate"] = float(trainer.schedule(step))
      writer.write_scalars(done, {f"train/{k}": v for k, v in last_train.items()})
      if bar is not None:
        bar.set_postfix(loss=f"{last_train['loss']:.3f}")
      train_metrics = []
    epoch_end = done % spe == 0
    if (epoch_end and (done // spe) % config.eval_every_epochs == 0) or done == total:
      eval_result = trainer.evaluate()
      writer.write_scalars(done, flatten_metrics(eval_result, "eval/"))
      logging.info("step %d (epoch %.1f) eval top-1/top-5 %%: %s", done, done / spe,
                   format_accuracy(eval_result))
    if (epoch_end and (done // spe) % config.checkpoint.every_epochs == 0) or done == total:
      ckpt.save(done, trainer.state, trainer.meta())
  if bar is not None:
    bar.close()
  if eval_result is None:  # Resumed after the last step: report the final state anyway.
    eval_result = trainer.evaluate()
  ckpt.close()
  writer.flush()
  logging.info("Finished %d steps in %.1f s. Final eval: %s", total - start_step,
               time.time() - t0, format_accuracy(eval_result))
  return {"eval": eval_result, "train": last_train, "steps": total}


def _mean_metrics(history: list[dict]) -> dict[str, float]:
  host = jax.tree.map(np.asarray, jax.device_get(history))
  mean = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *host)
  return flatten_metrics(mean)
