"""Metrics: top-k counts with padding, cohort accuracy summaries, embedding health."""
import jax.numpy as jnp
import numpy as np

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
