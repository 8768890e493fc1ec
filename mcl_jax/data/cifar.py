"""CIFAR-10 / CIFAR-100 from TensorFlow Datasets, loaded whole into numpy.

50,000 training and 10,000 test images of 32x32x3 uint8: 150 MB, small enough to live on
every device, so the trainer puts them there once and gathers each batch by index inside
the jitted step (no input pipeline at run time).

Data location: `data_dir` is a tfds data directory (default: tfds' own, ~/tensorflow_datasets).
With `download=True` a missing dataset is fetched and prepared there (needs network, a few
minutes); on a machine without network, prepare it elsewhere with
`tfds build cifar100 --data_dir=DIR` and copy DIR over.
"""

from __future__ import annotations

import numpy as np

from mcl_jax.data import tf_lazy
from mcl_jax.errors import DatasetNotFoundError

NAMES = ("cifar10", "cifar100")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


def load_cifar(
  name: str, data_dir: str | None = None, *, download: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train_images, train_labels, test_images, test_labels) of tfds `cifar10`/`cifar100`.

  Images: uint8 [N, 32, 32, 3]; labels: int32 [N] (CIFAR-100: the 100 fine labels). The
  order is tfds' stored order (fixed for a given dataset version), so example i is the
  same image on every host and every run.

  Raises DatasetNotFoundError (a FileNotFoundError) when the data is not under `data_dir`
  and cannot be downloaded.
  """
  if name not in NAMES:
    raise ValueError(f"load_cifar(name={name!r}): choose one of {', '.join(NAMES)}.")
  tfds = tf_lazy.tfds()
  builder = tfds.builder(name, data_dir=data_dir or None)
  where = data_dir or "tfds' default data_dir (~/tensorflow_datasets)"
  if download:
    try:
      builder.download_and_prepare()
    except Exception as e:  # network, missing package, disk: all end the same way for a user.
      raise DatasetNotFoundError(
        f"tfds dataset {name!r} is not in {where} and downloading it failed "
        f"({type(e).__name__}: {e}); prepare it on a machine with network "
        f"(`tfds build {name} --data_dir=DIR`) and pass config.input.data_dir=DIR."
      ) from e
  return (
    *_split_to_numpy(builder, "train", name, where),
    *_split_to_numpy(builder, "test", name, where),
  )


def _split_to_numpy(builder, split: str, name: str, where: str) -> tuple[np.ndarray, np.ndarray]:
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except AssertionError as e:  # tfds' "could not find data in ..." when nothing is prepared.
    raise DatasetNotFoundError(
      f"tfds dataset {name!r} was not found in {where} and download=False; prepare it with "
      f"`tfds build {name} --data_dir=DIR` and pass config.input.data_dir=DIR."
    ) from e
  ds = ds.map(lambda ex: (ex["image"], ex["label"])).batch(10_000)
  images, labels = [], []
  for x, y in ds.as_numpy_iterator():
    images.append(x)
    labels.append(y)
  # `batch_size=-1` would read it in one go, but breaks under tfds.testing.mock_data.
  return (
    np.concatenate(images).astype(np.uint8, copy=False),
    np.concatenate(labels).astype(np.int32),
  )
