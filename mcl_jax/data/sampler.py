"""Epoch orders as pure numpy functions of (seed, epoch): resume replays them exactly.

`class_aware_epoch` is the "m per class" sampler of the official CIFAR code
(`dataset/class_sampler.py: MPerClassSampler(labels, m=2, batch_size=128,
length_before_new_iter=len(trainset))`): every batch holds B/m distinct classes with m
examples each, so in-batch supervised MCL (docs/SPEC.md 2.1) finds a positive for every row.
`shuffled_epoch` is a plain shuffle for everything else.

Both return a `[steps, global_batch_size]` int32 array of dataset indices; the trainer
feeds row `step % steps` at each step and each process takes its contiguous slice of the
row (`pipeline.local_batch_indices`). No state lives between calls: the order of any epoch
is recomputed from (seed, epoch) alone, so a run resumed at step s sees the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import numpy as np

# Distinct streams so the two samplers never share random numbers for the same (seed, epoch).
_CLASS_AWARE_STREAM = 0x6D70_6300  # "mpc"
_SHUFFLE_STREAM = 0x7368_7566  # "shuf"


def _rng(stream: int, seed: int, epoch: int) -> np.random.Generator:
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed={seed} and epoch={epoch} must be non-negative integers.")
  return np.random.default_rng(np.random.SeedSequence([stream, int(seed), int(epoch)]))


def class_aware_epoch(
  labels: np.ndarray,
  *,
  epoch: int,
  seed: int,
  global_batch_size: int,
  samples_per_class: int,
  num_examples_per_epoch: int | None = None,
) -> np.ndarray:
  """Indices [steps, global_batch_size] of one class-aware ("m per class") epoch.

  Each row (a global batch) is B/m classes x m examples, classes drawn without replacement
  within the row, the m examples of a class adjacent. Examples of a class are drawn as the
  official `safe_random_choice`: without replacement when the class has at least m
  examples, with replacement otherwise. Rows are drawn independently, so an example can
  appear in several rows of an epoch and some not at all (as in the official sampler).

  Args:
    labels: [N] integer class labels of the training set.
    epoch, seed: the order is a pure function of these two (non-negative) integers.
    global_batch_size: B, a multiple of `samples_per_class`.
    samples_per_class: m (2 in the official code).
    num_examples_per_epoch: epoch length before rounding down to whole batches; default N
      (official: `length_before_new_iter=len(trainset)`, i.e. 50,000 -> 390 x 128).
  """
  labels = np.asarray(labels).reshape(-1)
  m, batch = int(samples_per_class), int(global_batch_size)
  if m < 1 or batch < 1 or batch % m:
    raise ValueError(
      f"global_batch_size={batch} must be a positive multiple of samples_per_class={m}."
    )
  classes_per_batch = batch // m
  _, class_of, counts = np.unique(labels, return_inverse=True, return_counts=True)
  num_classes = counts.size
  if classes_per_batch > num_classes:
    raise ValueError(
      f"A class-aware batch of {batch} with {m} samples per class needs "
      f"{classes_per_batch} distinct classes but the labels have only {num_classes}; "
      "lower global_batch_size or raise samples_per_class."
    )
  length = labels.size if num_examples_per_epoch is None else int(num_examples_per_epoch)
  steps = length // batch
  if steps < 1:
    raise ValueError(f"An epoch of {length} examples holds no whole batch of {batch}.")
  rng = _rng(_CLASS_AWARE_STREAM, seed, epoch)

  # Example indices grouped by class (stable: ascending within a class).
  by_class = np.argsort(class_of, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

  # Classes of each batch: the first B/m of a random permutation of all classes.
  chosen = np.argsort(rng.random((steps, num_classes)), axis=1)[:, :classes_per_batch]
  n = counts[chosen][..., None]  # [steps, B/m, 1] examples in each chosen class
  u = rng.random((steps, classes_per_batch, m))

  # Positions within the class. Without replacement: Floyd's algorithm, one column per
  # draw (m is small), which picks a uniform m-subset with m random numbers instead of a
  # permutation of the whole class. With replacement (class smaller than m): uniform draws.
  pos = np.empty(u.shape, np.int64)
  for i in range(m):
    top = n[..., 0] - m + i  # Floyd step i draws from 0..top inclusive
    t = np.floor(u[..., i] * (top + 1)).astype(np.int64)
    if i:
      taken = (pos[..., :i] == t[..., None]).any(axis=-1)
      t = np.where(taken, top, t)
    pos[..., i] = t
  with_replacement = np.floor(u * n).astype(np.int64)
  pos = np.where(n >= m, pos, with_replacement)

  indices = by_class[starts[chosen][..., None] + pos]
  return indices.reshape(steps, batch).astype(np.int32)


def shuffled_epoch(
  num_examples: int, *, epoch: int, seed: int, global_batch_size: int
) -> np.ndarray:
  """Indices [num_examples // B, B] of one shuffled epoch; the remainder is dropped."""
  batch = int(global_batch_size)
  steps = int(num_examples) // batch if batch > 0 else 0
  if steps < 1:
    raise ValueError(
      f"An epoch of {num_examples} examples holds no whole batch of {global_batch_size}."
    )
  perm = _rng(_SHUFFLE_STREAM, seed, epoch).permutation(int(num_examples))
  return perm[: steps * batch].reshape(steps, batch).astype(np.int32)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Whole global batches in one epoch (the remainder is dropped, as both samplers do)."""
  return int(num_examples) // int(global_batch_size)
