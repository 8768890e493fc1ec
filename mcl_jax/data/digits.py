"""scikit-learn's handwritten digits (ships inside sklearn): a dataset for CPU demos.

1797 grayscale 8x8 images of the digits 0-9 (values 0..16). The split is a fixed,
stratified 1437 / 360 train / test split, identical on every machine (no download, no
randomness beyond the fixed seed), so a demo's accuracy is reproducible.
"""

from __future__ import annotations

import numpy as np

from mcl_jax.errors import ConfigError

NUM_CLASSES = 10
NUM_TEST = 360
SPLIT_SEED = 0


def load_digits(image_size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train_images, train_labels, test_images, test_labels) as numpy arrays.

  Images are float32 in [0, 1], shape [N, image_size, image_size, 1]; 8x8 pixels are
  upsampled by pixel repetition (nearest neighbour), so `image_size` must be a multiple
  of 8. Labels are int32. Train: 1437 examples, test: 360, every class in both sets in
  proportion to its frequency (stratified, fixed seed).
  """
  if image_size < 8 or image_size % 8:
    raise ConfigError(
      f"config.input.image_size={image_size} must be a positive multiple "
      "of 8 for digits (the 8x8 digits are upsampled by repeating pixels)."
    )
  from sklearn import datasets  # sklearn is slow to import; only here.
  from sklearn import model_selection  # sklearn is slow to import; only here.

  raw = datasets.load_digits()
  images = (raw.images.astype(np.float32) / 16.0)[..., None]  # [1797, 8, 8, 1] in [0, 1]
  labels = raw.target.astype(np.int32)
  factor = image_size // 8
  if factor > 1:
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
    images, labels, test_size=NUM_TEST, stratify=labels, random_state=SPLIT_SEED
  )
  return (
    np.ascontiguousarray(x_train),
    y_train.astype(np.int32),
    np.ascontiguousarray(x_test),
    y_test.astype(np.int32),
  )


def mean_std(train_images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of the training images (in [0, 1] units)."""
  axes = tuple(range(train_images.ndim - 1))
  mean = train_images.mean(axis=axes, dtype=np.float64)
  std = train_images.std(axis=axes, dtype=np.float64)
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)
