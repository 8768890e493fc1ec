"""Mutual Contrastive Learning losses (docs/SPEC.md 2 and 3).

Every function is pure, jit-able and differentiable, and works on cohort-first arrays: the
leading axis M indexes the cohort members. Each term is a plain, unweighted sum over
members (VCL, Eq. 2 of the paper) or over ordered member pairs (ICL, Eq. 5; Soft VCL,
Eq. 6; Soft ICL, Eq. 7); the caller applies the weights (docs/SPEC.md 2.5).

All M x M ordered pairs are computed at once with batched einsums over the cohort axis
(arrays shaped [M, M, B, L], pair (a, b) at [a, b]) rather than with a Python loop over
pairs, so a cohort of 8 is one kernel, not 56. Results are float32 whatever the input
dtype (float64 for float64 inputs): embeddings are cast to at least float32 before any
similarity is taken (`numerics.at_least_float32`), because softmaxes at temperature 0.07
are too sharp for bfloat16.

Soft targets (the teacher side of every KL term, docs/SPEC.md 2), the memory bank and the MoCo
keys and queues are read through `jax.lax.stop_gradient`, as the official code does with
`.detach()` and `torch.no_grad()`.
"""

from typing import Literal

import jax
import jax.numpy as jnp

from mcl_jax import numerics

Array = jax.Array
LossDict = dict[str, Array]

MCL_TERMS = ("vcl", "icl", "soft_vcl", "soft_icl")
SOFT_TERMS = ("soft_vcl", "soft_icl")
# The terms in which one member learns from another (ICL, Eq. 5; Soft ICL, Eq. 7).
INTERACTIVE_TERMS = ("icl", "soft_icl")


def mcl_weights(loss_cfg) -> dict[str, float]:
  """{term: weight} of the four MCL terms from a `config.loss` section (docs/SPEC.md 2.5)."""
  return {term: float(loss_cfg[f"{term}_weight"]) for term in MCL_TERMS}


def weighted_mcl(
  terms: LossDict,
  loss_cfg,
  soft_scale: Array | float = 1.0,
  start: Array | float = 0.0,
  interactive_scale: Array | float = 1.0,
) -> Array:
  """start + sum over the four MCL terms of weight x term: docs/SPEC.md 2.5, the sum every
  regime trains. The soft terms' weights are multiplied by `soft_scale` (`soft_term_ramp`),
  the interactive terms' (ICL, Soft ICL) by `interactive_scale` (`interactive_term_ramp`);
  Soft ICL gets both."""
  weights = mcl_weights(loss_cfg)

  def scale(name: str) -> Array | float:
    return (soft_scale if name in SOFT_TERMS else 1.0) * (
      interactive_scale if name in INTERACTIVE_TERMS else 1.0
    )

  return jnp.asarray(sum((weights[name] * scale(name) * terms[name] for name in MCL_TERMS), start))


def linear_ramp(step: Array, ramp_steps: float) -> Array | float:
  """min(1, (step + 1) / ramp_steps): 1 / ramp_steps at step 0, 1 from step ramp_steps - 1
  on; without ramp (ramp_steps <= 0) the Python float 1.0.

  Not a float32 array without ramp: weight x 1.0 then stays the Python weight, so the loss
  is bit for bit what it is with no factor at all, in float64 too
  (tests/test_step_parity.py; a float32 1 would round a weight of 0.1)."""
  if ramp_steps <= 0:
    return 1.0
  return jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / ramp_steps)


def soft_term_ramp(step: Array, ramp_steps: float) -> Array | float:
  """The factor on the soft terms' weights: `linear_ramp(step, ramp_steps)`.

  The soft terms are minimised by collapse (identical embeddings make every similarity
  distribution uniform, so every KL is 0) and carry 10x the weight of VCL/ICL in the
  official recipe; ramping them in over the first steps lets VCL/ICL spread the embeddings
  first (docs/RESULTS.md, "The collapse"). `loss.soft_warmup_epochs` sets ramp_steps.
  """
  return linear_ramp(step, ramp_steps)


def interactive_term_ramp(step: Array, ramp_steps: float) -> Array | float:
  """The factor on the interactive terms' weights (ICL, Soft ICL): `linear_ramp`.

  With MoCo on Fashion-MNIST, ICL (a member's queries against the other member's key and
  queue) drove both members into collapse within the first epoch (docs/RESULTS.md, "What
  drives it: ICL"). Ramping it in lets each member first learn alone (VCL, Soft VCL), so
  that the other member's keys carry some structure before they are a target.
  `loss.icl_warmup_epochs` sets ramp_steps.
  """
  return linear_ramp(step, ramp_steps)


# -------------------------------------------------------------------------------------
# Building blocks
# -------------------------------------------------------------------------------------


def kl_div(student_logits: Array, teacher_logits: Array, temperature: float) -> Array:
  """KL_T(teacher || student) of docs/SPEC.md 2 (Hinton et al. distillation, PyTorch "batchmean").

  KL_T(t || s) = T^2 * mean over rows i of sum_j p_ij (log p_ij - log q_ij), with
  p = softmax(t / T) and q = softmax(s / T) along the last axis. The teacher is the soft
  label: it is wrapped in `stop_gradient`, so only the student receives a gradient.

  Args:
    student_logits: [..., C] logits; every leading index is one row.
    teacher_logits: logits of the same shape.
    temperature: the distillation temperature T.

  Returns:
    A float32 scalar.
  """
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
      f"kl_div needs student and teacher logits of one shape, got "
      f"{student_logits.shape} and {teacher_logits.shape}."
    )
  s = numerics.at_least_float32(student_logits).reshape(-1, student_logits.shape[-1])
  t = jax.lax.stop_gradient(numerics.at_least_float32(teacher_logits)).reshape(s.shape)
  log_q = jax.nn.log_softmax(s / temperature, axis=-1)
  log_p = jax.nn.log_softmax(t / temperature, axis=-1)
  return _kl_from_log_probs(log_q, log_p, temperature)


def _kl_from_log_probs(log_q: Array, log_p: Array, temperature: float) -> Array:
  """T^2 * mean over the row axis (-2) of sum_l p (log p - log q); broadcasts [...].

  Taking the difference of log-probabilities elementwise, rather than entropy minus
  cross-entropy, keeps the KL of two close distributions accurate in float32.
  """
  per_row = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return temperature**2 * jnp.mean(per_row, axis=-1)


def _similarity(subscripts: str, *operands: Array) -> Array:
  """Dot products of embeddings in full float32.

  Precision HIGHEST stops TPUs (bfloat16 passes) and GPUs (TF32) from rounding the
  similarities, which 1/tau = 14 then amplifies; these contractions are small next to the
  networks, so the cost is negligible.
  """
  return jnp.einsum(subscripts, *operands, precision=jax.lax.Precision.HIGHEST)


def _off_diagonal_sum(x: Array) -> Array:
  """Sum of x[a, b] over a != b for an [M, M] matrix."""
  m = x.shape[0]
  return jnp.sum(jnp.where(jnp.eye(m, dtype=bool), 0.0, x))


def _soft_vcl(logits: Array, temperature: float) -> Array:
  """Soft VCL (Eq. 6): sum over a != b of KL_T(logits_b || logits_a).

  logits: [M, B, L], one row set per member. The teacher log-probabilities are the
  student's, detached; member a (student) meets member b (teacher) by broadcasting.
  """
  log_q = jax.nn.log_softmax(logits / temperature, axis=-1)  # [M, B, L]
  log_p = jax.lax.stop_gradient(log_q)
  kl = _kl_from_log_probs(log_q[:, None], log_p[None, :], temperature)  # [M, M]: (a, b)
  return _off_diagonal_sum(kl)


def _soft_icl(pair_logits: Array, temperature: float) -> Array:
  """Soft ICL (Eq. 7): sum over a != b of KL_T(logits_(b,a) || logits_(a,b)).

  pair_logits: [M, M, B, L], pair (a, b) at [a, b]. The teacher of pair (a, b) is pair
  (b, a), i.e. the detached array with its two cohort axes swapped.
  """
  log_q = jax.nn.log_softmax(pair_logits / temperature, axis=-1)
  log_p = jax.lax.stop_gradient(jnp.swapaxes(log_q, 0, 1))
  return _off_diagonal_sum(_kl_from_log_probs(log_q, log_p, temperature))


def _positives_first_ce(logits: Array, num_positives: int) -> Array:
  """-mean over rows of mean over the first `num_positives` columns of log_softmax.

  logits: [..., B, L]. Returns [...]. With one positive this is the cross-entropy with
  target 0 (MoCo); with several it is the supervised multi-positive form of docs/SPEC.md 2.2.
  """
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [..., B]
  mean_pos = jnp.mean(logits[..., :num_positives], axis=-1)  # [..., B]
  return jnp.mean(log_z - mean_pos, axis=-1)


def _split_terms(pair_loss: Array) -> tuple[Array, Array]:
  """(sum of the diagonal, sum off the diagonal) of an [M, M] per-pair loss."""
  return jnp.trace(pair_loss), _off_diagonal_sum(pair_loss)


def _check_cohort(name: str, x: Array) -> None:
  if x.ndim != 3:
    raise ValueError(f"{name} must be cohort-first [M, B, d], got shape {x.shape}.")


# -------------------------------------------------------------------------------------
# docs/SPEC.md 2.1: in-batch supervised MCL (CIFAR)
# -------------------------------------------------------------------------------------


def batch_mcl(z: Array, labels: Array, *, tau: float, kd_temperature: float) -> LossDict:
  """In-batch supervised MCL on class-aware batches (docs/SPEC.md 2.1; Eqs. 2, 5, 6, 7).

  For every ordered pair (a, b): S_ab = z_a z_b^T / tau ([B, B]); log_prob_ab[i, j] =
  S_ab[i, j] - log sum_{k != i} exp S_ab[i, k] (the diagonal is left out of the
  denominator, also for a != b); positives of row i are the other samples of its class;
  L_ab = -mean_i mean_{positives j} log_prob_ab[i, j].
  VCL = sum_a L_aa (Eq. 2), ICL = sum_{a != b} L_ab (Eq. 5),
  Soft VCL = sum_{a != b} KL_T(S_bb || S_aa) (Eq. 6),
  Soft ICL = sum_{a != b} KL_T(S_ba || S_ab) (Eq. 7), whole rows with the diagonal.

  Rows without a positive (impossible with the "m per class" sampler; the official code
  returns NaN for them) are left out: L_ab averages over the rows that have at least one
  positive, and is 0 when no row has one.

  Args:
    z: [M, B, d] L2-normalised embeddings (any float dtype; computed in float32).
    labels: [B] integer class labels.
    tau: contrastive temperature (0.1 on CIFAR).
    kd_temperature: T of the soft terms (3); they use logits S / T.

  Returns:
    {"vcl", "icl", "soft_vcl", "soft_icl"}: float32 scalars.
  """
  _check_cohort("z", z)
  if labels.shape != z.shape[1:2]:
    raise ValueError(f"labels must have shape [B] = {z.shape[1:2]}, got {labels.shape}.")
  z = numerics.at_least_float32(z)
  num_rows = z.shape[1]
  # S[a, b, i, j] = z_a[i] . z_b[j] / tau: all M x M similarity matrices in one einsum.
  sim = _similarity("aid,bjd->abij", z, z) / tau

  eye = jnp.eye(num_rows, dtype=bool)
  log_denominator = jax.nn.logsumexp(jnp.where(eye, -jnp.inf, sim), axis=-1)
  log_prob = sim - log_denominator[..., None]  # [M, M, B, B], finite everywhere

  positive = (labels[:, None] == labels[None, :]) & ~eye  # [B, B]
  num_pos = jnp.sum(positive, axis=-1)  # [B]
  has_pos = num_pos > 0
  row_mean = jnp.sum(jnp.where(positive, log_prob, 0.0), axis=-1) / jnp.maximum(num_pos, 1)
  row_mean = jnp.where(has_pos, row_mean, 0.0)
  pair_loss = -jnp.sum(row_mean, axis=-1) / jnp.maximum(jnp.sum(has_pos), 1)  # [M, M]
  vcl, icl = _split_terms(pair_loss)

  diag_sim = jnp.einsum("aaij->aij", sim)  # S_aa, [M, B, B]
  return {
    "vcl": vcl,
    "icl": icl,
    "soft_vcl": _soft_vcl(diag_sim, kd_temperature),
    "soft_icl": _soft_icl(sim, kd_temperature),
  }


# -------------------------------------------------------------------------------------
# docs/SPEC.md 2.2: memory-bank supervised MCL (ImageNet)
# -------------------------------------------------------------------------------------


def bank_mcl_from_similarities(
  sims: Array, *, num_positives: int, tau: float, kd_temperature: float
) -> LossDict:
  """Memory-bank MCL from the similarities of the sampled bank rows (docs/SPEC.md 2.2).

  What `bank_mcl` computes once rows and embeddings have been dotted, e.g. by
  `memory_bank.gather_similarities` on a bank sharded over devices (which moves these
  scalars between devices instead of d-dimensional rows).

  Args:
    sims: [M, M, B, 1 + P + K], sims[a, b, i, k] = V_a[idx_ik] . z_b[i] in float32, with
      idx_i = [own index, P positives, K negatives]; gradients flow to z only.
    num_positives: P (the own row is not counted).
    tau, kd_temperature: as in `bank_mcl`.
  """
  if sims.ndim != 4 or sims.shape[0] != sims.shape[1] or sims.shape[0] < 2:
    raise ValueError(f"sims must have shape [M, M, B, 1 + P + K] with M >= 2, got {sims.shape}.")
  if not 1 <= num_positives < sims.shape[-1]:
    raise ValueError(
      f"num_positives must be in [1, {sims.shape[-1] - 1}] for rows with "
      f"{sims.shape[-1]} columns, got {num_positives}."
    )
  # logits[a, b, i, k] = V_a[idx_ik] . z_b[i] / tau: ICL logits of ordered pair (a, b).
  logits = numerics.at_least_float32(sims) / tau
  icl_pair = _positives_first_ce(logits, 1 + num_positives)  # [M, M]
  # VCL of member a: its own bank against its own embedding, own index left out.
  vcl_logits = jnp.einsum("aaik->aik", logits)[..., 1:]  # [M, B, P + K]
  vcl = jnp.sum(_positives_first_ce(vcl_logits, num_positives))
  return {
    "vcl": vcl,
    "icl": _off_diagonal_sum(icl_pair),
    "soft_vcl": _soft_vcl(vcl_logits, kd_temperature),
    "soft_icl": _soft_icl(logits, kd_temperature),
  }


def bank_mcl_from_rows(
  z: Array, rows: Array, *, num_positives: int, tau: float, kd_temperature: float
) -> LossDict:
  """Memory-bank MCL from already gathered bank rows (docs/SPEC.md 2.2; Eqs. 2, 5, 6, 7).

  Args:
    z: [M, B, d] L2-normalised embeddings.
    rows: [M, B, 1 + P + K, d] with rows[a, i] = V_a[[pos_idx_i, neg_idx_i]]: own row,
      P positives, K negatives. Read with stop_gradient.
    num_positives: P (the own row is not counted).
    tau, kd_temperature: as in `bank_mcl`.
  """
  _check_cohort("z", z)
  if rows.ndim != 4 or rows.shape[:2] != z.shape[:2] or rows.shape[-1] != z.shape[-1]:
    raise ValueError(
      f"rows must have shape [M, B, 1 + P + K, d] matching z {z.shape}, got {rows.shape}."
    )
  rows = numerics.at_least_float32(jax.lax.stop_gradient(rows))
  sims = _similarity("aikd,bid->abik", rows, numerics.at_least_float32(z))
  return bank_mcl_from_similarities(
    sims, num_positives=num_positives, tau=tau, kd_temperature=kd_temperature
  )


def bank_mcl(
  z: Array, bank: Array, pos_idx: Array, neg_idx: Array, *, tau: float, kd_temperature: float
) -> LossDict:
  """Memory-bank supervised MCL (docs/SPEC.md 2.2; Eqs. 2, 5, 6, 7 with bank rows as contrasts).

  ICL, ordered pair (a, b), a != b: the rows V_a[[pos_idx_i, neg_idx_i]] (1 + P + K of
  them, the first 1 + P positive) dotted with z_b[i] / tau; the loss is -mean_i of the mean
  log-softmax over the positives. VCL of member a: rows V_a[[pos_idx_i[1:], neg_idx_i]]
  (own index left out, first P positive) dotted with z_a[i] / tau.
  Soft VCL = sum_{a != b} KL_T(vcl_logits_b || vcl_logits_a);
  Soft ICL = sum_{a != b} KL_T(icl_logits_(b,a) || icl_logits_(a,b)).
  The bank is read with stop_gradient; update it afterwards with `memory_bank.update`.

  Args:
    z: [M, B, d] L2-normalised embeddings.
    bank: [M, N, d] memory bank.
    pos_idx: [B, 1 + P] dataset indices, column 0 the sample's own index.
    neg_idx: [B, K] dataset indices of negatives.
    tau: contrastive temperature (0.07 on ImageNet).
    kd_temperature: T of the soft terms (3).

  Returns:
    {"vcl", "icl", "soft_vcl", "soft_icl"}: float32 scalars.
  """
  if bank.ndim != 3:
    raise ValueError(f"bank must have shape [M, N, d], got {bank.shape}.")
  if pos_idx.ndim != 2 or neg_idx.ndim != 2 or pos_idx.shape[0] != neg_idx.shape[0]:
    raise ValueError(
      f"pos_idx and neg_idx must be [B, 1 + P] and [B, K], got {pos_idx.shape} and {neg_idx.shape}."
    )
  idx = jnp.concatenate([pos_idx, neg_idx], axis=1)
  rows = jnp.take(bank, idx, axis=1)  # [M, B, 1 + P + K, d]
  return bank_mcl_from_rows(
    z, rows, num_positives=pos_idx.shape[1] - 1, tau=tau, kd_temperature=kd_temperature
  )


# -------------------------------------------------------------------------------------
# docs/SPEC.md 2.3: self-supervised MCL on MoCo
# -------------------------------------------------------------------------------------


ICL_KEYS = ("queue", "batch")


def moco_mcl(
  q: Array,
  k: Array,
  queues: Array,
  *,
  tau: float,
  kd_temperature: float,
  icl_keys: str = "queue",
) -> LossDict:
  """MoCo-based self-supervised MCL (docs/SPEC.md 2.3; Eqs. 2, 5, 6, 7 with one positive).

  logits_ab = [q_a . k_b, q_a Q_b^T] / tau, [B, 1 + K], positive at index 0.
  VCL = sum_a CE(logits_aa, 0); ICL = sum_{a != b} CE(logits_ab, 0);
  Soft VCL = sum_{a != b} KL_T(logits_bb || logits_aa);
  Soft ICL = sum_{a != b} KL_T(logits_ba || logits_ab).
  Keys and queues come from the momentum encoders and are read with stop_gradient.

  icl_keys="batch" (not the paper's) builds ICL and Soft ICL from `batch_icl_logits`
  instead: member a's queries against member b's keys of the current batch, [B, B], the
  positive (the same image) on the diagonal, no queue. VCL and Soft VCL are unchanged.

  Args:
    q: [M, B, d] L2-normalised queries (view 1, trained encoders).
    k: [M, B, d] L2-normalised keys (view 2, momentum encoders).
    queues: [M, K, d] one queue of keys per member (the official code stores [M, d, K]).
    tau: contrastive temperature (0.07 MoCo v1, 0.2 MoCo v2).
    kd_temperature: T of the soft terms (3).

  Returns:
    {"vcl", "icl", "soft_vcl", "soft_icl"}: float32 scalars.
  """
  _check_cohort("q", q)
  if k.shape != q.shape:
    raise ValueError(f"k must have the shape of q {q.shape}, got {k.shape}.")
  if queues.ndim != 3 or queues.shape[0] != q.shape[0] or queues.shape[2] != q.shape[2]:
    raise ValueError(f"queues must have shape [M, K, d] matching q {q.shape}, got {queues.shape}.")
  q = numerics.at_least_float32(q)
  k = numerics.at_least_float32(jax.lax.stop_gradient(k))
  queues = numerics.at_least_float32(jax.lax.stop_gradient(queues))
  if icl_keys not in ICL_KEYS:
    raise ValueError(f"icl_keys must be one of {', '.join(ICL_KEYS)}, got {icl_keys!r}.")
  l_pos = _similarity("aid,bid->abi", q, k)[..., None]  # [M, M, B, 1]
  l_neg = _similarity("aid,bkd->abik", q, queues)  # [M, M, B, K]
  logits = jnp.concatenate([l_pos, l_neg], axis=-1) / tau
  vcl, icl = _split_terms(_positives_first_ce(logits, 1))
  soft_vcl = _soft_vcl(jnp.einsum("aaik->aik", logits), kd_temperature)
  if icl_keys == "batch":
    # The queue logits above still serve VCL and Soft VCL (their diagonal pairs a == b);
    # the interactive terms are rebuilt from the batch keys.
    batch_logits = batch_icl_logits(q, k, tau=tau)  # [M, M, B, B]
    # CE with the positive on the diagonal: row i's target is column i.
    diagonal = jnp.diagonal(batch_logits, axis1=-2, axis2=-1)  # [M, M, B]
    per_pair = jnp.mean(jax.nn.logsumexp(batch_logits, axis=-1) - diagonal, axis=-1)
    return {
      "vcl": vcl,
      "icl": _off_diagonal_sum(per_pair),
      "soft_vcl": soft_vcl,
      "soft_icl": _soft_icl(batch_logits, kd_temperature),
    }
  return {
    "vcl": vcl,
    "icl": icl,
    "soft_vcl": soft_vcl,
    "soft_icl": _soft_icl(logits, kd_temperature),
  }


def batch_icl_logits(q: Array, k: Array, *, tau: float) -> Array:
  """[M, M, B, B] logits of member a's queries against member b's keys of this batch.

  logits[a, b, i, j] = q_a[i] . k_b[j] / tau: the positive of row i is column i (b's key of
  the same image), its negatives b's keys of the other images of the batch. Keys are read
  with stop_gradient. All of them come from b's key encoder of this step (a queue holds keys
  of earlier steps); there are B - 1 negatives instead of K. The ICL variant
  `moco.icl_keys = "batch"`.
  """
  q = numerics.at_least_float32(q)
  k = numerics.at_least_float32(jax.lax.stop_gradient(k))
  return _similarity("aid,bjd->abij", q, k) / tau


def co2(q: Array, k: Array, queues: Array, *, temperature: float, cross: bool = False) -> Array:
  """CO2 consistency (Wei et al., "Consistent Contrast for Unsupervised Visual
  Representation Learning", ICLR 2021) of every member, optionally across members.

  For member a, the query's similarity distribution over the negatives of its queue,
  P_a = softmax(q_a Q_a^T / t), is pushed toward the positive key's distribution over the
  same negatives, R_a = softmax(k_a Q_a^T / t), read with stop_gradient (the key comes from
  the momentum encoder): loss_a = mean over the batch of (KL(P_a || R_a) + KL(R_a || P_a)) / 2,
  the paper's symmetric form. The positive itself is not in either distribution. With
  `cross`, also every ordered pair a != b: member a's query against member b's queue and
  key distribution R_b, the interactive counterpart (as ICL is of VCL).

  Args:
    q, k: [M, B, d] L2-normalised queries and keys; queues: [M, K, d].
    temperature: t, the consistency temperature (the paper's 0.04 for MoCo).
    cross: add the member pairs a != b.

  Returns:
    A scalar: the sum over members (and pairs), unweighted like the MCL terms.
  """
  _check_cohort("q", q)
  q = numerics.at_least_float32(q)
  k = numerics.at_least_float32(jax.lax.stop_gradient(k))
  queues = numerics.at_least_float32(jax.lax.stop_gradient(queues))
  log_r = jax.nn.log_softmax(_similarity("bid,bkd->bik", k, queues) / temperature, -1)
  log_p = jax.nn.log_softmax(_similarity("aid,bkd->abik", q, queues) / temperature, -1)
  p, r = jnp.exp(log_p), jnp.exp(log_r)[None]  # [M, M, B, K], R_b broadcast over a
  per_pair = 0.5 * jnp.mean(
    jnp.sum(p * (log_p - log_r[None]) + r * (log_r[None] - log_p), -1), -1
  )  # [M, M]
  own = jnp.trace(per_pair)
  return own + (_off_diagonal_sum(per_pair) if cross else 0.0)


# -------------------------------------------------------------------------------------
# docs/SPEC.md 2.4: logit distillation from the cohort ensemble ("MCL + Logit")
# -------------------------------------------------------------------------------------


def logit_kd(
  logits: Array, *, temperature: float, targets: Literal["all", "last"] = "all"
) -> Array:
  """Logit KD from the detached cohort ensemble (docs/SPEC.md 2.4).

  e = stop_gradient(mean_m logits_m); KD = sum over distilled members m of KL_T(e || logits_m).
  targets="all" distills every member (official CIFAR code with M = 2); "last" only the
  last member (official CIFAR code with M > 2, and the ImageNet code). The official
  ImageNet script forgets to detach the ensemble (gradients reach every member through
  it); this follows docs/SPEC.md 2.4 and the CIFAR script, which detach it.

  Args:
    logits: [M, B, C] class logits of every member.
    temperature: T (3).
    targets: "all" or "last".

  Returns:
    A float32 scalar.
  """
  if targets not in ("all", "last"):
    raise ValueError(f"targets must be 'all' or 'last', got {targets!r}.")
  _check_cohort("logits", logits)
  logits = numerics.at_least_float32(logits)
  ensemble = jax.lax.stop_gradient(jnp.mean(logits, axis=0))
  if targets == "last":
    return kl_div(logits[-1], ensemble, temperature)
  log_q = jax.nn.log_softmax(logits / temperature, axis=-1)  # [M, B, C]
  log_p = jax.nn.log_softmax(ensemble / temperature, axis=-1)  # [B, C]
  return jnp.sum(_kl_from_log_probs(log_q, log_p, temperature))
