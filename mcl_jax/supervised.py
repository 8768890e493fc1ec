"""Supervised MCL: the train state, the step, evaluation, and the task `loop.fit` drives.

`build_task(setup)` makes the supervised task (the contract is in `mcl_jax.loop`); the
command line reaches it through `mcl_jax.jobs.run`. The step is one compiled function for
the whole cohort: M members' forward and backward passes, their cross-entropies, the four
MCL terms over all M x M pairs (in-batch, docs/SPEC.md 2.1, or against the memory bank,
2.2), optional logit KD, and the optimiser update. In-memory datasets (digits,
Fashion-MNIST, CIFAR) live on every device: the step receives only the batch's example
indices, gathers the images and augments them inside the same jit, so the host never
touches pixels; streamed batches (ImageNet) arrive decoded and cropped.
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

from mcl_jax import config_lib
from mcl_jax import loop
from mcl_jax import losses
from mcl_jax import memory_bank
from mcl_jax import metrics as metrics_lib
from mcl_jax import models
from mcl_jax import numerics
from mcl_jax import regimes
from mcl_jax import sharding as sharding_lib
from mcl_jax import train_state
from mcl_jax.data import protocol as data_protocol
from mcl_jax.errors import ConfigError
from mcl_jax.models import layers

# ----------------------------------------------------------------------------- losses


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy per member: logits [M, B, C], labels [B] -> [M]."""
  return optax.softmax_cross_entropy_with_integer_labels(
    numerics.at_least_float32(logits), labels[None, :]
  ).mean(axis=-1)


def total_loss(
  outputs: dict[str, jax.Array],
  labels: jax.Array,
  loss_cfg: ml_collections.ConfigDict,
  *,
  bank_terms: dict[str, jax.Array] | None = None,
  soft_scale: jax.Array | float = 1.0,
  interactive_scale: jax.Array | float = 1.0,
) -> tuple[jax.Array, dict]:
  """docs/SPEC.md 2.5: sum_m CE_m + alpha VCL + beta ICL + gamma SoftVCL + lambda SoftICL (+ KD).

  Terms with weight 0 are not computed at all (the baseline pays nothing for MCL).
  `bank_terms`: the four terms already computed against the memory bank (ImageNet).
  `soft_scale` multiplies the soft terms' weights (`losses.soft_term_ramp`),
  `interactive_scale` the ICL and Soft ICL weights (`losses.interactive_term_ramp`).
  """
  logits = outputs["logits"]
  ce = cross_entropy(logits, labels)
  metrics = {"ce": ce, "accuracy": (logits.argmax(-1) == labels[None]).mean(axis=-1)}
  total = ce.sum()
  weights = losses.mcl_weights(loss_cfg)
  if logits.shape[0] > 1 and any(w != 0 for w in weights.values()):
    terms = bank_terms
    if terms is None:
      terms = losses.batch_mcl(
        outputs["embeddings"], labels, tau=loss_cfg.tau, kd_temperature=loss_cfg.kd_temperature
      )
    metrics.update({name: terms[name] for name in losses.MCL_TERMS})
    total = losses.weighted_mcl(
      terms, loss_cfg, soft_scale, start=total, interactive_scale=interactive_scale
    )
  if loss_cfg.logit_kd_weight != 0:
    kd = losses.logit_kd(
      logits, temperature=loss_cfg.kd_temperature, targets=loss_cfg.logit_kd_targets
    )
    metrics["logit_kd"] = kd
    total = total + loss_cfg.logit_kd_weight * kd
  metrics["loss"] = total
  return total, metrics


# ----------------------------------------------------------------------------- steps


def eval_step(
  state: train_state.TrainState,
  batch: dict[str, jax.Array],
  *,
  model: models.Cohort,
  preprocess: Callable[[jax.Array], jax.Array],
) -> dict:
  """Correct-prediction counts of every member and the ensemble (mean of logits).

  Returns sums, not means: padded examples carry mask 0, so summing over batches and
  dividing by the split size is exact on any device count.
  """
  # Flax types apply's result as output-or-(output, mutated); without `mutable` it is the
  # output alone.
  outputs: dict[str, jax.Array] = model.apply(  # type: ignore[assignment]
    {"params": state.params, "batch_stats": state.batch_stats},
    preprocess(batch["image"]),
    train=False,
  )
  logits = outputs["logits"].astype(jnp.float32)  # [M, B, C]
  logits = jnp.concatenate([logits, logits.mean(axis=0, keepdims=True)], axis=0)
  top1, top5 = metrics_lib.topk_correct(logits, batch["label"], batch["mask"])
  return {"top1": top1, "top5": top5, "count": batch["mask"].astype(jnp.float32).sum()}


@dataclasses.dataclass(frozen=True)
class BankOps:
  """The memory-bank regime's on-device operations (docs/SPEC.md 2.2), bound to a mesh.

  Each step samples 1 + P positives and K negatives per example from the class table and
  dots exactly those rows of the bank [M, N, d] with the batch's embeddings. `layout`
  (memory_bank.LAYOUTS) says where the bank lives:
  - "sharded": split along N over the mesh. `memory_bank.gather_similarities`: each
    device dots the rows it holds; the similarities, not the rows, are reduce-scattered
    to the devices that hold the batch's examples (no all-gather of the bank). After the
    step each example's row is written on the device that owns it (`update_sharded`).
  - "replicated": a copy per device; each device dots only its own examples' candidates
    (`gather_similarities_replicated`) and applies the whole batch's update to its copy
    (`update_replicated`).
  """

  mesh: jax.sharding.Mesh
  num_positives: int
  num_negatives: int
  tau: float
  kd_temperature: float
  gather_chunk: int = 0
  layout: str = "sharded"

  def sample(self, rng, labels, own_idx, table):
    return memory_bank.sample_indices(
      rng,
      labels,
      own_idx,
      table,
      num_positives=self.num_positives,
      num_negatives=self.num_negatives,
    )

  def losses(self, z, bank, pos_idx, neg_idx):
    idx = jnp.concatenate([pos_idx, neg_idx], axis=1)
    gather = (
      memory_bank.gather_similarities_replicated
      if self.layout == "replicated"
      else memory_bank.gather_similarities
    )
    sims = gather(bank, idx, z, self.mesh, chunk_size=self.gather_chunk)
    terms = losses.bank_mcl_from_similarities(
      sims, num_positives=self.num_positives, tau=self.tau, kd_temperature=self.kd_temperature
    )
    # Each member's own VCL [M], for the collapse signal (chance: log(P + K)).
    terms["own_vcl"] = metrics_lib.bank_own_loss(
      sims, num_positives=self.num_positives, tau=self.tau
    )
    return terms

  def update(self, bank, own_idx, z, momentum):
    if self.layout == "replicated":
      return memory_bank.update_replicated(bank, own_idx, z, momentum, self.mesh)
    return memory_bank.update_sharded(bank, own_idx, z, momentum, self.mesh)


def train_step(
  state: train_state.TrainState,
  batch: dict[str, jax.Array],
  consts: dict[str, jax.Array],
  *,
  model: models.Cohort,
  tx: optax.GradientTransformation,
  loss_cfg: ml_collections.ConfigDict,
  materialize: Callable[..., dict[str, jax.Array]] = data_protocol.as_given,
  preprocess: Callable[[jax.Array, jax.Array], jax.Array],
  bank_ops: BankOps | None = None,
  bank_momentum: float = 0.5,
  soft_ramp_steps: float = 0.0,
  icl_ramp_steps: float = 0.0,
  bn_groups: int = 1,
) -> tuple[train_state.TrainState, dict]:
  """One SGD step of the whole cohort.

  batch: what the source's train_batches yielded; `materialize(consts, batch)` (the
  source's, data.protocol.Source) turns it into image [B, ...], label [B], index [B] here,
  on device. consts: the source's device arrays, and the bank's class table.
  soft_ramp_steps: steps over which the soft terms' weights ramp in (losses.soft_term_ramp).
  icl_ramp_steps: steps over which the ICL and Soft ICL weights ramp in
    (losses.interactive_term_ramp).
  bn_groups: BatchNorm statistics per this many groups of consecutive images
    (layers.apply_in_bn_groups; 1: the whole batch).
  """
  batch = materialize(consts, batch)
  rng, aug_rng, sample_rng = jax.random.split(state.rng, 3)
  images = preprocess(aug_rng, batch["image"])
  labels, own_idx = batch["label"], batch["index"]
  if bank_ops is not None:
    pos_idx, neg_idx = bank_ops.sample(sample_rng, labels, own_idx, consts)

  def loss_fn(params):
    def forward(x):
      outputs, mutated = model.apply(
        {"params": params, "batch_stats": state.batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
      )
      return outputs, mutated["batch_stats"]

    outputs, batch_stats = layers.apply_in_bn_groups(forward, images, bn_groups)
    bank_terms = None
    if bank_ops is not None:
      bank_terms = bank_ops.losses(outputs["embeddings"], state.bank, pos_idx, neg_idx)
    loss, metrics = total_loss(
      outputs,
      labels,
      loss_cfg,
      bank_terms=bank_terms,
      soft_scale=losses.soft_term_ramp(state.step, soft_ramp_steps),
      interactive_scale=losses.interactive_term_ramp(state.step, icl_ramp_steps),
    )
    if "embeddings" in outputs:
      # The collapse signals: each member's own contrastive loss against its chance value,
      # log of the candidates in its denominator (bank: P + K rows, own row left out;
      # in-batch: the B - 1 other examples), when the contrastive terms are trained.
      own_loss, candidates = None, None
      if bank_terms is not None:
        own_loss = bank_terms["own_vcl"]
        candidates = bank_ops.num_positives + bank_ops.num_negatives
      elif "vcl" in metrics:
        own_loss = metrics_lib.in_batch_own_loss(outputs["embeddings"], labels, tau=loss_cfg.tau)
        candidates = labels.shape[0] - 1
      metrics.update(
        metrics_lib.cohort_health(
          outputs["embeddings"],
          own_loss=own_loss,
          num_candidates=candidates,
          head_hidden=outputs.get("head_hidden"),
        )
      )
    metrics["finite"] = metrics_lib.all_finite(metrics)
    return loss, (metrics, batch_stats, outputs["embeddings"])

  grads, (metrics, batch_stats, embeddings) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  bank = state.bank
  if bank_ops is not None:  # After the step, from this step's embeddings (official order).
    bank = bank_ops.update(bank, own_idx, embeddings, bank_momentum)
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    batch_stats=batch_stats,
    opt_state=opt_state,
    rng=rng,
    bank=bank,
  )
  return new_state, metrics


# ----------------------------------------------------------------------------- the task


def cohort_eval_scalars(result: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
  """`{split}/{metric}/{member_m|best_member|members_mean|ensemble}`: e.g.
  `test/top1/member_0`, `test/top1/best_member`, `validation/top5/ensemble`."""
  scalars = {}
  for split, accuracy in result.items():
    scalars.update(metrics_lib.accuracy_scalars(accuracy, f"{split}/"))
  return scalars


def format_cohort_eval(result: dict[str, dict[str, np.ndarray]]) -> str:
  return "  |  ".join(
    f"{split} top-1/top-5 %: {metrics_lib.format_cohort_accuracy(acc)}"
    for split, acc in result.items()
  )


class SupervisedTask:
  """The supervised cohort as a `loop.Task`: in-batch or memory-bank MCL (+ logit KD).

  evaluate(state) -> {split: {'top1', 'top5'}}: [M + 1] fractions (members, then the
  ensemble) over the whole test split and, when held out, the validation split.
  """

  # What loop.CollapseWatch's warning recommends (docs/RESULTS.md, "The collapse").
  collapse_remedy = (
    "Ramping the soft terms in over the first epoch "
    "(config.loss.soft_warmup_epochs=1) shortens the collapse of in-batch "
    "MCL on Fashion-MNIST, without always removing it (docs/RESULTS.md)."
  )
  # Healthy runs start below the cosine limit (about 0.93 on Fashion-MNIST): judged at once.
  collapse_cosine_grace_epochs = 0.0

  def __init__(self, setup: loop.Setup):
    self.setup = setup
    config, mesh, source = setup.config, setup.mesh, setup.source
    self.num_classes = train_state.num_classes(config, source)
    self.model = train_state.build_model(config, self.num_classes)
    self.describe = f"Training {config.model.arch} x{config.cohort.num_members}"
    self.eval_every_epochs = config.eval_every_epochs
    self.consts = setup.device_arrays()
    self.bank_ops, self.bank_rows = None, 0
    if config.loss.regime == "bank" and any(losses.mcl_weights(config.loss).values()):
      self.bank_rows = source.num_train
      table = memory_bank.class_index_table(np.asarray(source.train_labels), self.num_classes)
      replicated = sharding_lib.replicated(mesh)
      self.consts.update({k: jax.device_put(v, replicated) for k, v in table.items()})
      self.bank_ops = BankOps(
        mesh,
        config.bank.num_positives,
        config.bank.num_negatives,
        config.loss.tau,
        config.loss.kd_temperature,
        config.bank.gather_chunk,
        config.bank.layout,
      )
    self.shardings = train_state.state_shardings(
      self.abstract_state(), mesh, bank_layout=config.bank.layout
    )
    self.compiled_train_step = sharding_lib.compile_step(
      functools.partial(
        train_step,
        model=self.model,
        tx=setup.tx,
        loss_cfg=config.loss,
        materialize=source.materialize,
        preprocess=source.train_preprocess,
        bank_ops=self.bank_ops,
        bank_momentum=config.bank.momentum,
        soft_ramp_steps=config.loss.soft_warmup_epochs * setup.steps_per_epoch,
        icl_ramp_steps=config.loss.icl_warmup_epochs * setup.steps_per_epoch,
        bn_groups=layers.num_bn_groups(config.input.global_batch_size, config.model.bn_group_size),
      ),
      self.shardings,
      mesh,
    )
    self.compiled_eval_step = jax.jit(
      functools.partial(eval_step, model=self.model, preprocess=source.eval_preprocess)
    )

  def abstract_state(self) -> train_state.TrainState:
    return train_state.abstract_train_state(
      self.model,
      self.setup.tx,
      self.setup.source.image_shape,
      self.setup.mesh,
      bank_rows=self.bank_rows,
      bank_dtype=self.setup.config.bank.dtype,
    )

  def init_state(self) -> train_state.TrainState:
    return train_state.create_train_state(
      self.model,
      self.setup.tx,
      self.setup.source.image_shape,
      jax.random.PRNGKey(self.setup.config.seed),
      self.setup.mesh,
      bank_rows=self.bank_rows,
      bank_layout=self.setup.config.bank.layout,
      bank_dtype=self.setup.config.bank.dtype,
    )

  def eval_step_inputs(self, state: Any, batch: dict[str, Any]) -> tuple:
    return (state, batch)

  def train_step(
    self, state: train_state.TrainState, batch: dict[str, jax.Array]
  ) -> tuple[train_state.TrainState, dict]:
    return self.compiled_train_step(state, batch, self.consts)

  def evaluate_split(
    self, state: train_state.TrainState, split: str = "test"
  ) -> dict[str, np.ndarray]:
    """Top-1/top-5 [M + 1] of every member and the ensemble over one whole split."""
    return metrics_lib.cohort_accuracy(
      loop.count_over_split(self.setup, split, lambda batch: self.compiled_eval_step(state, batch))
    )

  def evaluate(self, state: train_state.TrainState) -> dict[str, dict[str, np.ndarray]]:
    return {
      split: self.evaluate_split(state, split) for split in self.setup.source.eval_split_names()
    }

  eval_scalars = staticmethod(cohort_eval_scalars)
  format_eval = staticmethod(format_cohort_eval)

  def meta(self) -> dict[str, Any]:
    return loop.export_meta(self.setup, num_classes=self.num_classes)


# ----------------------------------------------------------------------------- the regime


def check_config(config: ml_collections.ConfigDict) -> None:
  """The supervised regime's own config checks (config_lib.validate runs them)."""
  loss = config.loss
  if config.model.head == "none" and any(
    loss[f"{t}_weight"] for t in ("vcl", "icl", "soft_vcl", "soft_icl")
  ):
    raise ConfigError(
      "config.model.head='none' leaves the contrastive terms no embeddings; "
      "use 'mlp' or 'linear', or set the MCL weights to 0."
    )
  layers.check_bn_group_size(
    config.model.bn_group_size,
    config.input.global_batch_size,
    "model.bn_group_size",
    "the whole batch",
  )
  per_class = config.input.samples_per_class
  if loss.regime == "batch" and config_lib.mcl_terms_on(config) and per_class < 2:
    raise ConfigError(
      f"config.input.samples_per_class={per_class}: in-batch MCL needs class-aware "
      "batches with at least 2 samples per class so every row has a positive."
    )


def contrastive_candidates(config: ml_collections.ConfigDict) -> int:
  """A member's own VCL ranks its positive among the B - 1 other examples of the batch, or
  among the P + K rows it samples from the bank."""
  if config.loss.regime == "bank":
    return config.bank.num_positives + config.bank.num_negatives
  return config.input.global_batch_size - 1


REGIME = regimes.Regime(
  name="supervised",
  module=__name__,
  loss_regimes=("batch", "bank"),
  class_aware_batches=True,
  check=check_config,
  contrastive_candidates=contrastive_candidates,
  export_note=lambda meta: "the member's trained classifier",
)


def build_task(setup: loop.Setup) -> SupervisedTask:
  return SupervisedTask(setup)
