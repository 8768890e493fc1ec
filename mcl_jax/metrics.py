"""Metrics every trainer reports: top-k counts, cohort accuracy summaries, embedding health.

Pure functions on cohort-first arrays. Accuracy is computed from COUNTS over masked
batches (padding rows carry mask 0), so the sum over an eval split divided by its size is
exact on any device count.

What the paper's tables report: the official scripts print every member's top-1 and keep
`max` over members ("best member", `main_cifar.py` / `main_imagenet.py`); this project
reports each member, the best member, the members' mean and the ensemble (mean of logits).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Mean pairwise cosine of a member's embeddings above which they are called collapsed: the
# in-batch contrastive terms then sit near log(B - 1) per row and give almost no gradient
# (docs/RESULTS.md, "The collapse"). Measured on Fashion-MNIST (resnet32): ~0.93 at
# initialisation (a common component of the all-positive pooled features), 0.99+ while
# collapsed, 0.7-0.85 once the contrastive terms work.
COLLAPSE_COSINE = 0.95


def topk_correct(logits: jax.Array, labels: jax.Array, mask: jax.Array, k: int = 5
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


def embedding_health(embeddings: jax.Array, head_hidden: jax.Array | None = None
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


def cohort_accuracy(counts: dict[str, Any]) -> dict[str, np.ndarray]:
  """{'top1', 'top5'}: fractions [M + 1] (members, then the ensemble) from summed counts."""
  total = float(np.asarray(counts["count"]))
  return {"top1": np.asarray(counts["top1"]) / total, "top5": np.asarray(counts["top5"]) / total}


def accuracy_scalars(accuracy: dict[str, np.ndarray], prefix: str = "") -> dict[str, float]:
  """Named scalars of a cohort accuracy [M + 1] (last = ensemble), e.g. for TensorBoard:
  `top1/member_0`, ..., `top1/best_member`, `top1/members_mean`, `top1/ensemble`."""
  out = {}
  for name, values in accuracy.items():
    values = np.asarray(values, np.float64).reshape(-1)
    members = values[:-1] if values.size > 1 else values
    for m, v in enumerate(members):
      out[f"{prefix}{name}/member_{m}"] = float(v)
    if values.size > 1:
      out[f"{prefix}{name}/best_member"] = float(members.max())
      out[f"{prefix}{name}/members_mean"] = float(members.mean())
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
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(metrics)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)).astype(jnp.float32) if leaves else jnp.ones(())
