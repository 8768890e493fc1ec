"""Tests of mcl_jax.losses against docs/SPEC.md 2.

Three independent checks: a float64 NumPy port written from docs/SPEC.md's formulas with plain
loops over member pairs (the opposite structure to the batched einsums of losses.py), the
official PyTorch outputs in tests/data/official_mcl_losses.npz, and invariants (member
permutation, uniform similarities, detached targets, jit, dtypes).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import losses

KEYS = ("vcl", "icl", "soft_vcl", "soft_icl")
T = 3.0


# -------------------------------------------------------------------------------------
# NumPy port of docs/SPEC.md 2 (float64, loops over ordered pairs)
# -------------------------------------------------------------------------------------


def np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_kl(teacher, student, temperature):
  """KL_T(teacher || student), batchmean over rows, times T^2 (docs/SPEC.md 2)."""
  log_p = np_log_softmax(teacher / temperature)
  log_q = np_log_softmax(student / temperature)
  return temperature**2 * np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1))


def np_batch_mcl(z, labels, tau, temperature):
  m, b, _ = z.shape
  sim = {(i, j): z[i] @ z[j].T / tau for i in range(m) for j in range(m)}

  def pair_loss(s):
    rows = []
    for i in range(b):
      others = [k for k in range(b) if k != i]
      log_den = np.log(np.sum(np.exp(s[i, others])))
      pos = [j for j in others if labels[j] == labels[i]]
      if pos:  # rows without a positive are left out (documented in batch_mcl)
        rows.append(np.mean([s[i, j] - log_den for j in pos]))
    return -np.mean(rows) if rows else 0.0

  out = dict(vcl=0.0, icl=0.0, soft_vcl=0.0, soft_icl=0.0)
  for a in range(m):
    out["vcl"] += pair_loss(sim[a, a])
    for c in range(m):
      if a != c:
        out["icl"] += pair_loss(sim[a, c])
        out["soft_vcl"] += np_kl(sim[c, c], sim[a, a], temperature)
        out["soft_icl"] += np_kl(sim[c, a], sim[a, c], temperature)
  return out


def np_multi_positive_ce(logits, num_pos):
  log_prob = np_log_softmax(logits)
  return -np.mean(np.mean(log_prob[:, :num_pos], axis=1))


def np_bank_mcl(z, bank, pos_idx, neg_idx, tau, temperature):
  m, b, _ = z.shape
  idx = np.concatenate([pos_idx, neg_idx], axis=1)
  num_pos = pos_idx.shape[1]

  def icl_logits(a, c):  # rows of bank a, anchors of member c
    return np.stack([bank[a][idx[i]] @ z[c, i] for i in range(b)]) / tau

  def vcl_logits(a):
    return np.stack([bank[a][idx[i, 1:]] @ z[a, i] for i in range(b)]) / tau

  out = dict(vcl=0.0, icl=0.0, soft_vcl=0.0, soft_icl=0.0)
  for a in range(m):
    out["vcl"] += np_multi_positive_ce(vcl_logits(a), num_pos - 1)
    for c in range(m):
      if a != c:
        out["icl"] += np_multi_positive_ce(icl_logits(a, c), num_pos)
        out["soft_vcl"] += np_kl(vcl_logits(c), vcl_logits(a), temperature)
        out["soft_icl"] += np_kl(icl_logits(c, a), icl_logits(a, c), temperature)
  return out


def np_moco_mcl(q, k, queues, tau, temperature):
  m = q.shape[0]

  def logits(a, c):
    pos = np.sum(q[a] * k[c], axis=1, keepdims=True)
    return np.concatenate([pos, q[a] @ queues[c].T], axis=1) / tau

  out = dict(vcl=0.0, icl=0.0, soft_vcl=0.0, soft_icl=0.0)
  for a in range(m):
    out["vcl"] += np_multi_positive_ce(logits(a, a), 1)
    for c in range(m):
      if a != c:
        out["icl"] += np_multi_positive_ce(logits(a, c), 1)
        out["soft_vcl"] += np_kl(logits(c, c), logits(a, a), temperature)
        out["soft_icl"] += np_kl(logits(c, a), logits(a, c), temperature)
  return out


def np_logit_kd(logits, temperature, targets):
  ensemble = logits.mean(axis=0)
  members = range(logits.shape[0]) if targets == "all" else [logits.shape[0] - 1]
  return sum(np_kl(ensemble, logits[i], temperature) for i in members)


# -------------------------------------------------------------------------------------
# Helpers. Every loss runs under jax.jit: besides testing jit, one compile per shape is
# far cheaper on CPU than op-by-op dispatch.
# -------------------------------------------------------------------------------------

BATCH = functools.partial(losses.batch_mcl, tau=0.1, kd_temperature=T)
BANK = functools.partial(losses.bank_mcl, tau=0.07, kd_temperature=T)
MOCO = functools.partial(losses.moco_mcl, tau=0.07, kd_temperature=T)


def unit(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pair_labels(b):
  """Class-aware labels as the "m per class" sampler gives: b/2 classes x 2, shuffled."""
  return np.random.default_rng(b).permutation(np.repeat(np.arange(b // 2), 2))


def f32(x):
  return jnp.asarray(x, jnp.float32)


def assert_losses(got, want, rtol=1e-4, atol=1e-5):
  assert set(got) == set(KEYS)
  for k in KEYS:
    assert got[k].shape == () and got[k].dtype == jnp.float32, k
    np.testing.assert_allclose(float(got[k]), want[k], rtol=rtol, atol=atol, err_msg=k)


def weighted_total(out):
  """The weights of the reference file's grad_total (docs/SPEC.md 6)."""
  return 0.1 * out["vcl"] + out["soft_vcl"] + 0.1 * out["icl"] + out["soft_icl"]


def bank_inputs(rng, m, b=4, n=30, d=8, num_pos=1, num_neg=6):
  z = unit(rng, m, b, d)
  bank = unit(rng, m, n, d)
  pos_idx = np.concatenate([rng.permutation(n)[:b, None], rng.integers(0, n, (b, num_pos))], axis=1)
  neg_idx = rng.integers(0, n, (b, num_neg))
  return z, bank, pos_idx, neg_idx


def moco_inputs(rng, m, b=4, k=10, d=8):
  return unit(rng, m, b, d), unit(rng, m, b, d), unit(rng, m, k, d)


# -------------------------------------------------------------------------------------
# Against the NumPy port, M = 2..6
# -------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [2, 3, 4, 5, 6])
def test_all_regimes_match_numpy(m):
  rng = np.random.default_rng(m)
  z, labels = unit(rng, m, 8, 6), pair_labels(8)
  zb, bank, pos_idx, neg_idx = bank_inputs(rng, m, num_pos=m % 3 + 1)
  q, k, queues = moco_inputs(rng, m)

  @jax.jit
  def run(z, labels, zb, bank, pos_idx, neg_idx, q, k, queues):
    return (BATCH(z, labels), BANK(zb, bank, pos_idx, neg_idx), MOCO(q, k, queues))

  batch, bank_out, moco = run(
    f32(z), labels, f32(zb), f32(bank), pos_idx, neg_idx, f32(q), f32(k), f32(queues)
  )
  assert_losses(batch, np_batch_mcl(z, labels, 0.1, T))
  assert_losses(bank_out, np_bank_mcl(zb, bank, pos_idx, neg_idx, 0.07, T))
  assert_losses(moco, np_moco_mcl(q, k, queues, 0.07, T))


def test_logit_kd_and_kl_div_match_numpy():
  rng = np.random.default_rng(0)
  cohorts = [rng.normal(size=(m, 5, 7)) * 3 for m in (2, 3, 6)]
  s, t = rng.normal(size=(2, 5, 9)) * 4

  @jax.jit
  def run(cohorts, s, t):
    kd = [
      [losses.logit_kd(x, temperature=T, targets=targets) for targets in ("all", "last")]
      for x in cohorts
    ]
    return kd, losses.kl_div(s, t, T)

  kd, kl = run([f32(x) for x in cohorts], f32(s), f32(t))
  for logits, (kd_all, kd_last) in zip(cohorts, kd):
    for got, targets in ((kd_all, "all"), (kd_last, "last")):
      assert got.shape == () and got.dtype == jnp.float32
      np.testing.assert_allclose(float(got), np_logit_kd(logits, T, targets), rtol=1e-5)
  np.testing.assert_allclose(float(kl), np_kl(t, s, T), rtol=1e-5)


def test_batch_rows_without_positive_are_skipped():
  rng = np.random.default_rng(3)
  z = f32(unit(rng, 3, 7, 6))
  labels = np.array([0, 1, 0, 2, 1, 3, 3])  # sample 3 is alone in its class
  run = jax.jit(
    jax.value_and_grad(lambda z, y: (weighted_total(BATCH(z, y)), BATCH(z, y)), has_aux=True)
  )
  (_, out), grad = run(z, labels)
  assert_losses(out, np_batch_mcl(np.asarray(z, np.float64), labels, 0.1, T))
  assert np.all(np.isfinite(grad))
  # No positive anywhere: the CE terms are 0, not NaN.
  (_, alone), grad = run(z, np.arange(7))
  assert float(alone["vcl"]) == 0.0 and float(alone["icl"]) == 0.0
  assert np.all(np.isfinite(grad))


# -------------------------------------------------------------------------------------
# Against the official code (tests/data/official_mcl_losses.npz, docs/SPEC.md 6)
# -------------------------------------------------------------------------------------


def check_reference(fn, x, reference, case, total=weighted_total):
  (_, out), grad = jax.jit(jax.value_and_grad(lambda x: (total(fn(x)), fn(x)), has_aux=True))(x)
  got = np.array([float(out[k]) for k in KEYS])
  np.testing.assert_allclose(got, reference[f"{case}/losses"], rtol=1e-4)
  np.testing.assert_allclose(
    np.asarray(grad), reference[f"{case}/grad_total"], rtol=1e-4, atol=1e-6
  )


def test_reference_sup(reference):
  labels = reference["sup_m2/labels"]
  check_reference(
    lambda z: BATCH(z, labels), f32(reference["sup_m2/embeddings"]), reference, "sup_m2"
  )


def test_reference_bank(reference):
  bank = f32(reference["bank_m2/memory"])
  pos_idx, neg_idx = reference["bank_m2/pos_idx"], reference["bank_m2/neg_idx"]
  check_reference(
    lambda z: BANK(z, bank, pos_idx, neg_idx),
    f32(reference["bank_m2/embeddings"]),
    reference,
    "bank_m2",
  )


def test_reference_moco(reference):
  k = f32(reference["moco_m2/keys"])
  queues = f32(np.swapaxes(reference["moco_m2/queue"], 1, 2))  # official [M, d, K]
  check_reference(
    lambda q: MOCO(q, k, queues),
    f32(reference["moco_m2/queries"]),
    reference,
    "moco_m2",
    total=lambda out: sum(out.values()),
  )  # unweighted


def test_reference_logit(reference):
  logits = f32(reference["logit_m2/logits"])
  for targets in ("all", "last"):
    got = jax.jit(functools.partial(losses.logit_kd, temperature=T, targets=targets))(logits)
    np.testing.assert_allclose(float(got), reference[f"logit_m2/kd_{targets}"], rtol=1e-4)


# -------------------------------------------------------------------------------------
# Invariants
# -------------------------------------------------------------------------------------


def test_member_permutation_invariance():
  rng = np.random.default_rng(7)
  m, perm = 4, np.array([2, 0, 3, 1])
  z, labels = f32(unit(rng, m, 6, 5)), pair_labels(6)
  zb, bank, pos_idx, neg_idx = bank_inputs(rng, m)
  q, k, queues = (f32(x) for x in moco_inputs(rng, m))

  @jax.jit
  def run(p):
    return (
      BATCH(z[p], labels),
      BANK(f32(zb)[p], f32(bank)[p], pos_idx, neg_idx),
      MOCO(q[p], k[p], queues[p]),
    )

  for base, permuted in zip(run(np.arange(m)), run(perm)):
    for key in KEYS:
      np.testing.assert_allclose(float(permuted[key]), float(base[key]), rtol=1e-5)


def test_uniform_similarities():
  m, b, d, p, n_neg, k = 3, 6, 5, 2, 7, 9
  v = f32(unit(np.random.default_rng(0), d))
  same = lambda *shape: jnp.broadcast_to(v, shape + (d,))

  @jax.jit
  def run():
    return {
      "batch": BATCH(same(m, b), pair_labels(b)),
      "bank": BANK(
        same(m, b), same(m, 20), jnp.zeros((b, 1 + p), jnp.int32), jnp.ones((b, n_neg), jnp.int32)
      ),
      "moco": MOCO(same(m, b), same(m, b), same(m, k)),
    }

  pairs = m * (m - 1)
  expected = {  # CE-type terms: log(number of candidates), once per member / ordered pair.
    "batch": (m * math.log(b - 1), pairs * math.log(b - 1)),
    "bank": (m * math.log(p + n_neg), pairs * math.log(1 + p + n_neg)),
    "moco": (m * math.log(1 + k), pairs * math.log(1 + k)),
  }
  for name, out in run().items():
    vcl, icl = expected[name]
    np.testing.assert_allclose(float(out["vcl"]), vcl, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(float(out["icl"]), icl, rtol=1e-5, err_msg=name)
    for key in ("soft_vcl", "soft_icl"):
      np.testing.assert_allclose(float(out[key]), 0.0, atol=1e-6, err_msg=f"{name} {key}")


def kl_undetached(student, teacher, temperature):
  """KL_T without the stop_gradient on the teacher: a gradient leak to compare against."""
  log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student / temperature, axis=-1)
  return temperature**2 * jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def loop_soft_terms(pair_logits, vcl_logits, m):
  """[Soft VCL, Soft ICL] with a Python loop over ordered pairs (Eqs. 6, 7), with the
  teacher detached (losses.kl_div) and, for contrast, not detached."""
  terms = []
  for kl in (losses.kl_div, kl_undetached):
    terms.append(
      sum(kl(vcl_logits(a), vcl_logits(c), T) for a in range(m) for c in range(m) if a != c)
    )
    terms.append(
      sum(kl(pair_logits(a, c), pair_logits(c, a), T) for a in range(m) for c in range(m) if a != c)
    )
  return jnp.stack(terms)


@pytest.mark.parametrize("regime", ["batch", "bank", "moco"])
def test_soft_targets_are_detached(regime):
  """Gradients of the soft terms equal those of a loop with explicitly detached teachers.

  The undetached loop gives a different gradient, so the check has teeth.
  """
  m = 2
  rng = np.random.default_rng(5)
  if regime == "batch":
    z = f32(unit(rng, m, 6, 5))
    fn = lambda z: BATCH(z, pair_labels(6))
    pair = lambda z: lambda a, c: z[a] @ z[c].T / 0.1
    diag = lambda z: lambda a: z[a] @ z[a].T / 0.1
  elif regime == "bank":
    z_np, bank, pos_idx, neg_idx = bank_inputs(rng, m)
    z, bank = f32(z_np), f32(bank)
    idx = np.concatenate([pos_idx, neg_idx], axis=1)
    fn = lambda z: BANK(z, bank, pos_idx, neg_idx)
    pair = lambda z: lambda a, c: jnp.einsum("ikd,id->ik", bank[a][idx], z[c]) / 0.07
    diag = lambda z: lambda a: jnp.einsum("ikd,id->ik", bank[a][idx[:, 1:]], z[a]) / 0.07
  else:
    q, k, queues = (f32(x) for x in moco_inputs(rng, m))
    z = q
    fn = lambda q: MOCO(q, k, queues)
    pair = lambda q: (
      lambda a, c: (
        jnp.concatenate([jnp.sum(q[a] * k[c], axis=1, keepdims=True), q[a] @ queues[c].T], axis=1)
        / 0.07
      )
    )
    diag = lambda q: lambda a: pair(q)(a, a)

  got = jax.jit(jax.jacrev(lambda z: jnp.stack([fn(z)["soft_vcl"], fn(z)["soft_icl"]])))(z)
  loop = jax.jit(jax.jacrev(lambda z: loop_soft_terms(pair(z), diag(z), m)))(z)
  np.testing.assert_allclose(got, loop[:2], rtol=1e-4, atol=1e-5)
  for i in range(2):
    assert not np.allclose(got[i], loop[2 + i], rtol=1e-3, atol=1e-4), KEYS[2 + i]


def test_no_gradient_to_bank_keys_or_queues():
  rng = np.random.default_rng(6)
  z, bank, pos_idx, neg_idx = (jnp.asarray(x) for x in bank_inputs(rng, 3))
  q, k, queues = (f32(x) for x in moco_inputs(rng, 3))

  @jax.jit
  def grads(z, bank, q, k, queues):
    g_bank = jax.grad(
      lambda z, bank: sum(BANK(z, bank, pos_idx, neg_idx).values()), argnums=(0, 1)
    )(z, bank)
    g_moco = jax.grad(lambda *x: sum(MOCO(*x).values()), argnums=(0, 1, 2))(q, k, queues)
    return g_bank, g_moco

  (g_z, g_bank), (g_q, g_k, g_queues) = grads(f32(z), f32(bank), q, k, queues)
  assert np.any(np.asarray(g_z) != 0.0) and np.any(np.asarray(g_q) != 0.0)
  for g in (g_bank, g_k, g_queues):
    assert np.all(np.asarray(g) == 0.0)


def test_logit_kd_teacher_is_detached():
  """d KD / d logits_j is (T / B) (q_j - p) for distilled members and 0 for the others."""
  logits = np.random.default_rng(1).normal(size=(3, 4, 5))
  softmax = lambda x: np.exp(np_log_softmax(x / T))
  expected = T / 4 * (softmax(logits) - softmax(logits.mean(axis=0)))
  for targets, distilled in (("all", [1, 1, 1]), ("last", [0, 0, 1])):
    grad = jax.jit(jax.grad(functools.partial(losses.logit_kd, temperature=T, targets=targets)))(
      f32(logits)
    )
    want = expected * np.array(distilled)[:, None, None]
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_logit_kd_bad_targets():
  with pytest.raises(ValueError, match="targets must be 'all' or 'last'"):
    losses.logit_kd(jnp.zeros((2, 3, 4)), temperature=T, targets="first")


def test_bfloat16_inputs_give_float32():
  rng = np.random.default_rng(8)
  z, labels = unit(rng, 2, 4, 8), pair_labels(4)
  zb, bank, pos_idx, neg_idx = bank_inputs(rng, 2)
  q, k, queues = moco_inputs(rng, 2)
  bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)

  @jax.jit
  def run(z, zb, bank, q, k, queues):
    return (
      BATCH(z, labels),
      BANK(zb, bank, pos_idx, neg_idx),
      MOCO(q, k, queues),
      losses.logit_kd(z, temperature=T),
    )

  batch, bank_out, moco, kd = run(*(bf16(x) for x in (z, zb, bank, q, k, queues)))
  assert kd.dtype == jnp.float32
  # bfloat16 inputs (3 significant digits) still give the float64 loss to a few percent.
  assert_losses(batch, np_batch_mcl(z, labels, 0.1, T), rtol=5e-2, atol=5e-2)
  assert_losses(bank_out, np_bank_mcl(zb, bank, pos_idx, neg_idx, 0.07, T), rtol=5e-2, atol=5e-2)
  assert_losses(moco, np_moco_mcl(q, k, queues, 0.07, T), rtol=5e-2, atol=5e-2)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match=r"\[M, B, d\]"):
    losses.batch_mcl(jnp.zeros((4, 8)), jnp.zeros(4, jnp.int32), tau=0.1, kd_temperature=T)
  with pytest.raises(ValueError, match="labels"):
    losses.batch_mcl(jnp.zeros((2, 4, 8)), jnp.zeros(5, jnp.int32), tau=0.1, kd_temperature=T)
  with pytest.raises(ValueError, match="queues"):
    losses.moco_mcl(
      jnp.zeros((2, 4, 8)), jnp.zeros((2, 4, 8)), jnp.zeros((2, 8, 16)), tau=0.1, kd_temperature=T
    )


# -------------------------------------------------------------------------------------
# CO2 consistency (Wei et al. 2021) for the MoCo regime
# -------------------------------------------------------------------------------------


def np_co2(q, k, queues, temperature, cross):
  """Symmetric KL between the query's and the positive key's softmax over the queue,
  float64, loops over members (and ordered pairs a != b with `cross`)."""
  m = q.shape[0]

  def sym_kl(query, key, queue):
    log_p = np_log_softmax(query @ queue.T / temperature)
    log_r = np_log_softmax(key @ queue.T / temperature)
    p, r = np.exp(log_p), np.exp(log_r)
    return 0.5 * np.mean(np.sum(p * (log_p - log_r) + r * (log_r - log_p), axis=-1))

  total = sum(sym_kl(q[a], k[a], queues[a]) for a in range(m))
  if cross:
    total += sum(sym_kl(q[a], k[b], queues[b]) for a in range(m) for b in range(m) if a != b)
  return total


@pytest.mark.parametrize("m,cross", [(1, False), (2, False), (2, True), (3, True)])
def test_co2_matches_numpy(m, cross):
  q, k, queues = moco_inputs(np.random.default_rng(m), m, b=5, k=12, d=6)
  got = jax.jit(functools.partial(losses.co2, temperature=0.04, cross=cross))(
    f32(q), f32(k), f32(queues)
  )
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), np_co2(q, k, queues, 0.04, cross), rtol=2e-4)
  assert float(got) > 0


def test_co2_is_zero_when_query_and_key_agree():
  q, _, queues = moco_inputs(np.random.default_rng(7), 2)
  assert float(losses.co2(f32(q), f32(q), f32(queues), temperature=0.04)) == pytest.approx(
    0.0, abs=1e-6
  )
  # Across members the distributions differ even then: the cross term is not zero.
  assert float(losses.co2(f32(q), f32(q), f32(queues), temperature=0.04, cross=True)) > 1e-3


def test_co2_gradient_reaches_only_the_query():
  q, k, queues = (f32(x) for x in moco_inputs(np.random.default_rng(8), 2))
  g_q, g_k, g_queues = jax.jit(
    jax.grad(functools.partial(losses.co2, temperature=0.04, cross=True), argnums=(0, 1, 2))
  )(q, k, queues)
  assert np.any(np.asarray(g_q) != 0.0)
  assert np.all(np.asarray(g_k) == 0.0) and np.all(np.asarray(g_queues) == 0.0)


# -------------------------------------------------------------------------------------
# The ramps and the weighted sum (docs/SPEC.md 2.5)
# -------------------------------------------------------------------------------------


def test_interactive_term_ramp_rises_from_near_zero_to_one():
  ramp = 3 * 39.0  # loss.icl_warmup_epochs = 3 at 39 steps per epoch
  at = lambda step: float(losses.interactive_term_ramp(jnp.asarray(step), ramp))  # noqa: E731
  assert at(0) == pytest.approx(1 / ramp) and at(0) < 0.01
  assert at(57) == pytest.approx(58 / ramp)
  assert at(116) == at(117) == at(10_000) == 1.0
  assert float(losses.interactive_term_ramp(jnp.asarray(0), 0.0)) == 1.0  # off


LOSS_CFG = {"vcl_weight": 0.1, "icl_weight": 0.3, "soft_vcl_weight": 1.0, "soft_icl_weight": 2.0}
TERMS = {"vcl": 1.5, "icl": 2.5, "soft_vcl": 0.7, "soft_icl": 0.9}


def weighted_mcl_before_the_interactive_ramp(terms, loss_cfg, soft_scale=1.0, start=0.0):
  """losses.weighted_mcl as it was before `interactive_scale` (the committed results')."""
  weights = losses.mcl_weights(loss_cfg)
  return jnp.asarray(
    sum(
      (
        weights[name] * (soft_scale if name in losses.SOFT_TERMS else 1.0) * terms[name]
        for name in losses.MCL_TERMS
      ),
      start,
    )
  )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("soft_ramp_steps", [0.0, 39.0])
def test_weighted_mcl_with_the_interactive_ramp_off_is_the_old_sum_exactly(soft_ramp_steps, dtype):
  """Bit for bit, also in float64, where a float32 factor of 1 would round the weights
  0.1 and 0.3 (the float64 official-parity test)."""

  @jax.jit
  def both(terms, step):
    soft = losses.soft_term_ramp(step, soft_ramp_steps)
    new = losses.weighted_mcl(
      terms, LOSS_CFG, soft, start=4.0, interactive_scale=losses.interactive_term_ramp(step, 0.0)
    )
    return new, weighted_mcl_before_the_interactive_ramp(terms, LOSS_CFG, soft, start=4.0)

  with jax.enable_x64(dtype == "float64"):
    terms = {k: jnp.asarray(v, dtype) for k, v in TERMS.items()}
    for step in (0, 5, 100):
      new, old = both(terms, jnp.asarray(step))
      assert new.dtype == old.dtype == jnp.dtype(dtype)
      assert float(new) == float(old), step


def test_interactive_scale_multiplies_icl_and_soft_icl_and_soft_icl_gets_both():
  w, t = LOSS_CFG, TERMS
  soft, inter = 0.5, 0.25
  got = float(losses.weighted_mcl(t, w, soft, interactive_scale=inter))
  want = (
    0.1 * t["vcl"]
    + 0.3 * inter * t["icl"]
    + soft * t["soft_vcl"]
    + 2.0 * soft * inter * t["soft_icl"]
  )
  assert got == pytest.approx(want, rel=1e-6)
  # At step 0 of a 3-epoch ramp the interactive terms add almost nothing; VCL still does.
  first = float(losses.interactive_term_ramp(jnp.asarray(0), 117.0))
  alone = 0.1 * t["vcl"] + t["soft_vcl"]
  at_step0 = float(losses.weighted_mcl(t, w, 1.0, interactive_scale=first))
  assert at_step0 - alone == pytest.approx((0.3 * t["icl"] + 2.0 * t["soft_icl"]) / 117.0)
  full = 0.3 * t["icl"] + 2.0 * t["soft_icl"]  # what they add at full weight: 3x VCL's part
  assert at_step0 - alone < 0.01 * full


# -------------------------------------------------------------------------------------
# MoCo ICL against the other member's batch keys (moco.icl_keys = "batch")
# -------------------------------------------------------------------------------------


def np_moco_mcl_batch_keys(q, k, queues, tau, temperature):
  """np_moco_mcl with ICL's logits (a, c) = q_a k_c^T / tau, [B, B], target of row i = i."""
  out = np_moco_mcl(q, k, queues, tau, temperature)
  m = q.shape[0]

  def logits(a, c):
    return q[a] @ k[c].T / tau

  out["icl"] = out["soft_icl"] = 0.0
  for a in range(m):
    for c in range(m):
      if a != c:
        log_p = np_log_softmax(logits(a, c))
        out["icl"] += -np.mean(np.diag(log_p))
        out["soft_icl"] += np_kl(logits(c, a), logits(a, c), temperature)
  return out


def test_batch_icl_logits_are_queries_against_the_other_members_batch_keys():
  q, k, _ = moco_inputs(np.random.default_rng(11), 2, b=5)
  logits = np.asarray(losses.batch_icl_logits(f32(q), f32(k), tau=0.2))
  assert logits.shape == (2, 2, 5, 5)
  np.testing.assert_allclose(logits[0, 1], q[0] @ k[1].T / 0.2, rtol=1e-5, atol=1e-6)
  # The positive, b's key of the same image, is on the diagonal: the queue regime's l_pos.
  np.testing.assert_allclose(
    np.diagonal(logits[0, 1]), np.sum(q[0] * k[1], -1) / 0.2, rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("m", [2, 3])
def test_moco_batch_icl_keys_match_numpy_and_leave_vcl_alone(m):
  q, k, queues = moco_inputs(np.random.default_rng(20 + m), m, b=6)
  run = jax.jit(functools.partial(losses.moco_mcl, tau=0.07, kd_temperature=T, icl_keys="batch"))
  got = run(f32(q), f32(k), f32(queues))
  assert_losses(got, np_moco_mcl_batch_keys(q, k, queues, 0.07, T))
  queue = jax.jit(MOCO)(f32(q), f32(k), f32(queues))
  for name in ("vcl", "soft_vcl"):
    assert float(got[name]) == float(queue[name]), name
  assert abs(float(got["icl"]) - float(queue["icl"])) > 1e-3


def test_moco_queue_icl_keys_is_the_official_default():
  q, k, queues = (f32(x) for x in moco_inputs(np.random.default_rng(30), 2))
  default = jax.jit(MOCO)(q, k, queues)
  queue = jax.jit(functools.partial(MOCO, icl_keys="queue"))(q, k, queues)
  for name in KEYS:
    assert float(default[name]) == float(queue[name]), name
  with pytest.raises(ValueError, match="icl_keys must be one of queue, batch"):
    MOCO(q, k, queues, icl_keys="bank")
