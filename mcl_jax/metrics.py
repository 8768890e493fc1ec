"""Metrics every trainer reports: top-k counts, cohort accuracy summaries, embedding health.

Pure functions on cohort-first arrays. Accuracy is computed from COUNTS over masked
batches (padding rows carry mask 0), so the sum over an eval split divided by its size is
exact on any device count.

What the paper's tables report: the official scripts print every member's top-1 and keep
`max` over members ("best member", `main_cifar.py` / `main_imagenet.py`); this project
reports each member, the best member, the members' mean and the ensemble (mean of logits).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax import losses

# Mean pairwise cosine of a member's embeddings above which they are called collapsed: the
# in-batch contrastive terms then sit near log(B - 1) per row and give almost no gradient
# (docs/RESULTS.md, "The collapse", has the cosines healthy and collapsed runs log: the
# threshold sits between a fresh head's and a collapsed one's).
COLLAPSE_COSINE = 0.95

# A member's own contrastive loss divided by its chance value (`contrastive_vs_chance`)
# above which it is called collapsed, once COLLAPSE_GRACE_EPOCHS of training are done:
# every candidate then scores about the same. Chosen from the committed Fashion-MNIST logs
# (docs/MOCO.md, "Collapse"): healthy runs sit clearly below it after the first epoch, the
# collapsed MoCo + MCL members above it. Near chance is also where every run STARTS (random
# embeddings; MoCo's queue still filling), hence the grace period.
COLLAPSE_LOSS_RATIO = 0.95
COLLAPSE_GRACE_EPOCHS = 1.0


def topk_correct(
  logits: jax.Array, labels: jax.Array, mask: jax.Array, k: int = 5
) -> tuple[jax.Array, jax.Array]:
  """Masked counts of correct top-1 and top-k predictions.

  logits [..., B, C], labels [B], mask [B] (0 on padding) -> two arrays of shape [...].
  """
  k = min(k, logits.shape[-1])
  top = jax.lax.top_k(logits, k)[1]
  mask = mask.astype(jnp.float32)
  correct_k = (top == labels[:, None]).any(-1)
  correct_1 = top[..., 0] == labels
  return (correct_1 * mask).sum(-1), (correct_k * mask).sum(-1)


def embedding_health(
  embeddings: jax.Array, head_hidden: jax.Array | None = None
) -> dict[str, jax.Array]:
  """Per member: how spread its embeddings are within the batch.

  embeddings [M, B, d] L2-normalised -> 'embed_cosine' [M], the mean cosine over pairs
  i != j ((||sum_i z_i||^2 - B) / (B (B - 1)), no B x B matrix); 1 means every embedding
  points the same way. head_hidden [M, B, h] (the projection head's first-layer
  pre-activations) -> 'head_dead_units' [M], the fraction of its ReLU units that are off
  for every example of the batch.
  """
  z = jax.lax.stop_gradient(embeddings).astype(jnp.float32)
  b = z.shape[1]
  total = jnp.sum(z, axis=1)
  cosine = (jnp.sum(total * total, -1) - jnp.sum(z * z, (1, 2))) / (b * (b - 1))
  health = {"embed_cosine": cosine}
  if head_hidden is not None:
    dead = jnp.all(jax.lax.stop_gradient(head_hidden) <= 0, axis=1)  # [M, h]
    health["head_dead_units"] = dead.astype(jnp.float32).mean(-1)
  return health


def contrastive_vs_chance(own_loss: jax.Array, num_candidates: int) -> jax.Array:
  """Each member's own contrastive loss [M] over its chance value log(num_candidates).

  `num_candidates`: the terms in the loss's softmax denominator (for InfoNCE, the positive
  and the negatives). When every candidate scores the same the loss is exactly
  log(num_candidates), so a ratio near 1 means the member tells nothing apart; a ratio
  near 0 means the positives win by a wide margin.
  """
  return jax.lax.stop_gradient(own_loss).astype(jnp.float32) / math.log(num_candidates)


def in_batch_own_loss(z: jax.Array, labels: jax.Array, *, tau: float) -> jax.Array:
  """[M]: each member's own in-batch contrastive loss L_aa (the summand of
  `losses.batch_mcl`'s VCL) on detached embeddings z [M, B, d]; chance is log(B - 1)
  (the diagonal is left out of the denominator)."""

  def own(zm):
    return losses.batch_mcl(zm[None], labels, tau=tau, kd_temperature=1.0)["vcl"]

  return jax.vmap(own)(jax.lax.stop_gradient(z))


def bank_own_loss(sims: jax.Array, *, num_positives: int, tau: float) -> jax.Array:
  """[M]: each member's own memory-bank contrastive loss (the summand of
  `losses.bank_mcl_from_similarities`' VCL) from its similarities sims [M, M, B, 1 + P + K]:
  its own row left out, P positives first; chance is log(P + K)."""
  own = jnp.einsum("aaik->aik", jax.lax.stop_gradient(sims)).astype(jnp.float32)[..., 1:] / tau
  log_z = jax.nn.logsumexp(own, axis=-1)
  return jnp.mean(log_z - jnp.mean(own[..., :num_positives], axis=-1), axis=-1)


def cohort_health(
  embeddings: jax.Array,
  *,
  own_loss: jax.Array | None = None,
  num_candidates: int | None = None,
  head_hidden: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """A regime's per-member collapse signals, [M] each: `embedding_health` (embed_cosine,
  head_dead_units with an MLP head) and, when the member's own contrastive loss is given,
  `contrastive_vs_chance`. `loop.CollapseWatch` reads them from the logged metrics."""
  health = embedding_health(embeddings, head_hidden)
  if own_loss is not None:
    if num_candidates is None:
      raise ValueError(
        "cohort_health: own_loss needs num_candidates (its chance value is log(num_candidates))."
      )
    health["contrastive_vs_chance"] = contrastive_vs_chance(own_loss, num_candidates)
  return health


def first_collapse(
  train_metrics: dict[str, float], *, check_loss: bool, check_cosine: bool = True
) -> dict[str, object] | None:
  """The first collapse signal in flattened logged metrics (`embed_cosine/member_m`,
  `contrastive_vs_chance/member_m`), or None: {'member': m, 'signal': name, 'value': v}.

  The loss ratio is read only when `check_loss` (after the grace period, since every run
  starts near chance), the cosine only when `check_cosine` (the self-supervised regimes'
  embeddings start nearly parallel in healthy runs too: they get the same grace period).
  """
  limits = {"embed_cosine": COLLAPSE_COSINE} if check_cosine else {}
  if check_loss:
    limits["contrastive_vs_chance"] = COLLAPSE_LOSS_RATIO
  for name, value in sorted(train_metrics.items()):
    signal, _, member = name.partition("/member_")
    if signal in limits and member.isdigit() and value > limits[signal]:
      return {"member": int(member), "signal": signal, "value": float(value)}
  return None


def cohort_accuracy(counts: dict[str, Any]) -> dict[str, np.ndarray]:
  """{'top1', 'top5'}: fractions [M + 1] (members, then the ensemble) from summed counts."""
  total = float(np.asarray(counts["count"]))
  return {"top1": np.asarray(counts["top1"]) / total, "top5": np.asarray(counts["top5"]) / total}


def member_scalars(
  members: np.ndarray, prefix: str, summaries: bool | None = None
) -> dict[str, float]:
  """`{prefix}/member_m` for each member's value, and `{prefix}/best_member`,
  `{prefix}/members_mean` (by default when there are several members): the one naming
  scheme of every evaluation (`{split}/{metric}/...`)."""
  members = np.asarray(members, np.float64).reshape(-1)
  out = {f"{prefix}/member_{m}": float(v) for m, v in enumerate(members)}
  if members.size > 1 if summaries is None else summaries:
    out[f"{prefix}/best_member"] = float(members.max())
    out[f"{prefix}/members_mean"] = float(members.mean())
  return out


def accuracy_scalars(accuracy: dict[str, np.ndarray], prefix: str = "") -> dict[str, float]:
  """Named scalars of a cohort accuracy [M + 1] (last = ensemble), e.g. for TensorBoard:
  `top1/member_0`, ..., `top1/best_member`, `top1/members_mean`, `top1/ensemble`."""
  out = {}
  for name, values in accuracy.items():
    values = np.asarray(values, np.float64).reshape(-1)
    members = values[:-1] if values.size > 1 else values
    out.update(member_scalars(members, f"{prefix}{name}", summaries=values.size > 1))
    if values.size > 1:
      out[f"{prefix}{name}/ensemble"] = float(values[-1])
  return out


def format_cohort_accuracy(accuracy: dict[str, np.ndarray]) -> str:
  """'member 0: 85.10/99.20  member 1: ...  best member: 85.40  ensemble: 86.00/99.30' (%)."""
  top1, top5 = np.asarray(accuracy["top1"]), np.asarray(accuracy["top5"])
  m = top1.size - 1
  cells = [f"member {i}: {100 * top1[i]:.2f}/{100 * top5[i]:.2f}" for i in range(m)]
  cells.append(f"best member: {100 * top1[:m].max():.2f}")
  cells.append(f"ensemble: {100 * top1[m]:.2f}/{100 * top5[m]:.2f}")
  return "  ".join(cells)


def all_finite(metrics: dict[str, Any]) -> jax.Array:
  """1.0 when every floating-point metric of a step (losses, accuracies, ...) is finite,
  else 0.0: the divergence guard of `mcl_jax.loop` reads it before every checkpoint."""
  leaves = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(metrics)
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
  ]
  return jnp.all(jnp.stack(leaves)).astype(jnp.float32) if leaves else jnp.ones(())
