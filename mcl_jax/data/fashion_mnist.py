"""Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test images, 28x28 grey, 10 classes.

Harder than scikit-learn's digits and small enough for a 2-core CPU, so it is where this
project measures what MCL does on real data (docs/RESULTS.md). Two ways to get it:
- Debian/Ubuntu ship the four IDX files: `apt-get install dataset-fashion-mnist` puts
  `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz`
  and `t10k-labels-idx1-ubyte.gz` in `DEBIAN_DIR`. Any folder holding these four files
  (gzipped or not) works as `config.input.data_dir`.
- TensorFlow Datasets has it as `fashion_mnist` (downloaded into its data_dir where the
  machine has network, or prepared elsewhere with `tfds build fashion_mnist`).

Where it is looked for, in order (`load`):
1. `data_dir` holds the IDX files: read them (no TensorFlow needed).
2. `data_dir` is given but holds no IDX files: TFDS with that data_dir (download allowed).
3. no `data_dir`: the Debian folder when it exists, else TFDS' default data_dir (download
   allowed).
When none works, DatasetNotFoundError says both ways to get the data in one sentence.

Both give the same arrays: uint8 [N, 28, 28, 1] and int32 labels in the files' order (TFDS
prepares `fashion_mnist` from the same IDX files, in order).
"""

from __future__ import annotations

import gzip
import os
import struct
from typing import TypeGuard
import zlib

from absl import logging
import numpy as np

from mcl_jax.errors import ConfigError
from mcl_jax.errors import DatasetNotFoundError

NUM_CLASSES = 10
NUM_TRAIN, NUM_TEST = 60_000, 10_000
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
  "train_images": "train-images-idx3-ubyte",
  "train_labels": "train-labels-idx1-ubyte",
  "test_images": "t10k-images-idx3-ubyte",
  "test_labels": "t10k-labels-idx1-ubyte",
}
CLASS_NAMES = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)
HOW_TO_GET_IT = (
  "install the IDX files with `apt-get install dataset-fashion-mnist` (they go "
  f"to {DEBIAN_DIR}) or point config.input.data_dir at a folder holding them, "
  "or prepare the TFDS dataset with `tfds build fashion_mnist --data_dir=DIR` "
  "on a machine with network and pass config.input.data_dir=DIR"
)
HOW_TO_REPLACE = (
  "replace the four IDX files (`apt-get install --reinstall "
  "dataset-fashion-mnist` restores the Debian copy) or point "
  "config.input.data_dir at a good copy"
)

# IDX element type codes (http://yann.lecun.com/exdb/mnist/): only unsigned bytes occur here.
_IDX_UBYTE = 0x08


def _find(data_dir: str, stem: str) -> str | None:
  for name in (stem + ".gz", stem):
    path = os.path.join(data_dir, name)
    if os.path.isfile(path):
      return path
  return None


def has_idx_files(data_dir: str | None) -> TypeGuard[str]:
  """Whether `data_dir` holds the four IDX files (gzipped or not)."""
  if not data_dir:
    return False
  return all(_find(data_dir, stem) for stem in FILES.values())


def read_idx(path: str) -> np.ndarray:
  """An IDX file (optionally gzipped) as a numpy array of its declared shape.

  A damaged file means the whole dataset is wrong, so it stops the run at start-up:
  ConfigError (one sentence naming the file) when the gzip stream is cut or corrupt, the
  header is not an unsigned-byte IDX header, or the data size does not match the header
  (e.g. a copy cut mid-image: the sentence says how many whole items it holds of how
  many declared).
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (EOFError, OSError, zlib.error) as e:  # gzip: a cut or corrupt compressed stream
    raise ConfigError(
      f"{path} cannot be read ({type(e).__name__}: {e}); the file is "
      f"truncated or corrupt: {HOW_TO_REPLACE}."
    ) from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ConfigError(
      f"{path} is not an IDX file (its first two bytes must be zero): {HOW_TO_REPLACE}."
    )
  dtype_code, ndim = data[2], data[3]
  if dtype_code != _IDX_UBYTE:
    raise ConfigError(
      f"{path} holds IDX type 0x{dtype_code:02x}; only unsigned bytes (0x08) "
      "are expected for Fashion-MNIST."
    )
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ConfigError(
      f"{path} ends inside its IDX header ({len(data)} of {header} bytes); "
      f"the file is truncated: {HOW_TO_REPLACE}."
    )
  shape = struct.unpack(f">{ndim}I", data[4:header])
  expected = int(np.prod(shape, dtype=np.int64))
  found = len(data) - header
  if found != expected:
    item = int(np.prod(shape[1:], dtype=np.int64))  # bytes of one image (28 x 28) or label
    whole, extra = divmod(found, item) if item else (0, found)
    noun = {1: "labels", 3: "images"}.get(ndim, "items")
    raise ConfigError(
      f"{path} has {found} data bytes but its header declares shape {shape} "
      f"({expected} bytes): {whole} whole {noun} of {shape[0] if shape else 0}"
      f"{f' and {extra} bytes of the next' if extra else ''}, so the file is "
      f"{'truncated' if found < expected else 'longer than declared'} or corrupt: "
      f"{HOW_TO_REPLACE}."
    )
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _check(images: np.ndarray, labels: np.ndarray, split: str, where: str) -> None:
  if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
    raise ConfigError(
      f"Fashion-MNIST {split} split in {where}: images {images.shape} and "
      f"labels {labels.shape} are not [N, 28, 28] and [N]: {HOW_TO_REPLACE}."
    )
  if labels.size and int(labels.max()) >= NUM_CLASSES:
    raise ConfigError(
      f"Fashion-MNIST {split} split in {where} has label "
      f"{int(labels.max())}; labels must be in 0..{NUM_CLASSES - 1}: "
      f"{HOW_TO_REPLACE}."
    )


def load_idx(data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train_images, train_labels, test_images, test_labels) from the four IDX files."""
  arrays = {
    key: read_idx(_find(data_dir, stem) or os.path.join(data_dir, stem))
    for key, stem in FILES.items()
  }
  for split in ("train", "test"):
    _check(arrays[f"{split}_images"], arrays[f"{split}_labels"], split, data_dir)
  return (
    arrays["train_images"][..., None],
    arrays["train_labels"].astype(np.int32),
    arrays["test_images"][..., None],
    arrays["test_labels"].astype(np.int32),
  )


def load_tfds(
  data_dir: str | None, *, download: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The same arrays from TFDS `fashion_mnist` (TensorFlow imported here)."""
  from mcl_jax.data import tf_lazy

  tfds = tf_lazy.tfds()
  builder = tfds.builder("fashion_mnist", data_dir=data_dir or None)
  if download:
    if not builder.is_prepared():
      # Said first: without network TFDS retries for minutes before it gives up.
      logging.warning(
        "Fashion-MNIST: no IDX files%s; downloading it with TFDS into %s "
        "(without network this fails after TFDS' retries, minutes).",
        f" in {data_dir}" if data_dir else "",
        builder.data_dir,
      )
    builder.download_and_prepare()
  splits = {}
  for split in ("train", "test"):
    ds = builder.as_dataset(split=split, shuffle_files=False).batch(10_000)
    images, labels = [], []
    for ex in ds.as_numpy_iterator():
      images.append(ex["image"])
      labels.append(ex["label"])
    splits[split] = (
      np.concatenate(images).astype(np.uint8),
      np.concatenate(labels).astype(np.int32),
    )
  return (*splits["train"], *splits["test"])


def load(
  data_dir: str | None = None, *, download: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train_images uint8 [60000, 28, 28, 1], train_labels, test_images, test_labels).

  Looks for the data as the module docstring says; raises DatasetNotFoundError (a
  FileNotFoundError, one sentence) when it is nowhere.
  """
  if data_dir and not os.path.isdir(data_dir) and "://" not in data_dir:
    raise DatasetNotFoundError(
      f"config.input.data_dir={data_dir} does not exist; to get Fashion-MNIST, {HOW_TO_GET_IT}."
    )
  if has_idx_files(data_dir):
    return load_idx(data_dir)
  if not data_dir and has_idx_files(DEBIAN_DIR):
    return load_idx(DEBIAN_DIR)
  try:
    return load_tfds(data_dir, download=download)
  except Exception as e:  # no network, no tfds copy, no TensorFlow: one answer for a person
    where = data_dir or f"{DEBIAN_DIR} or TFDS' default data_dir"
    raise DatasetNotFoundError(
      f"Fashion-MNIST was found neither as IDX files nor as a TFDS dataset in {where} "
      f"({type(e).__name__}); {HOW_TO_GET_IT}."
    ) from None
