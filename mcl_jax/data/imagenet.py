"""ImageNet input: tf.data pipelines over tfds `imagenet2012` or a plain image folder.

Two sources with one interface (`streaming = True`):

- `TfdsImageNetSource(data_dir, image_size)`: tfds `imagenet2012`. TFDS cannot download
  ImageNet; prepare it once (about 150 GB of TFRecords, an hour or more):
    1. Download ILSVRC2012_img_train.tar (138 GB) and ILSVRC2012_img_val.tar (6.3 GB) from
       https://image-net.org (an account is needed) into one folder, MANUAL_DIR.
    2. `tfds build imagenet2012 --manual_dir=MANUAL_DIR --data_dir=DATA_DIR`
       (or `tfds.builder('imagenet2012', data_dir=DATA_DIR).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=MANUAL_DIR))`).
    3. Train with `config.input.dataset='imagenet2012'`, `config.input.data_dir=DATA_DIR`
       (a local path or gs://bucket/path, readable from every host).
- `ImageFolderSource(root, image_size)`: `root/train/<class>/*.jpg` and
  `root/val/<class>/*.jpg` (the layout of the official code's `ImageFolder`; the validation
  images sorted into class folders, e.g. with the usual `valprep.sh`). Classes are the
  train sub-folder names sorted alphabetically (label = position), files sorted within a
  class, so example i is the same file on every host (torchvision's ImageFolder order).

Transforms (official `dataset/imagenet.py`):
- train: torchvision `RandomResizedCrop(image_size)` (scale (0.08, 1), ratio (3/4, 4/3),
  10 attempts then a centre crop, bilinear) and `RandomHorizontalFlip()`. The crop window
  is drawn from the JPEG header (`extract_jpeg_shape`) and only that window is decoded
  (`decode_and_crop_jpeg`). Randomness is stateless, keyed by (seed, epoch, example index):
  the same epoch always gives the same crops.
- eval: `Resize(round(image_size * 256 / 224))` of the shorter side (bilinear, antialiased)
  then `CenterCrop(image_size)`.

Batches are numpy dicts: `image` [b, S, S, 3] (uint8 by default, normalised on device by
`augment.normalize`; or float32 already normalised with `output_dtype='float32'`),
`label` int32, `index` int32 (the example's dense index 0..N-1 in the split: its memory-bank
row), and for eval `mask` float32 (0 on padding). Each process reads only its own share
and yields `global_batch_size / process_count` rows per batch; every process yields the
same number of batches.

Broken files in an image folder do not stop a run (docs/RELIABILITY.md, "Broken data"):
names that are not images are left out at listing, and an image that does not decode
(truncated, empty, not an image) is replaced in its batch by a copy of another row of
that batch (eval: masked out), with the count in one warning per epoch.

`train_labels` (the label of every training example, in dense-index order; the memory
bank's class table) never decodes an image: for the folder it comes from the folder names;
for tfds it takes one pass over the training records reading only labels, which still
reads all ~140 GB from disk (minutes on local SSD, longer from a bucket), so it is cached
in `label_cache` (default: `train_labels.npy` beside the tfds data, when writable).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
import math
import os
from typing import Any

from absl import logging
import numpy as np

from mcl_jax.data import augment as augment_lib
from mcl_jax.data import pipeline
from mcl_jax.data import protocol
from mcl_jax.data import sampler
from mcl_jax.data import tf_lazy
from mcl_jax.errors import ConfigError
from mcl_jax.errors import DatasetNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
EVAL_RESIZE_RATIO = 256.0 / 224.0
_TRAIN_STREAM = 0x696D_6E74  # "imnt": seeds of the training order and crops


def _epoch_seed(seed: int, epoch: int) -> int:
  """A 31-bit integer from (seed, epoch), for tf.data shuffles and stateless crops."""
  state = np.random.SeedSequence([_TRAIN_STREAM, int(seed), int(epoch)]).generate_state(1)
  return int(state[0] >> 1)


def _local_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size={global_batch_size} does not split evenly over {process_count} processes."
    )
  return global_batch_size // process_count


# ---------------------------------------------------------------------------------------
# Per-example transforms (TensorFlow graph functions).


def random_resized_crop_window(
  tf, height, width, seed, scale=CROP_SCALE, ratio=CROP_RATIO, attempts: int = 10
):
  """torchvision RandomResizedCrop.get_params: (top, left, h, w) as int32 scalars.

  All `attempts` proposals are drawn at once; the first that fits wins, else the
  torchvision fallback (the whole image, its aspect ratio clamped into `ratio`, centred).
  """
  seeds = tf.random.experimental.stateless_split(seed, num=4)
  h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = h_f * w_f
  target_area = area * tf.random.stateless_uniform([attempts], seeds[0], scale[0], scale[1])
  log_ratio = tf.random.stateless_uniform(
    [attempts], seeds[1], math.log(ratio[0]), math.log(ratio[1])
  )
  aspect = tf.exp(log_ratio)
  ws = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  hs = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  ok = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  # Index of the first proposal that fits (argmax does not promise the first on ties).
  first = tf.minimum(tf.reduce_min(tf.where(ok, tf.range(attempts), attempts)), attempts - 1)

  # Fallback: centre crop of the whole image with the ratio clamped (torchvision).
  in_ratio = w_f / h_f
  fb_w = tf.where(
    in_ratio < ratio[0],
    width,
    tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_f * ratio[1]), tf.int32), width),
  )
  fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_f / ratio[0]), tf.int32), height)
  found = tf.reduce_any(ok)
  h = tf.where(found, hs[first], fb_h)
  w = tf.where(found, ws[first], fb_w)
  u = tf.random.stateless_uniform([2], seeds[2])
  top_rand = tf.cast(tf.floor(u[0] * tf.cast(height - h + 1, tf.float32)), tf.int32)
  left_rand = tf.cast(tf.floor(u[1] * tf.cast(width - w + 1, tf.float32)), tf.int32)
  top = tf.where(found, tf.minimum(top_rand, height - h), (height - h) // 2)
  left = tf.where(found, tf.minimum(left_rand, width - w), (width - w) // 2)
  return top, left, h, w


def _decode_window(tf, image_bytes, window_fn):
  """Decodes only a window of the image: `window_fn(height, width) -> (top, left, h, w)`.

  JPEG: the shape comes from the header and only the window is decoded. Anything else TF
  can read (PNG, BMP; e.g. the one PNG among ImageNet's .JPEG files): full decode + slice.
  """

  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_bytes)
    top, left, h, w = window_fn(shape[0], shape[1])
    return tf.image.decode_and_crop_jpeg(
      image_bytes, tf.stack([top, left, h, w]), channels=3, dct_method="INTEGER_ACCURATE"
    )

  def other():
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    shape = tf.shape(image)
    top, left, h, w = window_fn(shape[0], shape[1])
    return image[top : top + h, left : left + w, :]

  image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def _finish(tf, image, output_dtype: str, mean, std):
  """float pixels in [0, 255] -> uint8, or float32 normalised with mean/std."""
  if output_dtype == "uint8":
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
  image = image / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def train_transform(
  image_bytes,
  seed,
  *,
  image_size: int,
  output_dtype: str = "uint8",
  mean: Sequence[float] = augment_lib.IMAGENET_MEAN,
  std: Sequence[float] = augment_lib.IMAGENET_STD,
):
  """Encoded image + stateless seed [2] -> random-resized crop, flipped, [S, S, 3]."""
  tf = tf_lazy.tf()
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  image = _decode_window(
    tf, image_bytes, lambda h, w: random_resized_crop_window(tf, h, w, crop_seed)
  )
  image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
  image = tf.cond(
    tf.random.stateless_uniform([], flip_seed) < 0.5,
    lambda: tf.reverse(image, axis=[1]),
    lambda: image,
  )
  return _finish(tf, image, output_dtype, mean, std)


def two_view_transform(image_bytes, seed, *, image_size: int, crop_scale: tuple[float, float]):
  """Encoded image + stateless seed [2] -> two independent random-resized crops, uint8.

  MoCo's views: crops at `crop_scale`, not flipped (the device flips and colour-augments
  each view after decoding).
  """
  tf = tf_lazy.tf()

  def view(view_seed):
    image = _decode_window(
      tf,
      image_bytes,
      lambda h, w: random_resized_crop_window(tf, h, w, view_seed, scale=crop_scale),
    )
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    return _finish(tf, image, "uint8", None, None)

  seed1, seed2 = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  return view(seed1), view(seed2)


def eval_transform(
  image_bytes,
  *,
  image_size: int,
  output_dtype: str = "uint8",
  mean: Sequence[float] = augment_lib.IMAGENET_MEAN,
  std: Sequence[float] = augment_lib.IMAGENET_STD,
):
  """torchvision Resize(round(S * 256/224)) + CenterCrop(S) of an encoded image."""
  tf = tf_lazy.tf()
  resize = int(round(image_size * EVAL_RESIZE_RATIO))
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  # Shorter side -> `resize`, the longer side truncated as torchvision's int().
  short = tf.cast(tf.minimum(h, w), tf.float32)
  new_h = tf.where(h <= w, resize, tf.cast(resize * tf.cast(h, tf.float32) / short, tf.int32))
  new_w = tf.where(h <= w, tf.cast(resize * tf.cast(w, tf.float32) / short, tf.int32), resize)
  image = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
  top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float32) / 2.0), tf.int32)
  image = image[top : top + image_size, left : left + image_size, :]
  image.set_shape([image_size, image_size, 3])
  return _finish(tf, image, output_dtype, mean, std)


def _options(tf):
  options = tf.data.Options()
  options.deterministic = True  # same seed -> same batches, also with parallel map
  options.experimental_optimization.map_parallelization = True
  return options


# ---------------------------------------------------------------------------------------
# Sources.


class _StreamingSource(abc.ABC):
  """What both ImageNet sources share: metadata, steps, output conventions, and the parts
  of the data-source protocol (`mcl_jax.data.pipeline`) that do not depend on where the
  files come from."""

  mean = augment_lib.IMAGENET_MEAN
  std = augment_lib.IMAGENET_STD
  name: str
  num_classes: int
  image_size: int
  output_dtype: str

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)

  @property
  @abc.abstractmethod
  def num_train(self) -> int:
    """Training examples (bank rows): the tfds split size, or the files found."""

  # -- the data-source protocol (mcl_jax.data.protocol.Source): a test split (and the
  # training split un-augmented), nothing resident on the device, images arriving cropped
  # and flipped (normalised on device).
  def eval_split_names(self) -> tuple[str, ...]:
    return ("test",)

  def device_arrays(self) -> dict[str, np.ndarray]:
    return {}

  def abstract_train_batch(self, global_batch_size: int) -> dict[str, Any]:
    import jax

    spec = lambda shape, dtype: jax.ShapeDtypeStruct((global_batch_size, *shape), dtype)
    image = spec(self.image_shape, np.uint8 if self.output_dtype == "uint8" else np.float32)
    batch = {"image": image, "label": spec((), np.int32), "index": spec((), np.int32)}
    if self.two_view_crop_scale is not None:
      batch["image2"] = image
    return batch

  def materialize(
    self, consts: dict[str, Any], batch: dict[str, Any], *, labels: bool = True
  ) -> dict[str, Any]:
    """The host's decoded crops as they came (the labels left out with labels=False)."""
    del consts
    return {k: v for k, v in batch.items() if labels or k != "label"}

  def train_preprocess(self, rng: Any, images: Any, dtype: Any = None) -> Any:
    del rng  # the host's crops and flips are the augmentation
    return self.eval_preprocess(images, dtype)

  def eval_preprocess(self, images: Any, dtype: Any = None) -> Any:
    import jax.numpy as jnp

    return augment_lib.normalize(images, self.mean, self.std, dtype or jnp.float32)

  def two_views(self, spec: Any, dtype: Any) -> Any:
    """The host made both crops (`two_view_crop_scale`); colour, blur and flip on device."""
    from mcl_jax.data import views

    if self.two_view_crop_scale is None:
      raise ValueError(
        f"{self.name} was built for one view per image; build it with "
        "two_view_crop_scale for a two-view regime."
      )
    size = self.image_size
    return lambda rng, batch: views.two_views(
      rng,
      batch["image"],
      batch["image2"],
      spec,
      mean=self.mean,
      std=self.std,
      size=size,
      dtype=dtype,
    )

  @staticmethod
  def _check_order(samples_per_class: int) -> None:
    if samples_per_class:
      raise ValueError(
        f"config.input.samples_per_class={samples_per_class}: streamed "
        "ImageNet batches are plain shuffles; set it to 0."
      )

  @staticmethod
  def _check_split(split: str) -> None:
    if split not in ("test", protocol.TRAIN_SPLIT):
      raise ValueError(
        f"Streaming sources evaluate on their validation set as 'test' (and "
        f"replay the training set as 'train'), not {split!r}."
      )

  def steps_per_epoch(self, global_batch_size: int) -> int:
    """Whole global batches per epoch (remainder dropped, the same on every process)."""
    return sampler.steps_per_epoch(self.num_train, global_batch_size)

  # None: one supervised crop per example; (lo, hi): two crops per image, each with a
  # RandomResizedCrop scale in (lo, hi) (the self-supervised regimes' views).
  two_view_crop_scale: tuple[float, float] | None = None

  def _set_views(self, two_view_crop_scale: tuple[float, float] | None) -> None:
    """Constructor part: training examples become two crops of the image ("image",
    "image2"), uint8, unflipped, when `two_view_crop_scale` is given. Seeding is unchanged
    (epoch seed, example index): batches stay a pure function of (seed, epoch)."""
    if two_view_crop_scale is None:
      return
    if self.output_dtype != "uint8":
      raise ConfigError(
        "Two views per image need uint8 output (the device normalises "
        f"after colour augmentation), not {self.output_dtype}."
      )
    lo, hi = two_view_crop_scale
    self.two_view_crop_scale = (lo, hi)

  def _train_map(self, epoch_seed: int):
    tf = tf_lazy.tf()
    kwargs = dict(
      image_size=self.image_size, output_dtype=self.output_dtype, mean=self.mean, std=self.std
    )
    crop_scale = self.two_view_crop_scale

    def fn(image_bytes, label, index):
      seed = tf.stack([tf.constant(epoch_seed, tf.int64), tf.cast(index, tf.int64)])
      example = {"label": tf.cast(label, tf.int32), "index": tf.cast(index, tf.int32)}
      if crop_scale is None:
        example["image"] = train_transform(image_bytes, seed, **kwargs)
      else:
        example["image"], example["image2"] = two_view_transform(
          image_bytes, seed, image_size=self.image_size, crop_scale=crop_scale
        )
      return example

    return fn

  def _eval_map(self):
    tf = tf_lazy.tf()
    kwargs = dict(
      image_size=self.image_size, output_dtype=self.output_dtype, mean=self.mean, std=self.std
    )

    def fn(image_bytes, label, index, mask):
      return {
        "image": eval_transform(image_bytes, **kwargs),
        "label": tf.cast(label, tf.int32),
        "index": tf.cast(index, tf.int32),
        "mask": tf.cast(mask, tf.float32),
      }

    return fn


def _list_images(folder: str, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(paths, labels, skipped) of `folder/<class>/**` images, classes in the given order,
  files sorted.

  `skipped`: the files whose name alone says they are not images, left out before they
  can cost a decode: no image extension (README.txt) or hidden (.DS_Store, macOS'
  `._name.jpg` copies). Only names are read: no stat per file (an empty file fails at
  decode time like a truncated one), so the listing costs what `ls` does, and the dense
  indices (memory-bank rows) do not move when a damaged file is repaired between runs.
  """
  paths, labels, skipped = [], [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(folder, name)
    if not os.path.isdir(class_dir):
      continue
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
      dirnames.sort()
      for filename in sorted(filenames):
        path = os.path.join(dirpath, filename)
        if filename.startswith(".") or not filename.lower().endswith(IMAGE_EXTENSIONS):
          skipped.append(path)
        else:
          paths.append(path)
          labels.append(label)
  return np.asarray(paths, dtype=object), np.asarray(labels, dtype=np.int32), skipped


def _some(paths: Sequence[str], shown: int = 3) -> str:
  """'a, b, c and 4 more': a few of `paths`, so that a warning stays one line."""
  head = ", ".join(str(p) for p in paths[:shown])
  return head + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def _step_batches(columns: tuple[np.ndarray, ...], decode):
  """A tf.data pipeline with exactly one element per step: the rows that decoded.

  `columns` are [steps, local] arrays (the first one the file paths); `decode(*row)` reads
  and decodes one row. Each step's rows get their own small pipeline in which a failing
  row (truncated, empty or vanished file, not an image) is dropped (`ignore_errors`)
  instead of ending the epoch; steps are decoded in parallel and yielded in step order
  (a deterministic interleave where each step yields one element), and a step whose every
  row fails still yields an empty element, so the batches never shift from one step to
  the next and every process yields as many as the others. `_complete_batches` fills the
  dropped rows back in.
  """
  tf = tf_lazy.tf()
  local = columns[0].shape[1]

  def one_step(*step):
    rows = (
      tf.data.Dataset.from_tensor_slices(step)
      .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      .ignore_errors()
    )
    empty = tf.nest.map_structure(
      lambda spec: tf.zeros([0, *spec.shape], spec.dtype), rows.element_spec
    )
    return rows.batch(local).concatenate(tf.data.Dataset.from_tensors(empty)).take(1)

  return tf.data.Dataset.from_tensor_slices(columns).interleave(
    one_step, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
  )


def _complete_batches(
  batches: Iterator[dict[str, np.ndarray]],
  indices: np.ndarray,
  files: np.ndarray,
  *,
  what: str,
  fill: str,
) -> Iterator[dict[str, np.ndarray]]:
  """The batches of `_step_batches` with their rows that did not decode filled back in.

  `indices` [steps, local]: the dense indices each step asked for, `files` the paths by
  dense index. A batch short of rows is completed with copies of its own first rows (a
  pure function of the step's files, so the order stays a pure function of (seed, epoch));
  in eval batches (`mask`) the copies carry mask 0, i.e. the bad image is left out of the
  metrics. When the iterator ends or is closed, one warning gives the count and a few of
  the files. A step none of whose rows decodes stops with one sentence: the folder is
  damaged beyond skipping.
  """
  failed: dict[str, None] = {}  # the files that did not decode, in order, once each
  try:
    for wanted, batch in zip(indices, batches):
      got = len(batch["index"])
      if got < len(wanted):
        missing = np.setdiff1d(wanted, batch["index"])
        failed.update((str(f), None) for f in files[missing])
        if got == 0:
          raise ConfigError(
            f"None of the {len(wanted)} {what} in a batch could be decoded "
            f"({_some(files[wanted].tolist())}); the image folder is damaged: check "
            "that its files are whole JPEG/PNG images."
          )
        rows = np.arange(len(wanted)) % got
        batch = {key: value[rows] for key, value in batch.items()}
        if "mask" in batch:
          batch["mask"][got:] = 0.0
      yield batch
  finally:
    if failed:
      logging.warning(
        "%d %s could not be decoded (truncated, empty or not an image: %s) and %s.",
        len(failed),
        what,
        _some(list(failed)),
        fill,
      )


class ImageFolderSource(_StreamingSource):
  """`root/train/<class>/*` and `root/val/<class>/*`, read with tf.data.

  Training order: each epoch is `sampler.shuffled_epoch(N, seed, epoch)` (a pure function
  of (seed, epoch), like the CIFAR path) and each process decodes only its contiguous
  slice of every global batch, so over an epoch the processes read disjoint files, and a
  run resumed at any step (`start_step`) reads exactly the batches it would have.
  """

  def __init__(
    self,
    root: str,
    *,
    image_size: int = 224,
    output_dtype: str = "uint8",
    train_dir: str = "train",
    eval_dir: str = "val",
    two_view_crop_scale: tuple[float, float] | None = None,
  ):
    if output_dtype not in ("uint8", "float32"):
      raise ValueError(f"output_dtype={output_dtype!r} must be 'uint8' or 'float32'.")
    train_root = os.path.join(root, train_dir)
    eval_root = os.path.join(root, eval_dir)
    for path in (train_root, eval_root):
      if not os.path.isdir(path):
        raise DatasetNotFoundError(
          f"Image folder {path} does not exist; the image_folder dataset needs "
          f"{train_root}/<class>/*.jpg and {eval_root}/<class>/*.jpg."
        )
    self.root, self.image_size, self.output_dtype = root, int(image_size), output_dtype
    self.name = "image_folder"
    self._set_views(two_view_crop_scale)
    self.class_names = sorted(
      e.name for e in os.scandir(train_root) if e.is_dir() and not e.name.startswith(".")
    )
    unknown = sorted(
      e.name
      for e in os.scandir(eval_root)
      if e.is_dir() and not e.name.startswith(".") and e.name not in self.class_names
    )
    if unknown:
      raise DatasetNotFoundError(
        f"{eval_root} has class folders that {train_root} lacks ({', '.join(unknown[:3])}"
        "...); both must use the same class folder names."
      )
    self.num_classes = len(self.class_names)
    self.train_files, self._train_labels, skipped = _list_images(train_root, self.class_names)
    self.eval_files, self.eval_labels, eval_skipped = _list_images(eval_root, self.class_names)
    skipped += eval_skipped
    if skipped:
      logging.warning(
        "Image folder %s: skipped %d files that are not images (no image "
        "extension %s, or hidden): %s.",
        root,
        len(skipped),
        "/".join(IMAGE_EXTENSIONS),
        _some(skipped),
      )
    for path, files in ((train_root, self.train_files), (eval_root, self.eval_files)):
      if len(files) == 0:
        raise DatasetNotFoundError(
          f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {path}/<class>/."
        )
    if self.num_classes < 2:
      raise DatasetNotFoundError(
        f"{train_root} has {self.num_classes} class folder; a classifier needs at least 2 "
        "(one folder of images per class)."
      )
    counts = np.bincount(self._train_labels, minlength=self.num_classes)
    if not counts.all():
      empty = [self.class_names[i] for i in np.flatnonzero(counts == 0)]
      raise DatasetNotFoundError(
        f"The class folder {os.path.join(train_root, empty[0])} holds no images "
        f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add its images."
      )

  @property
  def train_labels(self) -> np.ndarray:
    """int32 [N]: label of training example i (dense index i), from the folder names."""
    return self._train_labels

  def class_labels(self) -> np.ndarray:
    return self.train_labels

  @property
  def num_train(self) -> int:
    return len(self.train_files)

  @property
  def num_eval(self) -> int:
    return len(self.eval_files)

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
    """This process's share of every training batch of `epoch`, from `start_step` on."""
    self._check_order(samples_per_class)
    tf = tf_lazy.tf()
    p, count = pipeline.process(process_index, process_count)
    _local_batch(global_batch_size, count)  # the batch must split evenly over processes
    order = sampler.shuffled_epoch(
      self.num_train, epoch=epoch, seed=seed, global_batch_size=global_batch_size
    )
    indices = pipeline.local_batch_indices(order, p, count)[start_step:]  # [steps, local]
    train_map = self._train_map(_epoch_seed(seed, epoch))

    def decode(path, label, index):
      return train_map(tf.io.read_file(path), label, index)

    ds = _step_batches(
      (self.train_files[indices].astype(str), self._train_labels[indices], indices), decode
    )
    batches = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(tf)).as_numpy_iterator()
    return _complete_batches(
      batches,
      indices,
      self.train_files,
      what=f"training images of epoch {epoch}",
      fill="were replaced by copies of other images of their batches; training goes on",
    )

  def eval_batches(
    self,
    split: str,
    global_batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
  ) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of padded eval batches covering the whole val split (or the
    training split, 'train', with the eval transform) once."""
    self._check_split(split)
    tf = tf_lazy.tf()
    p, count = pipeline.process(process_index, process_count)
    _local_batch(global_batch_size, count)  # the batch must split evenly over processes
    train = split == protocol.TRAIN_SPLIT
    files, labels = (
      (self.train_files, self._train_labels) if train else (self.eval_files, self.eval_labels)
    )
    indices, mask = pipeline.eval_indices(len(files), global_batch_size)
    indices = pipeline.local_batch_indices(indices, p, count)  # [steps, local]
    mask = pipeline.local_batch_indices(mask, p, count)
    eval_map = self._eval_map()

    def decode(path, *rest):
      return eval_map(tf.io.read_file(path), *rest)

    ds = _step_batches((files[indices].astype(str), labels[indices], indices, mask), decode)
    batches = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(tf)).as_numpy_iterator()
    return _complete_batches(
      batches,
      indices,
      files,
      what="training images" if train else "validation images",
      fill="were left out of this evaluation",
    )


class TfdsImageNetSource(_StreamingSource):
  """tfds `imagenet2012` (prepared from the manual download, see the module docstring).

  Each process reads its `tfds.split_for_jax_process` share of a split. Training: files
  interleaved and examples shuffled with seeds derived from (seed, epoch), crops keyed by
  (seed, epoch, index), so an epoch is reproducible; `start_step` skips records before
  decoding (cheap, but they are still read). Dense index = first example of the record's
  file (from the split's shard lengths) + its position in the file (the `tfds_id`).
  """

  def __init__(
    self,
    data_dir: str | None = None,
    *,
    image_size: int = 224,
    output_dtype: str = "uint8",
    train_split: str = "train",
    eval_split: str = "validation",
    shuffle_buffer: int = 16_384,
    label_cache: str | None = None,
    name: str = "imagenet2012",
    two_view_crop_scale: tuple[float, float] | None = None,
  ):
    if output_dtype not in ("uint8", "float32"):
      raise ValueError(f"output_dtype={output_dtype!r} must be 'uint8' or 'float32'.")
    tfds = tf_lazy.tfds()
    self.name, self.image_size, self.output_dtype = name, int(image_size), output_dtype
    self._set_views(two_view_crop_scale)
    self.train_split, self.eval_split = train_split, eval_split
    self.shuffle_buffer = shuffle_buffer
    self.builder = tfds.builder(name, data_dir=data_dir or None)
    where = data_dir or "tfds' default data_dir (~/tensorflow_datasets)"
    try:  # Fail at start-up, not at the first eval: building the pipeline reads no data.
      self.builder.as_dataset(split=eval_split)
    except AssertionError as e:
      raise DatasetNotFoundError(
        f"tfds {name!r} was not found in {where}; ImageNet cannot be downloaded "
        f"automatically: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
        f"MANUAL_DIR and run `tfds build {name} --manual_dir=MANUAL_DIR "
        f"--data_dir=DATA_DIR` (see mcl_jax/data/imagenet.py)."
      ) from e
    self.num_classes = int(self.builder.info.features["label"].num_classes)
    self._label_cache = label_cache
    self._train_labels: np.ndarray | None = None
    self._counts: dict[str, int] = {}

  # -- metadata
  def _split_info(self, split: str):
    """tfds SplitInfo, or None when unknown (tfds.testing.mock_data)."""
    splits = self.builder.info.splits
    try:
      return splits[split] if len(splits) else None
    except KeyError:
      return None

  def _num_examples(self, split: str) -> int:
    info = self._split_info(split)
    if info is not None:
      return int(info.num_examples)
    if split not in self._counts:  # only without metadata (mock data): count by reading.
      self._counts[split] = len(self._read_labels(split))
    return self._counts[split]

  @property
  def num_train(self) -> int:
    return self._num_examples(self.train_split)

  @property
  def num_eval(self) -> int:
    return self._num_examples(self.eval_split)

  def _shard_offsets(self, split: str):
    info = self._split_info(split)
    lengths = list(info.shard_lengths) if info is not None else []
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

  def _dense_index(self, tfds_id, offsets: np.ndarray):
    """'…-00007-of-01024__123' -> offsets[7] + 123 (int64)."""
    tf = tf_lazy.tf()
    shard = tf.strings.to_number(
      tf.strings.regex_replace(tfds_id, r"^.*-(\d+)-of-\d+__\d+$", r"\1"), tf.int64
    )
    within = tf.strings.to_number(
      tf.strings.regex_replace(tfds_id, r"^.*__(\d+)$", r"\1"), tf.int64
    )
    return tf.gather(tf.constant(offsets, tf.int64), shard) + within

  def _read_labels(self, split: str) -> np.ndarray:
    """Labels of a whole split in dense-index order; reads records, decodes no image.

    The image bytes are parsed but never decoded (`SkipDecoding`, as the training
    pipeline reads them, so mock data yields the same labels in both).
    """
    tfds, tf = tf_lazy.tfds(), tf_lazy.tf()
    ds = self.builder.as_dataset(
      split=split,
      shuffle_files=False,
      decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(add_tfds_id=True),
    )
    offsets = self._shard_offsets(split)
    ds = ds.map(
      lambda ex: (self._dense_index(ex["tfds_id"], offsets), ex["label"]),
      num_parallel_calls=tf.data.AUTOTUNE,
    ).batch(65_536)
    index_parts: list[np.ndarray] = []
    label_parts: list[np.ndarray] = []
    for i, y in ds.as_numpy_iterator():
      index_parts.append(i)
      label_parts.append(y)
    index, label = np.concatenate(index_parts), np.concatenate(label_parts)
    labels = np.full(len(index), -1, np.int32)
    labels[index] = label
    if (labels < 0).any():
      raise ValueError(f"tfds {self.name} split {split!r}: example ids are not dense 0..N-1.")
    return labels

  @property
  def train_labels(self) -> np.ndarray:
    """int32 [N]: label of training example i. One label-only pass, then cached."""
    if self._train_labels is None:
      self._train_labels = self._cached_train_labels()
    return self._train_labels

  def class_labels(self) -> np.ndarray:
    return self.train_labels

  def _cached_train_labels(self) -> np.ndarray:
    tf = tf_lazy.tf()
    path = self._label_cache
    if path is None:
      path = os.path.join(self.builder.data_dir, f"{self.train_split}_labels.npy")
    if path and tf.io.gfile.exists(path):
      with tf.io.gfile.GFile(path, "rb") as f:
        return np.load(f).astype(np.int32)
    labels = self._read_labels(self.train_split)
    if path:
      try:  # Best effort: a read-only data_dir just means the pass is repeated next time.
        tmp = f"{path}.tmp-{os.getpid()}"
        with tf.io.gfile.GFile(tmp, "wb") as f:
          np.save(f, labels)
        tf.io.gfile.rename(tmp, path, overwrite=True)
      except (OSError, tf.errors.OpError):
        pass
    return labels

  # -- pipelines
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
    """This process's share of every training batch of `epoch`, from `start_step` on."""
    self._check_order(samples_per_class)
    tfds, tf = tf_lazy.tfds(), tf_lazy.tf()
    p, count = pipeline.process(process_index, process_count)
    local = _local_batch(global_batch_size, count)
    steps = self.steps_per_epoch(global_batch_size) - start_step
    epoch_seed = _epoch_seed(seed, epoch)
    split = tfds.split_for_jax_process(self.train_split, process_index=p, process_count=count)
    ds = self.builder.as_dataset(
      split=split,
      shuffle_files=True,
      decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(add_tfds_id=True, shuffle_seed=epoch_seed),
    )
    offsets = self._shard_offsets(self.train_split)
    ds = ds.shuffle(self.shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    ds = ds.skip(start_step * local)
    ds = ds.map(lambda ex: (ex["image"], ex["label"], self._dense_index(ex["tfds_id"], offsets)))
    ds = ds.map(self._train_map(epoch_seed), num_parallel_calls=tf.data.AUTOTUNE)
    # Every process stops after the same number of batches, whatever its share's size.
    ds = ds.batch(local, drop_remainder=True).take(max(steps, 0))
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(tf)).as_numpy_iterator()

  def eval_batches(
    self,
    split: str,
    global_batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
  ) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of the eval split in batches padded (mask 0) to equal counts."""
    self._check_split(split)
    tfds, tf = tf_lazy.tfds(), tf_lazy.tf()
    p, count = pipeline.process(process_index, process_count)
    local = _local_batch(global_batch_size, count)
    tfds_split = self.train_split if split == protocol.TRAIN_SPLIT else self.eval_split
    # even_splits gives every process floor(N / P) or one more example.
    per_process = math.ceil(self._num_examples(tfds_split) / count)
    num_batches = math.ceil(per_process / local)
    process_split = tfds.split_for_jax_process(tfds_split, process_index=p, process_count=count)
    ds = self.builder.as_dataset(
      split=process_split,
      shuffle_files=False,
      decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(add_tfds_id=True),
    )
    offsets = self._shard_offsets(tfds_split)
    ds = ds.map(
      lambda ex: (ex["image"], ex["label"], self._dense_index(ex["tfds_id"], offsets), 1.0)
    )
    ds = ds.map(self._eval_map(), num_parallel_calls=tf.data.AUTOTUNE)
    dtype = tf.uint8 if self.output_dtype == "uint8" else tf.float32
    padding = tf.data.Dataset.from_tensors(
      {
        "image": tf.zeros(self.image_shape, dtype),
        "label": tf.constant(0, tf.int32),
        "index": tf.constant(0, tf.int32),
        "mask": tf.constant(0.0, tf.float32),
      }
    ).repeat()
    ds = ds.concatenate(padding).take(num_batches * local).batch(local)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(tf)).as_numpy_iterator()


def class_labels(source: Any) -> np.ndarray:
  """The label of every training example in dense-index order (the bank's class table)."""
  return np.asarray(source.train_labels, np.int32)
