"""The in-memory data source and the batch plumbing every source shares.

`Dataset` holds a dataset whole in host memory (digits, Fashion-MNIST, CIFAR, synthetic)
and implements the data-source protocol (`mcl_jax.data.protocol.Source`) that the
streaming ImageNet sources (`mcl_jax.data.imagenet`) implement too, so a trainer never
asks which kind it has. In memory, the training set lives on every device
(`device_arrays`): a training batch from the host is only its example indices, and the
source's `materialize`, inside the compiled step, gathers the images and labels there, so
the host never touches pixels.

Batch orders are pure functions of (seed, epoch) (`sampler`), so a resumed run sees the
batches an uninterrupted one would have seen. Evaluation is exact on any device count:
the last batch is padded and the padding carries mask 0.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
from typing import Any

import numpy as np

from mcl_jax.data import augment as augment_lib
from mcl_jax.data import protocol
from mcl_jax.data import sampler
from mcl_jax.errors import ConfigError

# Held-out validation examples and training subsets are drawn with this fixed seed, never
# with config.seed: every run of an experiment (every seed, every variant) sees the same
# validation split and the same training subset.
SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A dataset held whole in host memory (numpy).

  Images are uint8 in [0, 255] or float32 in [0, 1] (see `augment.to_float`), NHWC;
  labels int32. `mean`/`std` are per-channel in [0, 1] units, for `augment.normalize`.
  Example i of the training set is row i: its index is its identity (memory-bank row).
  `eval_*` is the test split; `val_*`, when present, a validation split held out from the
  training data (`hold_out_validation`): choices are made on it, results reported on test.
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  eval_images: np.ndarray
  eval_labels: np.ndarray
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augment: augment_lib.AugmentSpec = augment_lib.AugmentSpec()
  val_images: np.ndarray | None = None
  val_labels: np.ndarray | None = None

  def eval_splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'test': (images, labels)} and, when held out, {'validation': ...} as well."""
    splits = {"test": (self.eval_images, self.eval_labels)}
    if self.val_labels is not None:
      assert self.val_images is not None, "val_labels without val_images"
      splits["validation"] = (self.val_images, self.val_labels)
    return splits

  # -- the data-source protocol (mcl_jax.data.protocol.Source)
  def train_batches(
    self,
    epoch: int,
    *,
    seed: int,
    global_batch_size: int,
    samples_per_class: int = 0,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
  ) -> Iterator[dict[str, np.ndarray]]:
    """{'index': int32 [B / processes]} for every batch of `epoch` from `start_step` on."""
    p, count = process(process_index, process_count)
    if samples_per_class > 0:
      order = sampler.class_aware_epoch(
        self.train_labels,
        epoch=epoch,
        seed=seed,
        global_batch_size=global_batch_size,
        samples_per_class=samples_per_class,
      )
    else:
      order = sampler.shuffled_epoch(
        self.num_train, epoch=epoch, seed=seed, global_batch_size=global_batch_size
      )
    for indices in local_batch_indices(order, p, count)[start_step:]:
      yield {"index": indices.astype(np.int32)}

  def eval_split_names(self) -> tuple[str, ...]:
    return tuple(self.eval_splits())

  def eval_batches(
    self,
    split: str,
    global_batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
  ) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of padded batches covering `split` once, in order (an eval
    split, or protocol.TRAIN_SPLIT: the training images un-augmented)."""
    p, count = process(process_index, process_count)
    splits = dict(self.eval_splits())
    splits[protocol.TRAIN_SPLIT] = (self.train_images, self.train_labels)
    if split not in splits:
      raise ValueError(
        f"{self.name} has no {split!r} split; it has "
        f"{', '.join(sorted(splits))} (a 'validation' split needs "
        "config.input.validation_size)."
      )
    images, labels = splits[split]
    rows = local_batch_indices(np.arange(global_batch_size), p, count)  # batch axis 0
    for batch in eval_batches(images, labels, global_batch_size):
      yield {k: v[rows] for k, v in batch.items()}

  def device_arrays(self) -> dict[str, np.ndarray]:
    """The training set, kept whole on every device: steps gather their batch by index."""
    return {"train_image": self.train_images, "train_label": self.train_labels.astype(np.int32)}

  def abstract_train_batch(self, global_batch_size: int) -> dict[str, Any]:
    import jax

    return {"index": jax.ShapeDtypeStruct((global_batch_size,), np.int32)}

  def materialize(
    self, consts: dict[str, Any], batch: dict[str, Any], *, labels: bool = True
  ) -> dict[str, Any]:
    """The batch's images (and labels) gathered by index from the resident training set."""
    index = batch["index"]
    out = {"image": consts["train_image"][index], "index": index}
    if labels:
      out["label"] = consts["train_label"][index]
    return out

  def train_preprocess(self, rng: Any, images: Any, dtype: Any = None) -> Any:
    """Crop with zero padding, flip (the dataset's `augment`), normalise; on device."""
    import jax.numpy as jnp

    return augment_lib.train_augment(
      rng, images, self.augment, mean=self.mean, std=self.std, dtype=dtype or jnp.float32
    )

  def eval_preprocess(self, images: Any, dtype: Any = None) -> Any:
    import jax.numpy as jnp

    return augment_lib.normalize(images, self.mean, self.std, dtype or jnp.float32)

  def two_views(self, spec: Any, dtype: Any) -> protocol.Views:
    """Both views cropped on device from each resident image (`views.two_views`)."""
    from mcl_jax.data import views

    size = self.image_shape[0]
    return lambda rng, batch: views.two_views(
      rng, batch["image"], None, spec, mean=self.mean, std=self.std, size=size, dtype=dtype
    )

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train_images.shape[1:])

  @property
  def num_train(self) -> int:
    return int(self.train_labels.shape[0])

  @property
  def num_eval(self) -> int:
    return int(self.eval_labels.shape[0])


def process(process_index: int | None = None, process_count: int | None = None) -> tuple[int, int]:
  """(this process's index, the process count): JAX's unless given (tests pass them)."""
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  return process_index, process_count


def local_batch_indices(
  global_indices: np.ndarray, process_index: int, process_count: int
) -> np.ndarray:
  """This process's contiguous share of the last axis of `global_indices`.

  A global batch [..., B] is fed by `process_count` processes, process p feeding entries
  [p B/P, (p + 1) B/P): the order in which `jax.make_array_from_process_local_data` lays
  out a batch-sharded array over processes. Works on one batch [B] or an epoch [steps, B].
  """
  global_indices = np.asarray(global_indices)
  size = global_indices.shape[-1]
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count}).")
  if size % process_count:
    raise ValueError(
      f"A global batch of {size} does not split evenly over {process_count} "
      "processes; use a multiple of the process count."
    )
  per_process = size // process_count
  return global_indices[..., process_index * per_process : (process_index + 1) * per_process]


def stratified_choice(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """`size` sorted indices of `labels`, each class in proportion to its frequency.

  Per class c with n_c examples: floor(size n_c / N) examples, plus one for the classes with
  the largest remainders until `size` is reached (balanced classes get exactly size / C).
  Within a class the examples are a uniform random subset.
  """
  labels = np.asarray(labels)
  if not 0 < size <= labels.size:
    raise ValueError(f"Cannot draw {size} examples from a split of {labels.size}.")
  classes, counts = np.unique(labels, return_counts=True)
  exact = size * counts / labels.size
  take = np.floor(exact).astype(np.int64)
  extra = np.argsort(-(exact - take), kind="stable")[: size - take.sum()]
  take[extra] += 1
  chosen = [rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, take)]
  return np.sort(np.concatenate(chosen))


def hold_out_validation(dataset: Dataset, validation_size: int, train_subset: int) -> Dataset:
  """`validation_size` training examples become the validation split (stratified, fixed
  seed), then the rest is cut to a stratified `train_subset` (0: keep all).

  The validation split is drawn first, so it does not depend on the subset size.
  """
  images, labels = dataset.train_images, dataset.train_labels
  val_images = val_labels = None
  if validation_size:
    if validation_size >= labels.size:
      raise ConfigError(
        f"config.input.validation_size={validation_size} leaves no training "
        f"examples of {dataset.name}'s {labels.size}."
      )
    val = stratified_choice(labels, validation_size, np.random.default_rng(SPLIT_SEED))
    keep = np.setdiff1d(np.arange(labels.size), val)
    val_images, val_labels = images[val], labels[val]
    images, labels = images[keep], labels[keep]
  if train_subset:
    if train_subset > labels.size:
      raise ConfigError(
        f"config.input.train_subset={train_subset} is larger than the "
        f"{labels.size} training examples of {dataset.name} left after the "
        "validation split."
      )
    subset = stratified_choice(labels, train_subset, np.random.default_rng(SPLIT_SEED + 1))
    images, labels = images[subset], labels[subset]
  return dataclasses.replace(
    dataset,
    train_images=np.ascontiguousarray(images),
    train_labels=labels,
    val_images=val_images,
    val_labels=val_labels,
  )


def keep_classes(dataset: Dataset, classes: tuple[int, ...]) -> Dataset:
  """Only the examples of `classes` (train and test), relabelled 0..n-1 in that order."""
  classes = tuple(int(c) for c in classes)
  if max(classes) >= dataset.num_classes:
    raise ConfigError(
      f"config.input.classes={classes} names class {max(classes)} but "
      f"{dataset.name} has classes 0..{dataset.num_classes - 1}."
    )
  relabel = np.full(dataset.num_classes, -1, np.int32)
  relabel[list(classes)] = np.arange(len(classes), dtype=np.int32)

  def select(images, labels):
    keep = relabel[labels] >= 0
    return np.ascontiguousarray(images[keep]), relabel[labels[keep]]

  train_images, train_labels = select(dataset.train_images, dataset.train_labels)
  eval_images, eval_labels = select(dataset.eval_images, dataset.eval_labels)
  return dataclasses.replace(
    dataset,
    train_images=train_images,
    train_labels=train_labels,
    eval_images=eval_images,
    eval_labels=eval_labels,
    num_classes=len(classes),
  )


ROTATIONS = 4  # multiples of 90 degrees


def rotation_classes(dataset: Dataset, seed: int = 0) -> Dataset:
  """A many-class task built from the same images: every image (train, validation, test)
  rotated by a fixed pseudo-random multiple of 90 degrees r (one per image, from `seed`),
  labelled 4 c + r, so C classes become 4 C (Fashion-MNIST: 40). The number of images and
  their content stay; left-right flips are switched off, since a flipped rotation is
  another rotation of a flipped item. Used to test whether MCL's gain needs many classes
  per batch (docs/RESULTS.md)."""
  rng = np.random.default_rng(seed)

  def rotate(images, labels):
    turns = rng.integers(0, ROTATIONS, len(labels))
    rotated = (
      np.stack([np.rot90(image, k=int(t), axes=(0, 1)) for image, t in zip(images, turns)])
      if len(labels)
      else images
    )
    return np.ascontiguousarray(rotated), (labels * ROTATIONS + turns).astype(np.int32)

  train_images, train_labels = rotate(dataset.train_images, dataset.train_labels)
  eval_images, eval_labels = rotate(dataset.eval_images, dataset.eval_labels)
  extra = {}
  if dataset.val_labels is not None:
    extra["val_images"], extra["val_labels"] = rotate(dataset.val_images, dataset.val_labels)
  return dataclasses.replace(
    dataset,
    train_images=train_images,
    train_labels=train_labels,
    eval_images=eval_images,
    eval_labels=eval_labels,
    num_classes=dataset.num_classes * ROTATIONS,
    augment=dataclasses.replace(dataset.augment, flip=False),
    **extra,
  )


def eval_indices(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices, mask), both [ceil(N / batch_size), batch_size], covering 0..N-1 in order.

  Padding entries of the last batch point at example 0 (any valid row) with mask 0.
  """
  if batch_size < 1 or num_examples < 1:
    raise ValueError(
      f"eval_indices needs num_examples={num_examples} and batch_size={batch_size} to be positive."
    )
  num_batches = -(-num_examples // batch_size)
  flat = np.arange(num_batches * batch_size)
  mask = (flat < num_examples).astype(np.float32)
  indices = np.where(flat < num_examples, flat, 0).astype(np.int32)
  return indices.reshape(num_batches, batch_size), mask.reshape(num_batches, batch_size)


def eval_batches(
  images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
  """Global eval batches {'image', 'label', 'mask', 'index'} over the whole split, in order.

  Every batch has exactly `batch_size` rows (static shapes: one compile); the last one is
  padded with copies of example 0 carrying mask 0. A process feeding a share of each batch
  slices every entry with `local_batch_indices`' rule.
  """
  indices, mask = eval_indices(len(labels), batch_size)
  for idx, m in zip(indices, mask):
    yield {
      "image": images[idx],
      "label": np.asarray(labels[idx], np.int32),
      "mask": m,
      "index": idx,
    }


def synthetic(
  *,
  num_train: int = 512,
  num_eval: int = 128,
  num_classes: int = 10,
  image_size: int = 32,
  channels: int = 3,
  seed: int = 0,
) -> Dataset:
  """Random uint8 images with balanced random labels, for smoke runs (nothing to learn)."""
  rng = np.random.default_rng(seed)

  def split(n):
    images = rng.integers(0, 256, (n, image_size, image_size, channels), dtype=np.uint8)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    return images, labels

  train_images, train_labels = split(num_train)
  eval_images, eval_labels = split(num_eval)
  return Dataset(
    "synthetic",
    train_images,
    train_labels,
    eval_images,
    eval_labels,
    num_classes=num_classes,
    mean=(0.5,) * channels,
    std=(0.289,) * channels,
  )


def resize_grey(images: np.ndarray, image_size: int) -> np.ndarray:
  """uint8 [N, 28, 28, C] at `image_size`: 28 as is, 14 by 2x2 averaging (float32 in [0, 1],
  no interpolation), 32 by zero padding of 2 pixels (the LeNet layout)."""
  size = images.shape[1]
  if image_size == size:
    return images
  if image_size * 2 == size:
    n, _, _, c = images.shape
    pooled = images.reshape(n, image_size, 2, image_size, 2, c).astype(np.float32).mean((2, 4))
    return pooled / 255.0
  if image_size == size + 4:
    return np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  raise ConfigError(
    f"config.input.image_size={image_size} is not {size} (native), "
    f"{size // 2} (2x2 average) or {size + 4} (zero-padded) for "
    f"{size}x{size} images."
  )


def per_channel_mean_std(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of images in [0, 1] units (uint8 input is scaled by 1/255)."""
  scale = 255.0 if images.dtype == np.uint8 else 1.0
  axes = tuple(range(images.ndim - 1))
  mean = images.mean(axis=axes, dtype=np.float64) / scale
  std = images.std(axis=axes, dtype=np.float64) / scale
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)
