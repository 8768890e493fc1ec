"""Weighted k-nearest-neighbour classifier on frozen features (InstDisc, Wu et al. 2018).

The cheap progress signal of self-supervised training (MoCo-MCL, docs/SPEC.md 2.3) and a check on
exported members: embed the training set and the eval set with a frozen network, then
classify every eval example by its k = 200 nearest training examples. As in InstDisc
(Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
CVPR 2018, section 3.4 and its `kNN` routine):
- features are L2-normalised, so similarity is the cosine s_j = f . f_j;
- the top k neighbours vote with weight exp(s_j / t), t = 0.07 (InstDisc's temperature);
- votes are summed per class, and the predicted class is the argmax.

Memory: the similarity matrix is computed one block of query rows at a time
(`chunk_size`), and optionally one block of training rows at a time
(`train_chunk_size`, keeping a running top k), so a 10k x 50k (CIFAR) or
10k x 1.28M (ImageNet) similarity never materialises at once. Pure JAX and jit-able:
`num_classes`, `k`, `chunk_size` and `train_chunk_size` are static.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

# InstDisc's kNN temperature and neighbour count.
DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.07


def _l2_normalize(x: jax.Array) -> jax.Array:
  # The epsilon keeps all-zero rows (padding) at zero instead of NaN.
  x = x.astype(jnp.float32)
  return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def _pad_rows(x: jax.Array, multiple: int, value=0) -> jax.Array:
  pad = (-x.shape[0]) % multiple
  if pad == 0:
    return x
  widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
  return jnp.pad(x, widths, constant_values=value)


def _top_k_neighbours(
  queries: jax.Array,
  train: jax.Array,
  train_labels: jax.Array,
  train_valid: jax.Array,
  k: int,
  train_chunk_size: int | None,
) -> tuple[jax.Array, jax.Array]:
  """Similarities [q, k] and labels [q, k] of each query's k most similar train rows."""

  def block_top_k(train_block, labels_block, valid_block):
    sim = queries @ train_block.T  # [q, n_block]
    sim = jnp.where(valid_block[None, :], sim, -jnp.inf)
    kk = min(k, train_block.shape[0])
    values, idx = lax.top_k(sim, kk)
    return values, labels_block[idx]

  n = train.shape[0]
  if train_chunk_size is None or train_chunk_size >= n:
    return block_top_k(train, train_labels, train_valid)

  # Running top k over blocks of training rows: top k of (best so far ++ this block's
  # top k) is the top k of everything seen, so memory is [q, train_chunk_size].
  train = _pad_rows(train, train_chunk_size)
  train_labels = _pad_rows(train_labels, train_chunk_size)
  train_valid = _pad_rows(train_valid, train_chunk_size, value=False)
  num_blocks = train.shape[0] // train_chunk_size
  blocks = (
    train.reshape(num_blocks, train_chunk_size, -1),
    train_labels.reshape(num_blocks, train_chunk_size),
    train_valid.reshape(num_blocks, train_chunk_size),
  )
  q = queries.shape[0]
  # The buffer holds k entries even when a block is smaller than k; unfilled slots keep
  # similarity -inf and so get vote weight 0.
  init = (jnp.full((q, k), -jnp.inf, jnp.float32), jnp.zeros((q, k), train_labels.dtype))

  def step(carry, block):
    best_values, best_labels = carry
    values, labels = block_top_k(*block)
    values = jnp.concatenate([best_values, values], axis=1)
    labels = jnp.concatenate([best_labels, labels], axis=1)
    values, idx = lax.top_k(values, k)
    return (values, jnp.take_along_axis(labels, idx, axis=1)), None

  (values, labels), _ = lax.scan(step, init, blocks)
  return values, labels


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "chunk_size", "train_chunk_size"))
def knn_predict(
  train_features: jax.Array,
  train_labels: jax.Array,
  query_features: jax.Array,
  *,
  num_classes: int,
  k: int = DEFAULT_K,
  temperature: float = DEFAULT_TEMPERATURE,
  chunk_size: int = 1024,
  train_chunk_size: int | None = None,
  train_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Weighted kNN predictions (InstDisc) for every query row.

  Args:
    train_features: [N, D] features of the labelled (training) set; need not be normalised.
    train_labels: [N] integer labels in [0, num_classes).
    query_features: [Q, D] features to classify.
    num_classes: C, the number of classes (static).
    k: neighbours per query (static); clipped to N, so k > N uses every training row.
    temperature: t in the vote weight exp(cosine / t).
    chunk_size: query rows per block of the similarity matrix (static).
    train_chunk_size: training rows per block (static); None = all N at once, so a block
      is [chunk_size, N]. Set it when N is large (ImageNet: a 1024 x 1.28M block is 5 GB).
    train_mask: optional [N] bool, False for padding rows, which then never vote.

  Returns:
    pred: [Q] int32, argmax of the class scores.
    scores: [Q, C] float32, sum of exp(cosine / t) over the top-k neighbours of each class.
  """
  if train_features.ndim != 2 or query_features.ndim != 2:
    raise ValueError(
      f"knn_predict wants [N, D] train and [Q, D] query features, got shapes "
      f"{train_features.shape} and {query_features.shape}."
    )
  if train_features.shape[1] != query_features.shape[1]:
    raise ValueError(
      f"Train and query features differ in width: {train_features.shape[1]} vs "
      f"{query_features.shape[1]}."
    )
  if train_labels.shape != train_features.shape[:1]:
    raise ValueError(
      f"train_labels must have shape [{train_features.shape[0]}], got {train_labels.shape}."
    )
  if chunk_size < 1 or (train_chunk_size is not None and train_chunk_size < 1):
    raise ValueError("chunk_size and train_chunk_size must be positive.")

  n = train_features.shape[0]
  num_queries = query_features.shape[0]
  k = max(1, min(k, n))
  chunk = max(1, min(chunk_size, num_queries))

  train = _l2_normalize(train_features)
  labels = train_labels.astype(jnp.int32)
  valid = jnp.ones((n,), bool) if train_mask is None else train_mask.astype(bool)
  queries = _pad_rows(_l2_normalize(query_features), chunk)
  num_chunks = queries.shape[0] // chunk

  def classify(query_block):
    sims, nbr_labels = _top_k_neighbours(query_block, train, labels, valid, k, train_chunk_size)
    # exp(-inf / t) = 0: masked rows picked only to fill k carry no vote.
    weights = jnp.exp(sims / temperature)
    rows = jnp.arange(query_block.shape[0])[:, None]
    return (
      jnp.zeros((query_block.shape[0], num_classes), jnp.float32).at[rows, nbr_labels].add(weights)
    )

  scores = lax.map(classify, queries.reshape(num_chunks, chunk, -1))
  scores = scores.reshape(num_chunks * chunk, num_classes)[:num_queries]
  return jnp.argmax(scores, axis=-1).astype(jnp.int32), scores


def knn_accuracy(
  train_features: jax.Array,
  train_labels: jax.Array,
  query_features: jax.Array,
  query_labels: jax.Array,
  *,
  num_classes: int,
  k: int = DEFAULT_K,
  temperature: float = DEFAULT_TEMPERATURE,
  chunk_size: int = 1024,
  train_chunk_size: int | None = None,
  train_mask: jax.Array | None = None,
  query_mask: jax.Array | None = None,
) -> jax.Array:
  """Top-1 accuracy (a float32 scalar in [0, 1]) of `knn_predict` on labelled queries.

  `query_mask` ([Q] bool, False for padding) leaves padded eval rows out of the mean, so
  the accuracy is exact over the whole eval split. Other arguments as in `knn_predict`.
  """
  pred, _ = knn_predict(
    train_features,
    train_labels,
    query_features,
    num_classes=num_classes,
    k=k,
    temperature=temperature,
    chunk_size=chunk_size,
    train_chunk_size=train_chunk_size,
    train_mask=train_mask,
  )
  correct = (pred == query_labels.astype(jnp.int32)).astype(jnp.float32)
  if query_mask is None:
    return jnp.mean(correct)
  mask = query_mask.astype(jnp.float32)
  return jnp.sum(correct * mask) / jnp.maximum(jnp.sum(mask), 1.0)


MONITOR_KS = (20, DEFAULT_K)  # the self-supervised trainers' kNN monitor (InstDisc: 200)


def metric_name(k: int) -> str:
  """The kNN monitor's name of its top-1 at `k` neighbours: 'knn_top1' at the default k
  (200), 'knn_top1_k{k}' otherwise (e.g. 'knn_top1_k20')."""
  return "knn_top1" if k == DEFAULT_K else f"knn_top1_k{k}"


def monitor(source, embed_split, ks: tuple[int, ...] = MONITOR_KS) -> dict:
  """kNN top-1 [M] of each member's frozen features against the training split.

  `source`: a data source (`data.protocol.Source`); `embed_split(split) -> (features
  [M, N, F], labels [N])` of one whole split of it, un-augmented (`loop.embed_split`).
  Returns {split: {'knn_top1': k = 200, 'knn_top1_k20': k = 20, ...}} for 'test' and,
  when the source holds one out, 'validation' (`metric_name` names them).
  """
  import numpy as np

  from mcl_jax.data import protocol

  train_f, train_labels = embed_split(protocol.TRAIN_SPLIT)
  result: dict[str, dict[str, np.ndarray]] = {}
  for split in source.eval_split_names():
    eval_f, labels = embed_split(split)
    split_result = result.setdefault(split, {})
    for k in ks:
      split_result[metric_name(k)] = np.asarray(
        [
          float(
            knn_accuracy(
              train_f[m], train_labels, eval_f[m], labels, num_classes=source.num_classes, k=k
            )
          )
          for m in range(train_f.shape[0])
        ]
      )
  return result


def format_monitor(result: dict) -> str:
  """'kNN top-1 % (per member): test knn_top1: 80.1 81.2  |  test knn_top1_k20: ...'."""
  return "kNN top-1 % (per member): " + "  |  ".join(
    f"{split} {name}: " + " ".join(f"{100 * a:.2f}" for a in acc)
    for split, metrics in result.items()
    for name, acc in metrics.items()
  )


def monitor_scalars(result: dict) -> dict[str, float]:
  """`{split}/{knn_top1|knn_top1_k20}/{member_m|best_member|members_mean}` for TensorBoard,
  e.g. `test/knn_top1/member_0`, `validation/knn_top1_k20/best_member` (`monitor`'s
  splits and metrics)."""
  import numpy as np

  from mcl_jax import metrics

  scalars = {}
  for split, split_metrics in result.items():
    for metric, values in split_metrics.items():
      members = np.asarray(values, np.float64).reshape(-1)
      scalars.update(metrics.member_scalars(members, f"{split}/{metric}"))
  return scalars


class Monitor:
  """The kNN monitor as the evaluation of a self-supervised task (MoCo, SimCLR).

  `embed_step(params, batch_stats, images) -> [M, B, F]`: the task's compiled feature
  step (BN in eval mode). `evaluate(state)` embeds the source's training split
  (un-augmented) and its eval splits and returns `monitor`'s accuracies.
  """

  def __init__(self, setup, embed_step):
    self.setup, self.embed_step = setup, embed_step

  def embed_split(self, state, split: str):
    """(features [M, N, F], labels [N]) of one whole split of the source."""
    from mcl_jax import loop

    return loop.embed_split(
      self.setup, lambda x: self.embed_step(state.params, state.batch_stats, x), split
    )

  def evaluate(self, state) -> dict:
    return monitor(self.setup.source, lambda split: self.embed_split(state, split))


def check_monitor_config(config) -> None:
  """`config.ssl.knn_every_epochs` must be >= 0: the self-supervised regimes' check."""
  from mcl_jax.errors import ConfigError

  every = config.ssl.knn_every_epochs
  if every < 0:
    raise ConfigError(f"config.ssl.knn_every_epochs={every} must be >= 0 (0: off).")
