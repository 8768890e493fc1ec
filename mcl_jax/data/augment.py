"""On-device augmentation in pure JAX (jit-able, per-example randomness).

The CIFAR recipe (docs/SPEC.md 4; official `main_cifar.py`): torchvision `RandomCrop(32, padding=4)`
(zero padding), `RandomHorizontalFlip()`, `ToTensor()` (uint8 -> [0, 1]), `Normalize(mean,
std)`. The order matters for the padding value: torchvision pads the raw image with 0
(black) before normalising, so the padded border becomes -mean/std after `normalize`.

Pixel scale convention: uint8 input is in [0, 255] and is divided by 255; floating input is
taken to be already in [0, 1]. So raw uint8 CIFAR and the [0, 1] float digits go through
the same functions, and `normalize` always sees [0, 1] pixels with mean/std in [0, 1] units.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

# docs/SPEC.md 4. The official code uses the CIFAR-100 statistics; the project uses them for
# CIFAR-10 too (the two differ by < 0.02).
CIFAR_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """Which training augmentation a dataset gets (hashable: safe to close over in jit).

  crop_padding: zero padding of the random crop (0: no crop); flip: random horizontal flip.
  """

  crop_padding: int = 4
  flip: bool = True


def to_float(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """Pixels in [0, 1]: uint8 is divided by 255, floating input is only cast."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(dtype) / jnp.asarray(255, dtype)
  return images.astype(dtype)


def random_crop_with_padding(
  rng: jax.Array, images: jax.Array, pad: int = 4, dtype: Any = jnp.float32
) -> jax.Array:
  """torchvision `RandomCrop(size=(H, W), padding=pad)` on a batch [B, H, W, C].

  Each image is zero-padded by `pad` on every side and an H x W window is cut at an offset
  drawn uniformly from {0..2 pad}^2, independently per example (jax.random.split). Returns
  `dtype` pixels in [0, 1] (see `to_float`).
  """
  images = to_float(images, dtype)
  if pad == 0:
    return images
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def crop_one(key, image):
    oy, ox = jax.random.randint(key, (2,), 0, 2 * pad + 1)
    return jax.lax.dynamic_slice(image, (oy, ox, 0), (h, w, c))

  return jax.vmap(crop_one)(jax.random.split(rng, b), padded)


def random_flip(rng: jax.Array, images: jax.Array) -> jax.Array:
  """Left-right flip of each image [B, H, W, C] with probability 1/2 (per example)."""
  images = jnp.asarray(images)
  flip = jax.vmap(lambda k: jax.random.bernoulli(k))(jax.random.split(rng, images.shape[0]))
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def normalize(
  images: jax.Array, mean: Sequence[float], std: Sequence[float], dtype: Any = jnp.float32
) -> jax.Array:
  """(pixels in [0, 1] - mean) / std per channel; uint8 input is scaled by 1/255 first."""
  images = to_float(images, jnp.float32)
  return ((images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)).astype(dtype)


def train_augment(
  rng: jax.Array,
  images: jax.Array,
  spec: AugmentSpec,
  *,
  mean: Sequence[float],
  std: Sequence[float],
  dtype: Any = jnp.float32,
) -> jax.Array:
  """Crop (zero padding) -> flip -> normalise, as the official CIFAR transform."""
  crop_rng, flip_rng = jax.random.split(rng)
  x = random_crop_with_padding(crop_rng, images, spec.crop_padding, jnp.float32)
  if spec.flip:
    x = random_flip(flip_rng, x)
  return normalize(x, mean, std, dtype)
