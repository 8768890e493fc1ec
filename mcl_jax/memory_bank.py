"""Memory bank of the ImageNet supervised MCL (docs/SPEC.md 2.2): init, update, sampling, sharding.

The bank V is one [M, N, d] array: one L2-normalised row per training example per member.
It is read with stop_gradient by `losses.bank_mcl` and written after each step by
`update`, only at the rows of the batch's own examples. Everything here is pure: functions
return a new bank.

For a sharded run the bank is split along N over the 1-D mesh axis 'data'
(`NamedSharding(mesh, P(None, 'data', None))`). `gather_rows` and `update_sharded` then let
every device read and write only the rows it holds, so a step never all-gathers the bank.

Per-sample contrasts follow the official ImageNet loader (`dataset/imagenet.py`,
`ImageFolderSample.__getitem__`): P positives drawn without replacement from the whole
class of the sample (the sample itself may be drawn), K negatives drawn with replacement
from all other classes, and pos_idx = [own index, positives]. Here they are drawn on
device from a class index table built once on host (`class_index_table`,
`sample_indices`).
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import numpy as np

Array = jax.Array
DATA_AXIS = "data"


# -------------------------------------------------------------------------------------
# Init and update (docs/SPEC.md 2.2)
# -------------------------------------------------------------------------------------


# Storage dtypes of the bank (config.bank.dtype); every computation on its rows is float32.
DTYPES = ("float32", "bfloat16")


def init(rng: Array, num_members: int, num_rows: int, dim: int, dtype: str = "float32") -> Array:
  """A new bank [M, N, d], uniform in [-s, s] with s = 1 / sqrt(d / 3) (docs/SPEC.md 2.2),
  drawn in float32 and stored as `dtype` (DTYPES).

  As in the official code the initial rows are not normalised; each row is normalised the
  first time its example is seen by `update`.
  """
  if dtype not in DTYPES:
    raise ValueError(f"Unknown bank dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
  s = 1.0 / math.sqrt(dim / 3)
  bank = jax.random.uniform(rng, (num_members, num_rows, dim), jnp.float32, -s, s)
  return bank.astype(dtype)


def _momentum_rows(old: Array, z: Array, momentum: float) -> Array:
  """normalize(m * old + (1 - m) * z), computed in float32, in the dtype of `old`."""
  z = jax.lax.stop_gradient(z).astype(jnp.float32)
  mixed = momentum * old.astype(jnp.float32) + (1.0 - momentum) * z
  norm = jnp.sqrt(jnp.sum(mixed * mixed, axis=-1, keepdims=True))
  return (mixed / jnp.maximum(norm, 1e-12)).astype(old.dtype)


def _check_update_args(bank: Array, own_idx: Array, z: Array) -> None:
  if bank.ndim != 3 or z.ndim != 3 or z.shape[0] != bank.shape[0] or z.shape[2] != bank.shape[2]:
    raise ValueError(f"bank [M, N, d] and z [M, B, d] do not match: {bank.shape}, {z.shape}.")
  if own_idx.shape != z.shape[1:2]:
    raise ValueError(f"own_idx must have shape [B] = {z.shape[1:2]}, got {own_idx.shape}.")


def update(bank: Array, own_idx: Array, z: Array, momentum: float) -> Array:
  """Momentum update of the rows of the batch (docs/SPEC.md 2.2).

  V_a[o_i] <- normalize(m V_a[o_i] + (1 - m) z_a[i]) for every member a and sample i;
  other rows are unchanged and z is detached. own_idx should hold distinct indices (with
  repeats, which write wins is unspecified, as with the official `index_copy_`).

  Args:
    bank: [M, N, d].
    own_idx: [B] dataset indices o_i of the batch (pos_idx[:, 0]).
    z: [M, B, d] embeddings of the batch.
    momentum: m (0.5 in the official ImageNet recipe).

  Returns:
    The new bank, same shape and dtype.
  """
  _check_update_args(bank, own_idx, z)
  new_rows = _momentum_rows(jnp.take(bank, own_idx, axis=1), z, momentum)
  return bank.at[:, own_idx].set(new_rows)


# -------------------------------------------------------------------------------------
# On-device sampling of positives and negatives
# -------------------------------------------------------------------------------------


def class_index_table(labels: np.ndarray, num_classes: int | None = None) -> dict[str, np.ndarray]:
  """Index of the dataset by class, built once on host (vectorised numpy, no Python loop).

  Args:
    labels: [N] integer class of every training example, in dataset-index order.
    num_classes: C; defaults to labels.max() + 1.

  Returns:
    {"sorted_idx": [N] dataset indices sorted by class (stable, so ascending within a
     class), "class_start": [C] offset of each class's block in sorted_idx,
     "class_count": [C] size of each class}, all int32.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.size == 0:
    raise ValueError(
      f"labels must be a non-empty 1-D integer array, got {labels.dtype} {labels.shape}."
    )
  if labels.min() < 0:
    raise ValueError("labels must be non-negative class indices.")
  if num_classes is None:
    num_classes = int(labels.max()) + 1
  elif labels.max() >= num_classes:
    raise ValueError(f"labels reach {labels.max()} but num_classes is {num_classes}.")
  if labels.size >= 2**31:
    raise ValueError("more than 2**31 examples do not fit int32 indices.")
  sorted_idx = np.argsort(labels, kind="stable").astype(np.int32)
  count = np.bincount(labels, minlength=num_classes).astype(np.int32)
  start = (np.cumsum(count, dtype=np.int64) - count).astype(np.int32)
  return {"sorted_idx": sorted_idx, "class_start": start, "class_count": count}


def sample_indices(
  rng: Array,
  labels: Array,
  own_idx: Array,
  table: dict[str, Any],
  *,
  num_positives: int,
  num_negatives: int,
) -> tuple[Array, Array]:
  """Draws pos_idx [B, 1 + P] and neg_idx [B, K] on device (docs/SPEC.md 2.2), jit-able.

  Follows the official loader: column 0 of pos_idx is the sample's own index; the P
  positives are drawn without replacement, uniformly from the sample's whole class (so
  the sample itself may be among them, as with the official `np.random.choice` over
  `cls_positive`); the K negatives are drawn with replacement, uniformly from every other
  class. A negative is a uniform draw r in [0, N - count_c) mapped past class c's
  contiguous block of `sorted_idx` (r >= start_c -> r + count_c): exact, no rejection.
  Positives without replacement use Floyd's algorithm (P steps, vectorised over the
  batch). A class with fewer than P examples gets repeated positives instead of an error.
  Integers come from `jax.random.randint`, uniform up to its documented tiny bias for
  ranges that are not powers of two.

  Args:
    rng: a PRNG key.
    labels: [B] classes of the batch.
    own_idx: [B] dataset indices of the batch.
    table: `class_index_table` output (numpy or device arrays).
    num_positives: P (1 in the official recipe).
    num_negatives: K (8192 in the official recipe).

  Returns:
    (pos_idx [B, 1 + P], neg_idx [B, K]), int32.
  """
  if labels.ndim != 1 or own_idx.shape != labels.shape:
    raise ValueError(
      f"labels and own_idx must both be [B], got {labels.shape} and {own_idx.shape}."
    )
  sorted_idx = jnp.asarray(table["sorted_idx"])
  start = jnp.asarray(table["class_start"])[labels]  # [B]
  count = jnp.asarray(table["class_count"])[labels]  # [B]
  num_rows = sorted_idx.shape[0]
  pos_key, neg_key = jax.random.split(rng)

  # Floyd: for j = count - P .. count - 1 draw t in [0, j]; keep t unless already chosen,
  # else keep j. The result is a uniform P-subset of [0, count).
  chosen = jnp.zeros((labels.shape[0], 0), jnp.int32)
  for step, key in enumerate(jax.random.split(pos_key, num_positives)):
    j = jnp.maximum(count - num_positives + step, 0)
    t = jax.random.randint(key, labels.shape, 0, j + 1, dtype=jnp.int32)
    taken = jnp.any(chosen == t[:, None], axis=1)
    chosen = jnp.concatenate([chosen, jnp.where(taken, j, t)[:, None]], axis=1)
  positives = sorted_idx[start[:, None] + chosen]

  r = jax.random.randint(
    neg_key, (labels.shape[0], num_negatives), 0, (num_rows - count)[:, None], dtype=jnp.int32
  )
  r = jnp.where(r >= start[:, None], r + count[:, None], r)
  negatives = sorted_idx[r]
  pos_idx = jnp.concatenate([own_idx.astype(jnp.int32)[:, None], positives], axis=1)
  return pos_idx, negatives


# -------------------------------------------------------------------------------------
# Bank sharded along N: gather and update without all-gathering the bank
# -------------------------------------------------------------------------------------


def bank_sharding(mesh: Mesh) -> jax.sharding.NamedSharding:
  """The bank's sharding: rows (N) split over the 'data' axis."""
  return jax.sharding.NamedSharding(mesh, P(None, DATA_AXIS, None))


def _rows_per_device(bank: Array, mesh: Mesh) -> int:
  n_dev = mesh.shape[DATA_AXIS]
  if bank.shape[1] % n_dev:
    raise ValueError(
      f"the bank's {bank.shape[1]} rows must split evenly over {n_dev} "
      f"devices: pad N to a multiple of {n_dev}."
    )
  return bank.shape[1] // n_dev


def _local_index(idx: Array, rows_per_device: int) -> tuple[Array, Array]:
  """This device's position of each global row index, and whether it owns that row."""
  local = idx - jax.lax.axis_index(DATA_AXIS) * rows_per_device
  owned = (local >= 0) & (local < rows_per_device)
  return local, owned


def gather_rows(bank: Array, idx: Array, mesh: Mesh, *, scatter: bool = False) -> Array:
  """bank[:, idx] for a bank sharded along N, without all-gathering the bank.

  Each device gathers the rows of `idx` that it holds and zeros for the others; a psum
  over 'data' adds the one non-zero contribution to zeros, so the result is exact for any
  indices (repeats included) and the traffic is the size of the gathered rows, not of the
  bank. (XLA's own partitioning of `jnp.take` on a sharded bank may do the same, but it
  is a heuristic; here it is explicit.)

  Args:
    bank: [M, N, d], sharded as `bank_sharding(mesh)` (or to be resharded so).
    idx: integer indices [B, ...], e.g. [B, 1 + P + K]; read whole on every device.
    mesh: a mesh with axis 'data'; N must be a multiple of its size.
    scatter: False: the result is replicated on every device (psum). True: it is split
      along B over 'data' (reduce-scatter), as a data-parallel batch is: each device
      keeps only the rows of its own samples, which divides the memory of the result by
      the number of devices. B must then be a multiple of it.

  Returns:
    [M, B, ..., d]: replicated, or sharded as P(None, 'data') with scatter=True.
  """
  rows_per_device = _rows_per_device(bank, mesh)
  n_dev = mesh.shape[DATA_AXIS]
  if scatter and (idx.ndim == 0 or idx.shape[0] % n_dev):
    raise ValueError(
      f"scatter=True needs the batch size {idx.shape[:1]} to be a multiple "
      f"of the {n_dev} devices of 'data'."
    )

  def local_gather(local_bank, idx):
    local, owned = _local_index(idx, rows_per_device)
    rows = jnp.take(local_bank, jnp.where(owned, local, 0), axis=1)
    rows = jnp.where(owned[..., None], rows, jnp.zeros((), rows.dtype))
    if scatter:
      return jax.lax.psum_scatter(rows, DATA_AXIS, scatter_dimension=1, tiled=True)
    return jax.lax.psum(rows, DATA_AXIS)

  return jax.shard_map(
    local_gather,
    mesh=mesh,
    in_specs=(P(None, DATA_AXIS, None), P()),
    out_specs=P(None, DATA_AXIS) if scatter else P(),
  )(bank, idx)


def gather_similarities(
  bank: Array, idx: Array, z: Array, mesh: Mesh, *, chunk_size: int = 0
) -> Array:
  """sims[a, b, i, k] = bank[a, idx[i, k]] . z[b, i] for a bank sharded along N.

  What `losses.bank_mcl_from_similarities` takes. Each device dots the rows it holds
  (zeros for the others) with the whole batch's embeddings and a reduce-scatter over
  'data' adds the contributions, leaving each device the similarities of its own
  examples. Compared with `gather_rows(..., scatter=True)` followed by the dot products,
  the values are the same but what crosses devices is [M, M, B, C] scalars instead of
  [M, B, C, d] rows: d / M times less (43x for d = 128, M = 3). The embeddings [M, B, d]
  are gathered to every device first (small). The local gather is rematerialised in the
  backward pass, so no [M, B, C, d] buffer lives from the forward to the backward pass.

  With `chunk_size` > 0 the C candidates are gathered and dotted `chunk_size` at a time
  (a sequential lax.map), so the transient buffer of rows is [M, B, chunk_size, d]
  instead of [M, B, C, d] (for imagenet_r18_x3: 0.4 GiB at 1,024 instead of 3.0 GiB);
  the indices, and so the sampling distribution, and the values are unchanged.

  Args:
    bank: [M, N, d], sharded as `bank_sharding(mesh)`; read with stop_gradient.
    idx: [B, C] dataset indices (e.g. [own, positives, negatives]), read on every device.
    z: [M, B, d] embeddings (any sharding); gradients flow to it.
    mesh: a mesh with axis 'data'; N and B must be multiples of its size.
    chunk_size: candidates per gather (0: all C at once).

  Returns:
    [M, M, B, C] float32, split along B as P(None, None, 'data').
  """
  rows_per_device = _rows_per_device(bank, mesh)
  _check_similarity_args(bank, idx, z, mesh)

  def take_owned_rows(local_bank, idx_chunk):
    local, owned = _local_index(idx_chunk, rows_per_device)
    rows = jnp.take(local_bank, jnp.where(owned, local, 0), axis=1)  # [M, B, c, d]
    return jnp.where(owned[..., None], rows, jnp.zeros((), rows.dtype))

  @jax.checkpoint
  def local_similarities(local_bank, idx, z):
    sims = _candidate_similarities(take_owned_rows, local_bank, idx, z, chunk_size)
    return jax.lax.psum_scatter(sims, DATA_AXIS, scatter_dimension=2, tiled=True)

  return jax.shard_map(
    local_similarities,
    mesh=mesh,
    in_specs=(P(None, DATA_AXIS, None), P(), P()),
    out_specs=P(None, None, DATA_AXIS),
  )(jax.lax.stop_gradient(bank), idx, z)


def _candidate_similarities(take_rows, bank, idx, z, chunk_size: int) -> Array:
  """sims[a, b, i, k] = rows[a, i, k] . z[b, i] with rows = take_rows(bank, idx), the
  candidates taken `chunk_size` at a time (0: all at once; see `gather_similarities`)."""
  num_candidates = idx.shape[1]
  chunk = chunk_size if 0 < chunk_size < num_candidates else num_candidates
  num_chunks = -(-num_candidates // chunk)

  def dots(idx_chunk):
    rows = take_rows(bank, idx_chunk)  # [M, B, c, d]
    # HIGHEST: no bfloat16/TF32 rounding of similarities that 1 / tau then amplifies.
    return jnp.einsum(
      "aikd,bid->abik",
      rows.astype(jnp.float32),
      z.astype(jnp.float32),
      precision=jax.lax.Precision.HIGHEST,
    )

  if num_chunks == 1:
    return dots(idx)
  # Padded with index 0 (a real row) to whole chunks; the padding is cut off.
  padded = jnp.pad(idx, ((0, 0), (0, num_chunks * chunk - num_candidates)))
  chunks = padded.reshape(idx.shape[0], num_chunks, chunk).transpose(1, 0, 2)
  sims = jax.lax.map(dots, chunks)  # [n, M, M, B, c]
  return jnp.moveaxis(sims, 0, 3).reshape(*sims.shape[1:4], -1)[..., :num_candidates]


def _check_similarity_args(bank: Array, idx: Array, z: Array, mesh: Mesh) -> None:
  n_dev = mesh.shape[DATA_AXIS]
  if (
    idx.ndim != 2
    or z.ndim != 3
    or z.shape[:2] != (bank.shape[0], idx.shape[0])
    or z.shape[2] != bank.shape[2]
  ):
    raise ValueError(
      f"expected bank [M, N, d], idx [B, C] and z [M, B, d], got "
      f"{bank.shape}, {idx.shape} and {z.shape}."
    )
  if idx.shape[0] % n_dev:
    raise ValueError(
      f"the batch size {idx.shape[0]} must be a multiple of the {n_dev} devices of 'data'."
    )


def update_sharded(bank: Array, own_idx: Array, z: Array, momentum: float, mesh: Mesh) -> Array:
  """`update` for a bank sharded along N: each device writes only the rows it holds.

  own_idx and z are replicated to every device (B x d per member, small); each device
  computes the new rows for the indices it owns and scatters them into its shard, dropping
  the others. No bank rows cross devices. The result keeps `bank_sharding(mesh)`.

  Args:
    bank: [M, N, d], sharded as `bank_sharding(mesh)`.
    own_idx: [B] distinct dataset indices of the batch.
    z: [M, B, d] embeddings of the batch.
    momentum: m.
    mesh: a mesh with axis 'data'; N must be a multiple of its size.

  Returns:
    The new bank, sharded as `bank_sharding(mesh)`.
  """
  _check_update_args(bank, own_idx, z)
  rows_per_device = _rows_per_device(bank, mesh)
  z = jax.lax.stop_gradient(z)

  def local_update(local_bank, own_idx, z):
    local, owned = _local_index(own_idx, rows_per_device)
    old = jnp.take(local_bank, jnp.where(owned, local, 0), axis=1)
    new_rows = _momentum_rows(old, z, momentum)
    # Rows held elsewhere get an out-of-range index, which mode="drop" skips.
    target = jnp.where(owned, local, rows_per_device)
    return local_bank.at[:, target].set(new_rows, mode="drop")

  spec = P(None, DATA_AXIS, None)
  return jax.shard_map(
    local_update,
    mesh=mesh,
    in_specs=(spec, P(), P()),
    out_specs=spec,
  )(bank, own_idx, z)


# -------------------------------------------------------------------------------------
# Bank replicated on every device: each device reads only its own examples' rows
# -------------------------------------------------------------------------------------
#
# The sharded layout keeps 1 / D of the bank per device but makes every device take the
# rows of ALL the global batch's candidates (zeros for the rows it does not hold): its
# per-device work and memory traffic do not shrink with D. A replicated bank costs the
# whole bank's HBM on every device (1.83 GiB for imagenet_r18_x3, as each GPU of the
# official DDP run holds its own copy) and makes every device take only its own B / D
# examples' candidates, with no collective for the read; the update all-gathers the
# batch's embeddings ([M, B, d], small) and every device writes the same rows. Same
# indices, same values (tests/test_memory_bank.py); `bank.layout` chooses, and
# docs/IMAGENET.md says when each one pays.

LAYOUTS = ("sharded", "replicated")


def layout_sharding(layout: str, mesh: Mesh) -> jax.sharding.NamedSharding:
  """The bank's sharding under `layout` (one of LAYOUTS)."""
  if layout == "sharded":
    return bank_sharding(mesh)
  if layout == "replicated":
    return jax.sharding.NamedSharding(mesh, P())
  raise ValueError(f"unknown bank layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")


def gather_similarities_replicated(
  bank: Array, idx: Array, z: Array, mesh: Mesh, *, chunk_size: int = 0
) -> Array:
  """`gather_similarities` for a bank replicated on every device: each device takes the
  rows of its own examples' candidates ([M, B / D, C, d]) from its copy and dots them
  with their embeddings; nothing crosses devices.

  Unchunked, the gathered rows are kept from the forward to the backward pass (one device's
  share, [M, B / D, C, d]) rather than gathered again: rematerialising that gather made
  XLA:TPU re-lay-out the whole bank every step, a bigger copy than the rows themselves
  (docs/PERFORMANCE.md, "The bank's bytes"). With `chunk_size` > 0 each chunk's gather is
  rematerialised, since a bounded buffer is what chunking is asked for.

  Args:
    bank: [M, N, d], replicated; read with stop_gradient.
    idx: [B, C] dataset indices, split along B over 'data' as the batch is.
    z: [M, B, d] embeddings, split along B; gradients flow to it.
    mesh: a mesh with axis 'data'; B must be a multiple of its size.
    chunk_size: candidates per gather (0: all C at once).

  Returns:
    [M, M, B, C] float32, split along B as P(None, None, 'data').
  """
  _check_similarity_args(bank, idx, z, mesh)

  def take_rows(bank, idx_chunk):
    return jnp.take(bank, idx_chunk, axis=1)  # [M, B / D, c, d]

  def local_similarities(bank, idx, z):
    return _candidate_similarities(take_rows, bank, idx, z, chunk_size)

  return jax.shard_map(
    jax.checkpoint(local_similarities) if chunk_size > 0 else local_similarities,
    mesh=mesh,
    in_specs=(P(), P(DATA_AXIS), P(None, DATA_AXIS)),
    out_specs=P(None, None, DATA_AXIS),
  )(jax.lax.stop_gradient(bank), idx, z)


def update_replicated(bank: Array, own_idx: Array, z: Array, momentum: float, mesh: Mesh) -> Array:
  """`update` for a bank replicated on every device: the batch's indices and embeddings
  are gathered to every device ([B] and [M, B, d]) and each device applies the same update
  to its copy, so the copies stay identical. The result stays replicated."""
  _check_update_args(bank, own_idx, z)
  return jax.shard_map(
    lambda bank, own_idx, z: update(bank, own_idx, z, momentum),
    mesh=mesh,
    in_specs=(P(), P(), P()),
    out_specs=P(),
  )(bank, own_idx, jax.lax.stop_gradient(z))
