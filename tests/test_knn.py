"""Weighted kNN (InstDisc): known answers, the exp(sim / t) weighting, k > N, chunking."""

import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import knn


def _numpy_knn(train, train_labels, query, num_classes, k, t):
  """Independent NumPy port: full similarity matrix, argsort, weighted votes."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  query = query / np.linalg.norm(query, axis=1, keepdims=True)
  sim = query @ train.T
  k = min(k, train.shape[0])
  idx = np.argsort(-sim, axis=1)[:, :k]
  scores = np.zeros((query.shape[0], num_classes))
  for q in range(query.shape[0]):
    for j in idx[q]:
      scores[q, train_labels[j]] += np.exp(sim[q, j] / t)
  return scores.argmax(1), scores


def test_separated_gaussian_clusters_are_classified_perfectly():
  rng = np.random.default_rng(0)
  num_classes, dim = 4, 16
  centres = 10.0 * np.eye(num_classes, dim)

  def sample(n):
    y = rng.integers(0, num_classes, n)
    return centres[y] + 0.3 * rng.normal(size=(n, dim)), y

  train, train_y = sample(200)
  query, query_y = sample(50)
  acc = knn.knn_accuracy(
    jnp.asarray(train),
    jnp.asarray(train_y),
    jnp.asarray(query),
    jnp.asarray(query_y),
    num_classes=num_classes,
    k=20,
    chunk_size=16,
  )
  assert float(acc) == 1.0


def test_weighted_votes_beat_majority():
  # Query along e0. One class-0 neighbour is identical to the query (cos 1); three class-1
  # neighbours are at 60 degrees (cos 0.5). A majority vote says class 1; InstDisc's
  # weights say class 0, since exp(1 / 0.07) > 3 exp(0.5 / 0.07).
  s = np.sqrt(0.75)
  train = np.array([[1.0, 0.0, 0.0], [0.5, s, 0.0], [0.5, 0.0, s], [0.5, -s, 0.0]], np.float32)
  train_y = np.array([0, 1, 1, 1])
  query = np.array([[2.0, 0.0, 0.0]], np.float32)  # Not unit length: normalised inside.
  pred, scores = knn.knn_predict(
    jnp.asarray(train), jnp.asarray(train_y), jnp.asarray(query), num_classes=3, k=4
  )
  assert int(pred[0]) == 0
  t = knn.DEFAULT_TEMPERATURE
  np.testing.assert_allclose(
    np.asarray(scores[0]), [np.exp(1 / t), 3 * np.exp(0.5 / t), 0.0], rtol=1e-4
  )
  # A large temperature flattens the weights towards a plain majority vote.
  pred_flat, _ = knn.knn_predict(
    jnp.asarray(train),
    jnp.asarray(train_y),
    jnp.asarray(query),
    num_classes=3,
    k=4,
    temperature=100.0,
  )
  assert int(pred_flat[0]) == 1


def test_k_larger_than_train_set_uses_every_row():
  rng = np.random.default_rng(1)
  train = rng.normal(size=(7, 5)).astype(np.float32)
  train_y = rng.integers(0, 3, 7)
  query = rng.normal(size=(5, 5)).astype(np.float32)
  pred, scores = knn.knn_predict(
    jnp.asarray(train), jnp.asarray(train_y), jnp.asarray(query), num_classes=3
  )  # k=200
  ref_pred, ref_scores = _numpy_knn(train, train_y, query, 3, 7, knn.DEFAULT_TEMPERATURE)
  np.testing.assert_allclose(np.asarray(scores), ref_scores, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(pred), ref_pred)


@pytest.mark.parametrize("chunk_size,train_chunk_size", [(4, None), (7, 16), (1000, 9)])
def test_chunked_equals_unchunked_and_numpy(chunk_size, train_chunk_size):
  rng = np.random.default_rng(2)
  train = rng.normal(size=(60, 8)).astype(np.float32)
  train_y = rng.integers(0, 5, 60)
  query = rng.normal(size=(23, 8)).astype(np.float32)  # Not a multiple of any chunk.
  args = (jnp.asarray(train), jnp.asarray(train_y), jnp.asarray(query))
  full_pred, full_scores = knn.knn_predict(*args, num_classes=5, k=10, chunk_size=1024)
  pred, scores = knn.knn_predict(
    *args, num_classes=5, k=10, chunk_size=chunk_size, train_chunk_size=train_chunk_size
  )
  np.testing.assert_allclose(np.asarray(scores), np.asarray(full_scores), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(pred), np.asarray(full_pred))
  ref_pred, ref_scores = _numpy_knn(train, train_y, query, 5, 10, knn.DEFAULT_TEMPERATURE)
  np.testing.assert_allclose(np.asarray(scores), ref_scores, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(pred), ref_pred)


def test_masks_leave_padding_out():
  rng = np.random.default_rng(3)
  train = rng.normal(size=(20, 6)).astype(np.float32)
  train_y = rng.integers(0, 3, 20)
  query = rng.normal(size=(9, 6)).astype(np.float32)
  query_y = rng.integers(0, 3, 9)
  # Padding rows in the train set: garbage features and an out-of-range label.
  padded_train = np.concatenate([train, 100 * query[:4]])
  padded_y = np.concatenate([train_y, np.full(4, 7)])
  mask = np.arange(24) < 20
  pred, scores = knn.knn_predict(
    jnp.asarray(padded_train),
    jnp.asarray(padded_y),
    jnp.asarray(query),
    num_classes=3,
    k=5,
    train_mask=jnp.asarray(mask),
    train_chunk_size=8,
  )
  ref_pred, ref_scores = _numpy_knn(train, train_y, query, 3, 5, knn.DEFAULT_TEMPERATURE)
  np.testing.assert_allclose(np.asarray(scores), ref_scores, rtol=1e-4)
  # Query padding: accuracy over the real rows only.
  qmask = np.arange(9) < 6
  acc = knn.knn_accuracy(
    jnp.asarray(train),
    jnp.asarray(train_y),
    jnp.asarray(query),
    jnp.asarray(query_y),
    num_classes=3,
    k=5,
    query_mask=jnp.asarray(qmask),
  )
  np.testing.assert_allclose(float(acc), np.mean(ref_pred[:6] == query_y[:6]), rtol=1e-6)
  del pred


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="differ in width"):
    knn.knn_predict(jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32), jnp.zeros((2, 5)), num_classes=2)


def test_sharded_inputs_match_unsharded():
  # During MoCo training the features arrive split over the `data` axis of all devices.
  import jax
  from jax.sharding import Mesh
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  n_dev = len(jax.devices())
  rng = np.random.default_rng(4)
  train = rng.normal(size=(8 * n_dev, 6)).astype(np.float32)
  train_y = rng.integers(0, 4, 8 * n_dev)
  query = rng.normal(size=(2 * n_dev, 6)).astype(np.float32)
  rows = NamedSharding(mesh, P("data"))
  sharded = [jax.device_put(a, rows) for a in (train, train_y, query)]
  _, scores = knn.knn_predict(*sharded, num_classes=4, k=5, chunk_size=4, train_chunk_size=16)
  _, ref = knn.knn_predict(
    jnp.asarray(train), jnp.asarray(train_y), jnp.asarray(query), num_classes=4, k=5
  )
  np.testing.assert_allclose(np.asarray(scores), np.asarray(ref), rtol=1e-5)


class _TwoSplitSource:
  num_classes = 2

  @staticmethod
  def eval_split_names():
    return ("test", "validation")


def test_monitor_is_split_first_and_its_tags_are_the_cohorts():
  # Two members: member 0's features carry the label, member 1's are constant.
  labels = np.arange(6) % 2
  good = np.stack([labels, 1 - labels], 1).astype(np.float32)
  features = np.stack([good, np.ones_like(good)])  # [M = 2, N, F]
  result = knn.monitor(_TwoSplitSource(), lambda split: (features, labels), ks=(3, knn.DEFAULT_K))
  assert set(result) == {"test", "validation"}
  assert (
    set(result["test"]) == {"knn_top1", "knn_top1_k3"} == {knn.metric_name(k) for k in (200, 3)}
  )
  np.testing.assert_allclose(result["test"]["knn_top1_k3"], result["validation"]["knn_top1_k3"])
  assert result["test"]["knn_top1_k3"][0] == 1.0
  scalars = knn.monitor_scalars(result)
  assert scalars["test/knn_top1_k3/member_0"] == 1.0
  assert {"test/knn_top1/member_1", "validation/knn_top1/best_member"} <= set(scalars)
  assert "validation/knn_top1_k3/members_mean" in scalars
  assert "validation knn_top1_k3: 100.00" in knn.format_monitor(result)
