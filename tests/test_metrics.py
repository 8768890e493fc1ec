"""Metrics: top-k counts with padding, cohort accuracy summaries, embedding health, the
collapse signals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax import losses
from mcl_jax import metrics


def test_topk_counts_leave_padding_out():
  logits = jnp.asarray([[[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.9, 0.0, 0.1]]])
  labels = jnp.asarray([1, 1, 2, 0])
  mask = jnp.asarray([1, 1, 1, 0])  # the last row is padding (it would count as correct)
  top1, top2 = metrics.topk_correct(logits, labels, mask, k=2)
  np.testing.assert_array_equal(top1, [2.0])  # rows 0 and 2
  np.testing.assert_array_equal(top2, [3.0])  # row 1's label is its second choice


def test_embedding_health_equals_the_pairwise_definition():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 16, 8)) + np.asarray([0.0, 1.0, 5.0])[:, None, None]  # growing bias
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  hidden = rng.normal(size=(3, 16, 6))
  hidden[1, :, 2] = -np.abs(hidden[1, :, 2])  # unit 2 of member 1 never fires
  hidden[2] = -np.abs(hidden[2])  # every unit of member 2 is dead
  health = metrics.embedding_health(jnp.asarray(z, jnp.float32), jnp.asarray(hidden))
  for m in range(3):
    s = z[m] @ z[m].T
    expected = (s.sum() - np.trace(s)) / (16 * 15)
    np.testing.assert_allclose(health["embed_cosine"][m], expected, atol=1e-5)
  assert health["embed_cosine"][2] > 0.9 > health["embed_cosine"][0]  # collapsed vs spread
  np.testing.assert_allclose(health["head_dead_units"], [0.0, 1 / 6, 1.0])


def test_accuracy_scalars_name_members_best_mean_and_ensemble():
  acc = {"top1": np.asarray([0.8, 0.9, 0.7, 0.95])}  # three members, then the ensemble
  scalars = metrics.accuracy_scalars(acc, "eval/")
  assert scalars["eval/top1/member_2"] == 0.7 and scalars["eval/top1/best_member"] == 0.9
  np.testing.assert_allclose(scalars["eval/top1/members_mean"], 0.8)
  assert scalars["eval/top1/ensemble"] == 0.95 and "eval/top1/member_3" not in scalars
  line = metrics.format_cohort_accuracy({"top1": acc["top1"], "top5": np.ones(4)})
  assert "best member: 90.00" in line and "ensemble: 95.00/100.00" in line


def unit_rows(rng, *shape):
  z = rng.normal(size=shape)
  return jnp.asarray(z / np.linalg.norm(z, axis=-1, keepdims=True), jnp.float32)


def test_own_in_batch_loss_is_the_vcl_summand_and_chance_is_log_b_minus_1():
  z, labels = unit_rows(np.random.default_rng(0), 3, 12, 8), jnp.arange(12) // 3
  own_loss = jax.jit(functools.partial(metrics.in_batch_own_loss, tau=0.1))
  own = own_loss(z, labels)
  vcl = jax.jit(functools.partial(losses.batch_mcl, tau=0.1, kd_temperature=3.0))(z, labels)["vcl"]
  assert own.shape == (3,)
  np.testing.assert_allclose(own.sum(), vcl, rtol=1e-5)
  same = jnp.broadcast_to(z[:, :1], z.shape)  # every embedding of a member the same
  ratio = metrics.contrastive_vs_chance(own_loss(same, labels), 11)
  np.testing.assert_allclose(ratio, 1.0, rtol=1e-5)


def test_own_bank_loss_is_the_vcl_summand_and_chance_is_log_p_plus_k():
  sims = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 2, 6, 1 + 3 + 10)), jnp.float32)
  own_loss = jax.jit(functools.partial(metrics.bank_own_loss, num_positives=3, tau=0.07))
  own = own_loss(sims)
  vcl = jax.jit(
    functools.partial(
      losses.bank_mcl_from_similarities, num_positives=3, tau=0.07, kd_temperature=3.0
    )
  )(sims)["vcl"]
  np.testing.assert_allclose(own.sum(), vcl, rtol=1e-5)
  flat = own_loss(jnp.full_like(sims, 0.3))
  np.testing.assert_allclose(metrics.contrastive_vs_chance(flat, 3 + 10), 1.0, rtol=1e-5)


def test_first_collapse_reads_either_signal_from_flattened_metrics():
  healthy = {
    "loss": 3.0,
    "embed_cosine/member_0": 0.5,
    "embed_cosine/member_1": 0.6,
    "contrastive_vs_chance/member_0": 0.8,
    "contrastive_vs_chance/member_1": 0.85,
  }
  assert metrics.first_collapse(healthy, check_loss=True) is None
  at_chance = {**healthy, "contrastive_vs_chance/member_1": 0.99}
  assert metrics.first_collapse(at_chance, check_loss=False) is None  # grace period
  assert metrics.first_collapse(at_chance, check_loss=True) == {
    "member": 1,
    "signal": "contrastive_vs_chance",
    "value": 0.99,
  }
  one_way = {**healthy, "embed_cosine/member_0": 0.97}
  assert metrics.first_collapse(one_way, check_loss=False)["signal"] == "embed_cosine"
  # The self-supervised regimes' grace covers the cosine too (their healthy starts are high).
  assert metrics.first_collapse(one_way, check_loss=False, check_cosine=False) is None


def test_collapse_watch_does_not_judge_the_cosine_in_its_grace_period():
  from mcl_jax import loop

  watch = loop.CollapseWatch("", grace_steps=39, cosine_grace_steps=39)
  start = {"embed_cosine/member_0": 0.98, "contrastive_vs_chance/member_0": 0.82}
  watch.check(13, start)  # a healthy MoCo run's first log (docs/RESULTS.md)
  assert watch.first is None
  watch.check(39, start)
  assert watch.first == {"step": 39, "member": 0, "signal": "embed_cosine", "value": 0.98}


def test_collapse_watch_warns_once_with_the_remedy_and_keeps_the_first(caplog):
  from mcl_jax import loop

  watch = loop.CollapseWatch("Try the remedy.", grace_steps=10)
  at_chance = {"contrastive_vs_chance/member_0": 0.99, "embed_cosine/member_0": 0.5}
  watch.check(5, at_chance)
  assert watch.first is None
  with caplog.at_level("WARNING"):
    watch.check(10, at_chance)
    watch.check(20, {"embed_cosine/member_0": 0.99})
  assert watch.first == {"step": 10, "member": 0, "signal": "contrastive_vs_chance", "value": 0.99}
  warnings = [r.getMessage() for r in caplog.records if "collapsed" in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].endswith("Try the remedy.")
