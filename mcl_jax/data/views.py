"""MoCo's two augmented views of each image, on device (jit-able, per example, vmapped).

`ViewSpec` describes one view's recipe; `VIEW_SPECS` names the recipes a config can choose
with `ssl.views`: the official 'v1' (InstDisc's) and 'v2' (`--aug-plus`), and milder ones
for small images, 'digits' and 'fashion_mnist'. `two_views(key, images, images2, spec,
...)` makes the query and key views of a batch: in-memory sources pass only `images` and
both views are cropped here; streaming sources pass two host-made crops (`images2`) and
this adds colour, blur and flip (each source binds it to its kind: `Source.two_views`).
Every random choice of a view comes from one draw of
uniforms per example (`NUM_UNIFORMS`), which keeps the compiled program small.

The operations follow torchvision's: RandomResizedCrop (10 attempts, then the whole image
with its ratio clamped), ColorJitter (four factors in a random order), RandomGrayscale,
SimCLR's Gaussian blur, RandomHorizontalFlip.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp

from mcl_jax.data import augment as augment_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """One view's augmentation (hashable: closed over by jit). Defaults: MoCo v1.

  crop_scale/crop_ratio: RandomResizedCrop; jitter: ColorJitter (brightness, contrast,
  saturation, hue), applied with probability jitter_p, its four ops in a random order per
  example as torchvision; grayscale_p: RandomGrayscale; grayscale_first: the official v1
  order (grayscale, then jitter) instead of v2's (jitter, grayscale); blur_p/blur_sigma:
  Gaussian blur (SimCLR's, sigma uniform in blur_sigma pixels); flip: horizontal flip.
  """

  crop_scale: tuple[float, float] = (0.2, 1.0)
  crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.4)
  jitter_p: float = 1.0
  grayscale_p: float = 0.2
  grayscale_first: bool = True
  blur_p: float = 0.0
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  flip: bool = True


# Official main_moco_mcl.py. v1 (InstDisc's): RandomResizedCrop(scale=(0.2, 1)),
# RandomGrayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4), flip. v2 (--aug-plus):
# RandomResizedCrop(scale=(0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8,
# RandomGrayscale(0.2), GaussianBlur([0.1, 2]) with p=0.5, flip.
MOCO_V1 = ViewSpec()
MOCO_V2 = ViewSpec(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_first=False, blur_p=0.5)
# Fashion-MNIST's 28x28 (or 14x14) grey clothes: crops of at least 40% of the area (a
# smaller one is a patch of fabric), brightness/contrast jitter (saturation and hue do
# nothing to grey images), flips (clothes are left-right symmetric), no blur at this size.
FASHION_MNIST_VIEWS = dataclasses.replace(MOCO_V2, crop_scale=(0.4, 1.0), blur_p=0.0)
# scikit-learn's 8x8 digits (mcl_jax/configs/moco_digits.py): v2's colour jitter, but crops of at
# least 80% of the area, no blur and no flip: v2's scale-0.2 crops and 2-pixel blur leave
# a stroke fragment of an 8x8 digit, and a mirrored digit is not a digit of the same class
# (what the v2 recipe did to digits: docs/RESULTS.md, "Earlier: MoCo on digits").
DIGITS_VIEWS = dataclasses.replace(MOCO_V2, crop_scale=(0.8, 1.0), blur_p=0.0, flip=False)
# config.ssl.views -> the recipe.
VIEW_SPECS = {
  "v1": MOCO_V1,
  "v2": MOCO_V2,
  "digits": DIGITS_VIEWS,
  "fashion_mnist": FASHION_MNIST_VIEWS,
}


CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop


def crop_window(
  u: Array, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[Array, ...]:
  """torchvision RandomResizedCrop.get_params: (top, left, h, w) as float32 scalars.

  u: 2 CROP_ATTEMPTS + 2 uniforms in [0, 1). All proposals are drawn at once and the first
  that fits wins; if none does, torchvision's fallback (the whole image with its aspect
  ratio clamped into `ratio`, centred).
  """
  n = CROP_ATTEMPTS
  area = float(height * width)
  target = area * (scale[0] + (scale[1] - scale[0]) * u[:n])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[n : 2 * n])
  ws = jnp.round(jnp.sqrt(target * aspect))
  hs = jnp.round(jnp.sqrt(target / aspect))
  ok = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = jnp.argmax(ok)  # the first True (argmax returns the first maximum)
  found = ok.any()
  in_ratio = width / height  # fallback, static
  if in_ratio < ratio[0]:
    fb_w, fb_h = width, round(width / ratio[0])
  elif in_ratio > ratio[1]:
    fb_w, fb_h = round(height * ratio[1]), height
  else:
    fb_w, fb_h = width, height
  h = jnp.where(found, hs[first], fb_h)
  w = jnp.where(found, ws[first], fb_w)
  top = jnp.where(
    found, jnp.minimum(jnp.floor(u[2 * n] * (height - h + 1)), height - h), (height - fb_h) // 2
  )
  left = jnp.where(
    found, jnp.minimum(jnp.floor(u[2 * n + 1] * (width - w + 1)), width - w), (width - fb_w) // 2
  )
  return top, left, h, w


def resized_crop(image: Array, window: tuple[Array, ...], size: int) -> Array:
  """The window (top, left, h, w) of one image [H, W, C] in [0, 1], resized to [size, size, C].

  Bilinear with antialiasing (PIL's resize, which torchvision uses), via
  `jax.image.scale_and_translate`: the window [top, top + h) maps onto [0, size).
  """
  top, left, h, w = window
  scale_hw = jnp.stack([size / h, size / w])
  translation = -jnp.stack([top, left]) * scale_hw
  out = jax.image.scale_and_translate(
    image,
    (size, size, image.shape[-1]),
    (0, 1),
    scale_hw,
    translation,
    method="linear",
    antialias=True,
  )
  return jnp.clip(out, 0.0, 1.0)


def _gray(x: Array) -> Array:
  """[H, W, 1] luma (torchvision rgb_to_grayscale weights); a 1-channel image is itself."""
  if x.shape[-1] == 1:
    return x
  return 0.299 * x[..., 0:1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:3]


def _blend(a: Array, b: Array, ratio: Array) -> Array:
  return jnp.clip(ratio * a + (1.0 - ratio) * b, 0.0, 1.0)


def rgb_to_hsv(x: Array) -> Array:
  """[..., 3] RGB in [0, 1] -> HSV in [0, 1] (torchvision's tensor `_rgb2hsv`)."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc, minc = x.max(-1), x.min(-1)
  eqc = maxc == minc
  cr = maxc - minc
  s = cr / jnp.where(eqc, 1.0, maxc)
  cr_div = jnp.where(eqc, 1.0, cr)
  rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
  hr = jnp.where(maxc == r, bc - gc, 0.0)
  hg = jnp.where((maxc == g) & (maxc != r), 2.0 + rc - bc, 0.0)
  hb = jnp.where((maxc != g) & (maxc != r), 4.0 + gc - rc, 0.0)
  h = jnp.mod((hr + hg + hb) / 6.0 + 1.0, 1.0)
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(x: Array) -> Array:
  """[..., 3] HSV in [0, 1] -> RGB (torchvision's tensor `_hsv2rgb`)."""
  h, s, v = x[..., 0], x[..., 1], x[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = jnp.mod(i, 6.0)
  p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
  q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
  t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
  sector = i[..., None] == jnp.arange(6, dtype=i.dtype)  # [..., 6]
  table = (
    jnp.stack([v, q, p, p, t, v], -1),
    jnp.stack([t, v, v, q, p, p], -1),
    jnp.stack([p, p, t, v, v, q], -1),
  )
  return jnp.stack([jnp.sum(jnp.where(sector, c, 0.0), -1) for c in table], axis=-1)


def _shift_hue(x: Array, shift: Array) -> Array:
  hsv = rgb_to_hsv(x)
  return hsv_to_rgb(hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 1.0)))


def color_jitter(u: Array, x: Array, strength: tuple[float, float, float, float]) -> Array:
  """torchvision ColorJitter(brightness, contrast, saturation, hue) on one image [H, W, C].

  u: 8 uniforms in [0, 1): four factors, uniform in [max(0, 1 - s), 1 + s] (hue: [-h, h]),
  and the random order of the four ops (torchvision's randperm). On 1-channel images
  saturation and hue do nothing, as in torchvision.
  """
  b, c, s, h = strength

  def factor(ui, v):
    lo = max(0.0, 1.0 - v)
    return lo + (1.0 + v - lo) * ui

  fb, fc, fs = factor(u[0], b), factor(u[1], c), factor(u[2], s)
  fh = h * (2.0 * u[3] - 1.0)
  rgb = x.shape[-1] == 3
  ops = [
    (b > 0, lambda y: _blend(y, jnp.zeros_like(y), fb)),
    (c > 0, lambda y: _blend(y, jnp.mean(_gray(y)), fc)),
    (s > 0 and rgb, lambda y: _blend(y, _gray(y), fs)),
    (h > 0 and rgb, lambda y: _shift_hue(y, fh)),
  ]
  branches = [fn if on else (lambda y: y) for on, fn in ops]
  order = jnp.argsort(u[4:8])  # a uniformly random permutation of the four ops
  # A loop, not 4 unrolled switches: the branches are compiled once.
  return jax.lax.fori_loop(0, 4, lambda i, y: jax.lax.switch(order[i], branches, y), x)


def gaussian_blur(x: Array, sigma: Array, radius: int) -> Array:
  """Separable Gaussian blur of one image [H, W, C] (edge pixels extended), 2 radius + 1 taps."""
  t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  w = jnp.exp(-0.5 * (t / sigma) ** 2)
  w = w / w.sum()
  height, width = x.shape[:2]
  pad = jnp.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
  taps = range(2 * radius + 1)
  y = functools.reduce(operator.add, (w[i] * pad[i : i + height] for i in taps))
  return functools.reduce(operator.add, (w[i] * y[:, i : i + width] for i in taps))


# Uniforms one view consumes: crop window, jitter (4 factors + 4 for the order), and one
# each for grayscale, jitter on/off, blur on/off, blur sigma, flip.
_U_CROP = slice(0, 2 * CROP_ATTEMPTS + 2)
_U_JITTER = slice(_U_CROP.stop, _U_CROP.stop + 8)
_U_GRAY, _U_JITTER_P, _U_BLUR_P, _U_SIGMA, _U_FLIP = range(_U_JITTER.stop, _U_JITTER.stop + 5)
NUM_UNIFORMS = _U_FLIP + 1


def augment_view(u: Array, image: Array, spec: ViewSpec, *, size: int, crop: bool = True) -> Array:
  """One MoCo view of one image [H, W, C] (uint8 or [0, 1] float) -> [size, size, C] in [0, 1].

  u: NUM_UNIFORMS uniforms in [0, 1), all of this view's randomness (drawn for the whole
  batch in one call: one random-bits kernel instead of a dozen per example, which keeps
  compiles short). `crop=False` for images the host already cropped (streaming ImageNet).
  """
  x = augment_lib.to_float(image, jnp.float32)
  if crop:
    height, width = x.shape[:2]
    window = crop_window(u[_U_CROP], height, width, spec.crop_scale, spec.crop_ratio)
    x = resized_crop(x, window, size)

  def grayscale(y):
    if y.shape[-1] != 3 or spec.grayscale_p <= 0:
      return y
    return jnp.where(u[_U_GRAY] < spec.grayscale_p, jnp.broadcast_to(_gray(y), y.shape), y)

  def jitter(y):
    if not any(spec.jitter) or spec.jitter_p <= 0:
      return y
    return jnp.where(u[_U_JITTER_P] < spec.jitter_p, color_jitter(u[_U_JITTER], y, spec.jitter), y)

  x = jitter(grayscale(x)) if spec.grayscale_first else grayscale(jitter(x))
  if spec.blur_p > 0:
    lo, hi = spec.blur_sigma
    blurred = gaussian_blur(x, lo + (hi - lo) * u[_U_SIGMA], radius=int(math.ceil(3 * hi)))
    x = jnp.where(u[_U_BLUR_P] < spec.blur_p, blurred, x)
  if spec.flip:
    x = jnp.where(u[_U_FLIP] < 0.5, x[:, ::-1], x)
  return x


def two_views(
  key: Array,
  images: Array,
  images2: Array | None,
  spec: ViewSpec,
  *,
  mean: Any,
  std: Any,
  size: int,
  dtype: Any = jnp.float32,
) -> tuple[Array, Array]:
  """Query and key views [B, size, size, C], normalised, each with its own randomness.

  images2 None: both views from `images` (cropped here); else `images` and `images2` are
  two crops the host made of the same sources (streaming), coloured and flipped here.
  The 2B views go through one vmap (one copy of the augmentation to compile), laid out
  [B, 2] so that a batch-sharded input stays on its device.
  """
  crop = images2 is None
  batch = images.shape[0]
  sources = jnp.stack([images, images if images2 is None else images2], axis=1)  # [B, 2, H, W, C]
  sources = sources.reshape(batch * 2, *sources.shape[2:])
  u = jax.random.uniform(key, (batch * 2, NUM_UNIFORMS))
  x = jax.vmap(functools.partial(augment_view, spec=spec, size=size, crop=crop))(u, sources)
  x = augment_lib.normalize(x, mean, std, dtype).reshape(batch, 2, *x.shape[1:])
  return x[:, 0], x[:, 1]
