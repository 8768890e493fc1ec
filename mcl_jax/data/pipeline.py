"""Dataset sources and the in-memory batch plumbing the trainer uses.

`make_source(config.input)` returns, by `config.input.dataset`:
- 'digits', 'cifar10', 'cifar100', 'synthetic': an in-memory `Dataset` (numpy arrays). The
  whole training set is small enough to live on every device: the trainer `device_put`s
  `train_images`/`train_labels` once and gathers each batch by index inside the jitted step;
  batch indices come from `mcl_jax.data.sampler` (a pure function of (seed, epoch)), and
  each process feeds its contiguous slice of them (`local_batch_indices`). Augmentation then
  runs on device (`mcl_jax.data.augment.train_augment(rng, images, dataset.augment, ...)`).
- 'imagenet2012', 'image_folder': a streaming source from `mcl_jax.data.imagenet` (tf.data,
  decoded on the host), with `train_batches(...)` / `eval_batches(...)` iterators.

Both kinds expose `num_classes`, `image_shape`, `mean`, `std`, `train_labels` and
`num_train` / `num_eval`; `dataset.streaming` tells them apart.

Evaluation is exact on any device count: `eval_batches` pads the last batch and marks the
padding with mask 0, so sums of (correct * mask) over all batches count every example once.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from mcl_jax.data import augment as augment_lib

DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "synthetic", "imagenet2012",
            "image_folder")
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
  streaming = False

  def eval_splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'test': (images, labels)} and, when held out, {'validation': ...} as well."""
    splits = {"test": (self.eval_images, self.eval_labels)}
    if self.val_labels is not None:
      splits["validation"] = (self.val_images, self.val_labels)
    return splits

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train_images.shape[1:])

  @property
  def num_train(self) -> int:
    return int(self.train_labels.shape[0])

  @property
  def num_eval(self) -> int:
    return int(self.eval_labels.shape[0])


def local_batch_indices(global_indices: np.ndarray, process_index: int, process_count: int
                        ) -> np.ndarray:
  """This process's contiguous share of the last axis of `global_indices`.

  A global batch [..., B] is fed by `process_count` processes, process p feeding entries
  [p B/P, (p + 1) B/P): the order in which `jax.make_array_from_process_local_data` lays
  out a batch-sharded array over processes. Works on one batch [B] or an epoch [steps, B].
  """
  global_indices = np.asarray(global_indices)
  size = global_indices.shape[-1]
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count="
                     f"{process_count}).")
  if size % process_count:
    raise ValueError(f"A global batch of {size} does not split evenly over {process_count} "
                     "processes; use a multiple of the process count.")
  per_process = size // process_count
  return global_indices[..., process_index * per_process:(process_index + 1) * per_process]


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
  extra = np.argsort(-(exact - take), kind="stable")[:size - take.sum()]
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
      raise ValueError(f"config.input.validation_size={validation_size} leaves no training "
                       f"examples of {dataset.name}'s {labels.size}.")
    val = stratified_choice(labels, validation_size, np.random.default_rng(SPLIT_SEED))
    keep = np.setdiff1d(np.arange(labels.size), val)
    val_images, val_labels = images[val], labels[val]
    images, labels = images[keep], labels[keep]
  if train_subset:
    if train_subset > labels.size:
      raise ValueError(f"config.input.train_subset={train_subset} is larger than the "
                       f"{labels.size} training examples of {dataset.name} left after the "
                       "validation split.")
    subset = stratified_choice(labels, train_subset, np.random.default_rng(SPLIT_SEED + 1))
    images, labels = images[subset], labels[subset]
  return dataclasses.replace(dataset, train_images=np.ascontiguousarray(images),
                             train_labels=labels, val_images=val_images, val_labels=val_labels)


def eval_indices(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices, mask), both [ceil(N / batch_size), batch_size], covering 0..N-1 in order.

  Padding entries of the last batch point at example 0 (any valid row) with mask 0.
  """
  if batch_size < 1 or num_examples < 1:
    raise ValueError(f"eval_indices needs num_examples={num_examples} and "
                     f"batch_size={batch_size} to be positive.")
  num_batches = -(-num_examples // batch_size)
  flat = np.arange(num_batches * batch_size)
  mask = (flat < num_examples).astype(np.float32)
  indices = np.where(flat < num_examples, flat, 0).astype(np.int32)
  return indices.reshape(num_batches, batch_size), mask.reshape(num_batches, batch_size)


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Global eval batches {'image', 'label', 'mask', 'index'} over the whole split, in order.

  Every batch has exactly `batch_size` rows (static shapes: one compile); the last one is
  padded with copies of example 0 carrying mask 0. A process feeding a share of each batch
  slices every entry with `local_batch_indices`' rule.
  """
  indices, mask = eval_indices(len(labels), batch_size)
  for idx, m in zip(indices, mask):
    yield {"image": images[idx], "label": np.asarray(labels[idx], np.int32), "mask": m,
           "index": idx}


def synthetic(*, num_train: int = 512, num_eval: int = 128, num_classes: int = 10,
              image_size: int = 32, channels: int = 3, seed: int = 0) -> Dataset:
  """Random uint8 images with balanced random labels, for smoke runs (nothing to learn)."""
  rng = np.random.default_rng(seed)

  def split(n):
    images = rng.integers(0, 256, (n, image_size, image_size, channels), dtype=np.uint8)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
    return images, labels

  train_images, train_labels = split(num_train)
  eval_images, eval_labels = split(num_eval)
  return Dataset("synthetic", train_images, train_labels, eval_images, eval_labels,
                 num_classes=num_classes, mean=(0.5,) * channels, std=(0.289,) * channels)


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
  raise ValueError(f"config.input.image_size={image_size} is not {size} (native), "
                   f"{size // 2} (2x2 average) or {size + 4} (zero-padded) for "
                   f"{size}x{size} images.")


def per_channel_mean_std(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of images in [0, 1] units (uint8 input is scaled by 1/255)."""
  scale = 255.0 if images.dtype == np.uint8 else 1.0
  axes = tuple(range(images.ndim - 1))
  mean = images.mean(axis=axes, dtype=np.float64) / scale
  std = images.std(axis=axes, dtype=np.float64) / scale
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _get(cfg: Any, key: str, default: Any) -> Any:
  """cfg.key for a ConfigDict, dict or plain object; `default` when absent or None."""
  if isinstance(cfg, dict) or hasattr(cfg, "get"):
    value = cfg.get(key, default)
  else:
    value = getattr(cfg, key, default)
  return default if value is None else value


def make_source(input_cfg: Any):
  """The dataset named by `input_cfg.dataset` (the `config.input` section).

  Fields read: dataset; data_dir (tfds data_dir, an image folder root, or the folder of the
  Fashion-MNIST IDX files); image_size (digits: a multiple of 8; Fashion-MNIST: 28, 14 or
  32; synthetic; ImageNet crop size); synthetic_train_size, synthetic_eval_size,
  synthetic_num_classes (synthetic only); download (tfds datasets, default True);
  validation_size and train_subset (in-memory datasets: `hold_out_validation`).
  Returns a `Dataset` (in memory) or an `imagenet.ImageFolderSource` /
  `imagenet.TfdsImageNetSource` (streaming).
  """
  name = _get(input_cfg, "dataset", None)
  dataset = _in_memory_source(name, input_cfg)
  if dataset is None:
    return _streaming_source(name, input_cfg)
  validation_size = int(_get(input_cfg, "validation_size", 0))
  train_subset = int(_get(input_cfg, "train_subset", 0))
  if validation_size or train_subset:
    dataset = hold_out_validation(dataset, validation_size, train_subset)
  return dataset


def _in_memory_source(name: str, input_cfg: Any) -> Dataset | None:
  data_dir = _get(input_cfg, "data_dir", "") or None
  image_size = int(_get(input_cfg, "image_size", 32))
  if name == "digits":
    from mcl_jax.data import digits
    x_train, y_train, x_test, y_test = digits.load_digits(image_size)
    mean, std = digits.mean_std(x_train)
    # Digits are not left-right symmetric: crop only, a 1/8-of-the-side shift like CIFAR's.
    spec = augment_lib.AugmentSpec(crop_padding=image_size // 8, flip=False)
    return Dataset("digits", x_train, y_train, x_test, y_test, num_classes=digits.NUM_CLASSES,
                   mean=mean, std=std, augment=spec)
  if name in ("cifar10", "cifar100"):
    from mcl_jax.data import cifar
    x_train, y_train, x_test, y_test = cifar.load_cifar(
        name, data_dir, download=bool(_get(input_cfg, "download", True)))
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes=cifar.NUM_CLASSES[name],
                   mean=augment_lib.CIFAR_MEAN, std=augment_lib.CIFAR_STD,
                   augment=augment_lib.AugmentSpec(crop_padding=4, flip=True))
  if name == "fashion_mnist":
    from mcl_jax.data import fashion_mnist
    x_train, y_train, x_test, y_test = fashion_mnist.load(
        data_dir, download=bool(_get(input_cfg, "download", True)))
    x_train, x_test = (resize_grey(x, image_size) for x in (x_train, x_test))
    mean, std = per_channel_mean_std(x_train)
    # Clothes are left-right symmetric; crop shift 1/8 of the side, as CIFAR's 4 of 32.
    spec = augment_lib.AugmentSpec(crop_padding=max(1, image_size // 8), flip=True)
    return Dataset("fashion_mnist", x_train, y_train, x_test, y_test,
                   num_classes=fashion_mnist.NUM_CLASSES, mean=mean, std=std, augment=spec)
  if name == "synthetic":
    return synthetic(num_train=int(_get(input_cfg, "synthetic_train_size", 512)),
                     num_eval=int(_get(input_cfg, "synthetic_eval_size", 128)),
                     num_classes=int(_get(input_cfg, "synthetic_num_classes", 10)),
                     image_size=image_size)
  return None


def _streaming_source(name: str, input_cfg: Any):
  data_dir = _get(input_cfg, "data_dir", "") or None
  image_size = int(_get(input_cfg, "image_size", 32))
  if name == "imagenet2012":
    from mcl_jax.data import imagenet
    return imagenet.TfdsImageNetSource(data_dir=data_dir, image_size=image_size)
  if name == "image_folder":
    from mcl_jax.data import imagenet
    if not data_dir:
      from mcl_jax.config_lib import ConfigError
      raise ConfigError("config.input.data_dir is empty; the image_folder dataset needs the "
                        "folder that holds train/<class>/*.jpg and val/<class>/*.jpg.")
    return imagenet.ImageFolderSource(data_dir, image_size=image_size)
  from mcl_jax.config_lib import ConfigError
  raise ConfigError(f"Unknown dataset config.input.dataset={name!r}; choose one of "
                    f"{', '.join(DATASETS)}.")
