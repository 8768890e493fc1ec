"""Self-supervised MCL on MoCo (SPEC 2.3): the trainer, its state, the step, two-view augmentation.

Library, not script: `main.py` calls `train_and_evaluate(config, workdir)` for
`config.trainer == 'moco'`; tests call the pieces.

Encoders. Each of the M members has a query encoder (trained) and a key encoder (an EMA of
the query encoder, momentum `moco.key_momentum` = 0.999, never differentiated). The M query
encoders are one `models.Cohort` over stacked variables, and so are the M key encoders
(same structure, their own variables in the state). MoCo's projection (`moco.mlp`):
- False (MoCo v1, and what the official v2 runs really trained): the backbone's classifier
  IS the 128-d output, as the official `base_encoder(num_classes=dim)`: a Cohort with
  num_classes = dim (`model.embed_dim`).
- True (MoCo v2 as published by its authors): an MLP Dense(F, F) - ReLU - Dense(F, dim):
  the backbone's classifier is the first layer (a Cohort with num_classes = F), the second
  is stored per member under `params['members']['mlp']`. The official `--mlp` switch is a
  silent no-op (it sets an attribute named 'encoder_q_0.fc' instead of replacing `fc`, so
  the official v2 runs had the linear head); here the switch is real and independent of
  the augmentation (`moco.views`) and of the LR schedule (`schedule.kind`), the three
  flags `--mlp`, `--aug-plus` and `--cos` of the official script.
The Cohort's SPEC-1 projection head (Dense(F,d)-ReLU-Dense(d,d), for the supervised
regimes) is not part of MoCo: it is kept out of the state, fed as zeros at apply time and
removed by XLA as dead code (`MocoEncoders.apply`). Export (`mcl_jax.export`) takes member
m's query backbone (trunk + branch + classifier), without the MLP layer, key encoder or queue.

Queues. One FIFO queue of keys per member, `queues` [M, K, d] (K = 65536, d = 128),
L2-normalised random init as the official `randn` + normalize. After each step every
member enqueues the keys of the whole GLOBAL batch at `queue_ptr` (one pointer: all
members advance together), then the pointer moves by the global batch modulo K
(config_lib.validate checks K % global_batch == 0, so a batch never wraps). The queue is
REPLICATED on every device: with the batch split over devices, each device computes
q_a . Q_b^T for its share of the queries against all K keys of every queue, so it needs
every queue whole anyway; a queue is only K d 4 bytes = 32 MB per member, and the
enqueue's all-gather of the batch's keys is M B d floats per step.

BatchNorm instead of shuffle-BN. The official code shuffles the key batch across GPUs
before the key encoder (and unshuffles after) so that a query and its positive key are
never normalised with the same sub-batch statistics: per-GPU BN lets the network find the
positive among the queue's negatives through the statistics it shares with the current
batch (a "signature" of the batch) instead of through the image content. Here BN runs
over the GLOBAL batch, which is what a jitted step computes for a batch-sharded input
(the per-channel sums are all-reduced), in the query and in the key encoder: SimCLR's
"global BN" remedy for the same leak (Chen et al. 2020, section 2.2). Queries and keys
are still normalised separately (two passes, two encoders), the statistics of a batch of
256 carry little batch-specific signal, and the result does not depend on how many
devices split the batch (sharded == unsharded). Shuffle-BN would need an all-to-all of
the key images every step and gives device-count-dependent statistics. Its residual
difference from the official recipe: with global BN the query batch and the key batch
hold the same images (two views), with shuffle-BN each per-GPU group of keys holds a
random other subset; with small global batches this can make the pretext task easier.

Augmentation, on device, per example (jit-able, vmapped; `ViewSpec`): two views of the
same source image, each from its own RNG. In-memory datasets (digits, CIFAR, synthetic)
keep the training set on every device as the supervised trainer does and gather the batch
by index inside the step; both views are then cropped and coloured on device. Streaming
ImageNet sources decode two random-resized crops per image on the host (scale (0.2, 1),
their `use_two_views`) and the device does the colour, blur and flip. The recipe is
named by `moco.views` (`VIEW_SPECS`: the official 'v1' and 'v2', and milder ones for small
images, 'digits' and 'fashion_mnist'); `train_and_evaluate(..., views=...)` replaces it,
and the checkpoint meta records it.

Optimisation (SPEC 4): SGD 0.9, wd 1e-4 on every parameter (as torch SGD over
model.parameters()), lr 0.03 x0.1 at epochs 120, 160 (v1) or cosine (v2), 200 epochs,
set once per epoch as the official `adjust_learning_rate`. Loss: VCL + ICL + SoftVCL +
SoftICL with the weights of `config.loss` (all 1 in the MCL configs; the single-network
baselines keep only VCL, which for M = 1 is plain MoCo's InfoNCE).

Order within a step (official `MoCo.forward`): momentum update of the key encoders from
the current (pre-step) query encoders, keys from the updated key encoders, the loss, the
SGD step of the query encoders, then the enqueue.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mcl_jax import config_lib
from mcl_jax import knn
from mcl_jax import losses
from mcl_jax import models
from mcl_jax import sharding as sharding_lib
from mcl_jax import train
from mcl_jax.data import augment as augment_lib
from mcl_jax.models import layers

Array = jax.Array

KNN_KS = (20, knn.DEFAULT_K)  # the kNN monitor's neighbour counts (InstDisc reports 200)


class MocoState(flax.struct.PyTreeNode):
  """Everything a MoCo-MCL run resumes from (all replicated)."""
  step: jax.Array
  params: Any  # query encoders: {'trunk'?, 'members': {'backbone', 'mlp'?}}
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key: checkpoints as a plain array.
  key_params: Any  # key encoders: same structure as params, EMA of them.
  key_batch_stats: Any
  queues: jax.Array  # [M, K, d] float32, L2-normalised rows.
  queue_ptr: jax.Array  # int32 scalar: where the next global batch of keys goes.


# ----------------------------------------------------------------------------- augmentation


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
MOCO_V2 = ViewSpec(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_first=False,
                   blur_p=0.5)
# Fashion-MNIST's 28x28 (or 14x14) grey clothes: crops of at least 40% of the area (a
# smaller one is a patch of fabric), brightness/contrast jitter (saturation and hue do
# nothing to grey images), flips (clothes are left-right symmetric), no blur at this size.
FASHION_MNIST_VIEWS = dataclasses.replace(MOCO_V2, crop_scale=(0.4, 1.0), blur_p=0.0)
# scikit-learn's 8x8 digits (configs/moco_digits.py): v2's colour jitter, but crops of at
# least 80% of the area, no blur and no flip. Measured there (resnet32 MCL x2, 20 epochs):
# with the v2 recipe's scale-0.2 crops and 2-pixel blur, which leave a stroke fragment of
# an 8x8 digit, the InfoNCE loss stays at chance (log(K + 1)) and the members' kNN below
# that of the untrained networks; a mirrored digit is not a digit of the same class.
DIGITS_VIEWS = dataclasses.replace(MOCO_V2, crop_scale=(0.8, 1.0), blur_p=0.0, flip=False)
# config.moco.views -> the recipe.
VIEW_SPECS = {"v1": MOCO_V1, "v2": MOCO_V2, "digits": DIGITS_VIEWS,
              "fashion_mnist": FASHION_MNIST_VIEWS}


CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop


def crop_window(u: Array, height: int, width: int, scale: tuple[float, float],
                ratio: tuple[float, float]) -> tuple[Array, ...]:
  """torchvision RandomResizedCrop.get_params: (top, left, h, w) as float32 scalars.

  u: 2 CROP_ATTEMPTS + 2 uniforms in [0, 1). All proposals are drawn at once and the first
  that fits wins; if none does, torchvision's fallback (the whole image with its aspect
  ratio clamped into `ratio`, centred).
  """
  n = CROP_ATTEMPTS
  area = float(height * width)
  target = area * (scale[0] + (scale[1] - scale[0]) * u[:n])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[n:2 * n])
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
  top = jnp.where(found, jnp.minimum(jnp.floor(u[2 * n] * (height - h + 1)), height - h),
                  (height - fb_h) // 2)
  left = jnp.where(found, jnp.minimum(jnp.floor(u[2 * n + 1] * (width - w + 1)), width - w),
                   (width - fb_w) // 2)
  return top, left, h, w


def resized_crop(image: Array, window: tuple[Array, ...], size: int) -> Array:
  """The window (top, left, h, w) of one image [H, W, C] in [0, 1], resized to [size, size, C].

  Bilinear with antialiasing (PIL's resize, which torchvision uses), via
  `jax.image.scale_and_translate`: the window [top, top + h) maps onto [0, size).
  """
  top, left, h, w = window
  scale_hw = jnp.stack([size / h, size / w])
  translation = -jnp.stack([top, left]) * scale_hw
  out = jax.image.scale_and_translate(image, (size, size, image.shape[-1]), (0, 1), scale_hw,
                                      translation, method="linear", antialias=True)
  return jnp.clip(out, 0.0, 1.0)


def _gray(x: Array) -> Array:
  """[H, W, 1] luma (torchvision rgb_to_grayscale weights); a 1-channel image is itself."""
  if x.shape[-1] == 1:
    return x
  return (0.299 * x[..., 0:1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:3])


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
  table = (jnp.stack([v, q, p, p, t, v], -1), jnp.stack([t, v, v, q, p, p], -1),
           jnp.stack([p, p, t, v, v, q], -1))
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
  y = sum(w[i] * pad[i:i + height] for i in range(2 * radius + 1))
  return sum(w[i] * y[:, i:i + width] for i in range(2 * radius + 1))


# Uniforms one view consumes: crop window, jitter (4 factors + 4 for the order), and one
# each for grayscale, jitter on/off, blur on/off, blur sigma, flip.
_U_CROP = slice(0, 2 * CROP_ATTEMPTS + 2)
_U_JITTER = slice(_U_CROP.stop, _U_CROP.stop + 8)
_U_GRAY, _U_JITTER_P, _U_BLUR_P, _U_SIGMA, _U_FLIP = range(_U_JITTER.stop, _U_JITTER.stop + 5)
NUM_UNIFORMS = _U_FLIP + 1


def augment_view(u: Array, image: Array, spec: ViewSpec, *, size: int,
                 crop: bool = True) -> Array:
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


def two_views(key: Array, images: Array, images2: Array | None, spec: ViewSpec, *,
              mean: Any, std: Any, size: int, dtype: Any = jnp.float32
              ) -> tuple[Array, Array]:
  """Query and key views [B, size, size, C], normalised, each with its own randomness.

  images2 None: both views from `images` (cropped here); else `images` and `images2` are
  two crops the host made of the same sources (streaming), coloured and flipped here.
  The 2B views go through one vmap (one copy of the augmentation to compile), laid out
  [B, 2] so that a batch-sharded input stays on its device.
  """
  crop = images2 is None
  batch = images.shape[0]
  sources = jnp.stack([images, images if crop else images2], axis=1)  # [B, 2, H, W, C]
  sources = sources.reshape(batch * 2, *sources.shape[2:])
  u = jax.random.uniform(key, (batch * 2, NUM_UNIFORMS))
  x = jax.vmap(functools.partial(augment_view, spec=spec, size=size, crop=crop))(u, sources)
  x = augment_lib.normalize(x, mean, std, dtype).reshape(batch, 2, *x.shape[1:])
  return x[:, 0], x[:, 1]


# ----------------------------------------------------------------------------- encoders


def feature_width(arch: str, image_shape: tuple[int, ...]) -> int:
  """F, the pooled feature width of `arch` (no real init)."""
  net = models.create(arch, 1)
  (_, features), _ = jax.eval_shape(lambda: net.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), False))
  return int(features.shape[-1])


def _l2_normalize(x: Array) -> Array:
  x = x.astype(jnp.float32)  # F.normalize(x, dim=1)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class MocoEncoders:
  """M MoCo encoders (query or key: same functions, other variables) on one Cohort.

  Variables: {'params': {'trunk'?, 'members': {'backbone', 'mlp'? (v2: kernel [M, F, d],
  bias [M, d])}}, 'batch_stats': {...}}. `apply` returns the L2-normalised embeddings
  [M, B, d], the pooled backbone features [M, B, F] (what a linear probe and the kNN
  monitor see) and, when training, the new batch statistics.
  """

  def __init__(self, cohort: models.Cohort, image_shape: tuple[int, ...], *, dim: int,
               mlp: bool):
    self.cohort, self.dim, self.mlp = cohort, dim, mlp
    self.image_shape = tuple(image_shape)
    shapes = jax.eval_shape(self._init_cohort, jax.random.PRNGKey(0))
    # The Cohort's SPEC-1 projection head: not part of MoCo (module docstring).
    self._unused_head = shapes["params"]["members"]["head"]

  @property
  def num_members(self) -> int:
    return self.cohort.num_members

  def _init_cohort(self, rng: Array) -> dict[str, Any]:
    x = jnp.zeros((1, *self.image_shape), jnp.float32)
    return self.cohort.init(rng, x, train=False)

  def init(self, rng: Array) -> dict[str, Any]:
    cohort_rng, mlp_rng = jax.random.split(rng)
    variables = self._init_cohort(cohort_rng)
    params = dict(variables["params"])
    members = {k: v for k, v in params["members"].items() if k != "head"}
    if self.mlp:
      width = self.cohort.num_classes  # v2: the classifier is the MLP's Dense(F, F)
      dense = layers.linear(self.dim, width, dtype=jnp.float32, name="mlp")
      keys = jax.random.split(mlp_rng, self.num_members)
      members["mlp"] = jax.vmap(
          lambda k: dense.init(k, jnp.zeros((1, width)))["params"])(keys)
    params["members"] = members
    return {"params": params, "batch_stats": variables.get("batch_stats", {})}

  def cohort_apply(self, variables: dict[str, Any], images: Array, train: bool
                   ) -> tuple[dict[str, Array], Any]:
    """The Cohort's raw outputs ('logits' [M, B, num_classes], 'features' [M, B, F]) and, when
    training, the new batch statistics. 'embeddings' (the unused SPEC-1 head) are zeros."""
    params = dict(variables["params"])
    members = {k: v for k, v in params["members"].items() if k != "mlp"}
    members["head"] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._unused_head)
    params["members"] = members
    full = {"params": params, "batch_stats": variables["batch_stats"]}
    if train:
      out, mutated = self.cohort.apply(full, images, train=True, mutable=["batch_stats"])
      return out, mutated["batch_stats"]
    return self.cohort.apply(full, images, train=False), None

  def apply(self, variables: dict[str, Any], images: Array, train: bool
            ) -> tuple[Array, Array, Any]:
    """(embeddings [M, B, d] L2-normalised, features [M, B, F], new batch_stats or None)."""
    out, new_stats = self.cohort_apply(variables, images, train)
    z = out["logits"]  # [M, B, num_classes]: d (v1) or F (v2, the MLP's hidden layer)
    mlp = variables["params"]["members"].get("mlp")
    if mlp is not None:
      z = jnp.einsum("mbf,mfd->mbd", jax.nn.relu(z), mlp["kernel"]) + mlp["bias"][:, None]
    return _l2_normalize(z), out["features"], new_stats


def build_encoders(config: ml_collections.ConfigDict,
                   image_shape: tuple[int, ...]) -> MocoEncoders:
  """The query/key encoders of `config` (moco.mlp False: linear head, True: MLP head)."""
  dim, mlp = config.model.embed_dim, bool(config.moco.mlp)
  num_classes = feature_width(config.model.arch, image_shape) if mlp else dim
  cohort = models.Cohort(
      arch=config.model.arch, num_classes=num_classes,
      num_members=config.cohort.num_members, shared_stages=config.model.shared_stages,
      embed_dim=dim, strategy=config.model.strategy,
      dtype=jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32)
  return MocoEncoders(cohort, image_shape, dim=dim, mlp=mlp)


def init_queues(rng: Array, num_members: int, size: int, dim: int) -> Array:
  """[M, K, d] L2-normalised Gaussian rows (official `randn(M, dim, K)` normalised over dim)."""
  return _l2_normalize(jax.random.normal(rng, (num_members, size, dim), jnp.float32))


def create_state(encoders: MocoEncoders, tx: optax.GradientTransformation, rng: Array,
                 mesh: jax.sharding.Mesh, *, queue_size: int) -> MocoState:
  """The state, created already replicated; key encoders start as copies of the queries."""

  def init(rng):
    enc_rng, queue_rng, state_rng = jax.random.split(rng, 3)
    variables = encoders.init(enc_rng)
    params, stats = variables["params"], variables["batch_stats"]
    return MocoState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
        opt_state=tx.init(params), rng=state_rng,
        key_params=jax.tree.map(jnp.copy, params), key_batch_stats=jax.tree.map(jnp.copy, stats),
        queues=init_queues(queue_rng, encoders.num_members, queue_size, encoders.dim),
        queue_ptr=jnp.zeros((), jnp.int32))

  abstract = jax.eval_shape(init, rng)
  shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), abstract)
  return jax.jit(init, out_shardings=shardings)(rng)


# ----------------------------------------------------------------------------- the step


def momentum_update(key_params: Any, params: Any, momentum: float) -> Any:
  """k <- m k + (1 - m) q for every parameter (official `_momentum_update_key_encoder`)."""
  return jax.tree.map(lambda k, q: momentum * k + (1.0 - momentum) * q, key_params, params)


def compute_keys(encoders: MocoEncoders, key_variables: dict[str, Any], images: Array
                 ) -> tuple[Array, Any]:
  """Keys [M, B, d] of the key encoders (train-mode BN, as the official), no gradient."""
  k, _, stats = encoders.apply(key_variables, images, train=True)
  return jax.lax.stop_gradient(k), stats


def enqueue(queues: Array, ptr: Array, keys: Array) -> tuple[Array, Array]:
  """Writes keys [M, B, d] at rows [ptr, ptr + B) of every queue; returns (queues, new ptr)."""
  queues = jax.lax.dynamic_update_slice(queues, keys.astype(queues.dtype),
                                        (jnp.zeros((), ptr.dtype), ptr, jnp.zeros((), ptr.dtype)))
  return queues, (ptr + keys.shape[1]) % queues.shape[1]


def moco_loss(params: Any, batch_stats: Any, images: Array, keys: Array, queues: Array, *,
              encoders: MocoEncoders, loss_cfg: ml_collections.ConfigDict,
              soft_scale: Array | float = 1.0
              ) -> tuple[Array, tuple[dict[str, Array], Any, Array]]:
  """SPEC 2.3 total: weighted VCL + ICL + SoftVCL + SoftICL of the queries of `images`.

  `soft_scale` multiplies the soft terms' weights (`losses.soft_term_ramp`).

  Returns (loss, (metrics, new query batch_stats, queries)). Per-member metrics: `ce`
  (the member's own InfoNCE, CE(logits_aa, 0)) and `instance_accuracy` (how often the
  positive key outscores all K queue keys).
  """
  q, _, new_stats = encoders.apply({"params": params, "batch_stats": batch_stats}, images,
                                   train=True)
  terms = losses.moco_mcl(q, keys, queues, tau=loss_cfg.tau,
                          kd_temperature=loss_cfg.kd_temperature)
  weights = losses.mcl_weights(loss_cfg)
  total = sum(weights[name] * (soft_scale if name in losses.SOFT_TERMS else 1.0) * terms[name]
              for name in losses.MCL_TERMS)
  metrics = dict(terms)
  metrics["loss"] = total
  # Per member, from the detached queries: logits_aa = [q_a . k_a, q_a Q_a^T] / tau.
  qs = jax.lax.stop_gradient(q)
  l_pos = jnp.einsum("mbd,mbd->mb", qs, keys)
  l_neg = jnp.einsum("mbd,mkd->mbk", qs, jax.lax.stop_gradient(queues),
                     precision=jax.lax.Precision.HIGHEST)
  logits = jnp.concatenate([l_pos[..., None], l_neg], axis=-1) / loss_cfg.tau
  metrics["ce"] = jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0], axis=-1)
  metrics["instance_accuracy"] = jnp.mean(l_pos > l_neg.max(-1), axis=-1)
  return total, (metrics, new_stats, qs)


def train_step(state: MocoState, batch: dict[str, Array], consts: dict[str, Array], *,
               encoders: MocoEncoders, tx: optax.GradientTransformation,
               loss_cfg: ml_collections.ConfigDict, key_momentum: float,
               views: Callable[[Array, Array, Array | None], tuple[Array, Array]],
               soft_ramp_steps: float = 0.0) -> tuple[MocoState, dict[str, Array]]:
  """One MoCo-MCL step of the whole cohort (order: module docstring).

  batch: either `index` [B] of the training set held on device (consts['train_image']),
  or host-made crops `image`, `image2` [B, S, S, C] (streaming sources).
  """
  if "image" in batch:
    images, images2 = batch["image"], batch.get("image2")
  else:
    images, images2 = consts["train_image"][batch["index"]], None
  rng, view_rng = jax.random.split(state.rng)
  x_q, x_k = views(view_rng, images, images2)
  key_params = momentum_update(state.key_params, state.params, key_momentum)
  keys, key_stats = compute_keys(
      encoders, {"params": key_params, "batch_stats": state.key_batch_stats}, x_k)
  grad_fn = jax.grad(functools.partial(
      moco_loss, encoders=encoders, loss_cfg=loss_cfg,
      soft_scale=losses.soft_term_ramp(state.step, soft_ramp_steps)), has_aux=True)
  grads, (metrics, batch_stats, _) = grad_fn(state.params, state.batch_stats, x_q, keys,
                                             state.queues)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  queues, queue_ptr = enqueue(state.queues, state.queue_ptr, keys)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, rng=rng, key_params=key_params,
                            key_batch_stats=key_stats, queues=queues, queue_ptr=queue_ptr)
  return new_state, metrics


def embed_step(params: Any, batch_stats: Any, images: Array, *, encoders: MocoEncoders,
               preprocess: Callable[[Array], Array]) -> Array:
  """Pooled backbone features [M, B, F] of the query encoders, BN in eval mode."""
  _, features, _ = encoders.apply({"params": params, "batch_stats": batch_stats},
                                  preprocess(images), train=False)
  return features.astype(jnp.float32)


# ----------------------------------------------------------------------------- streaming


# ----------------------------------------------------------------------------- the trainer


def _validate_moco(config: ml_collections.ConfigDict, streaming: bool) -> None:
  moco = config.moco
  if moco.queue_size < 1:
    raise config_lib.ConfigError(f"config.moco.queue_size={moco.queue_size} must be positive.")
  if not 0.0 <= moco.key_momentum <= 1.0:
    raise config_lib.ConfigError(
        f"config.moco.key_momentum={moco.key_momentum} must be in [0, 1].")
  if moco.knn_every_epochs < 0:
    raise config_lib.ConfigError(
        f"config.moco.knn_every_epochs={moco.knn_every_epochs} must be >= 0 (0: off).")
  if streaming and moco.knn_every_epochs:
    raise config_lib.ConfigError(
        f"config.moco.knn_every_epochs={moco.knn_every_epochs} needs an in-memory dataset "
        f"(the kNN monitor embeds the whole un-augmented training split); set it to 0 for "
        f"{config.input.dataset} and judge the run with the linear probe.")
  if config.input.samples_per_class:
    raise config_lib.ConfigError(
        f"config.input.samples_per_class={config.input.samples_per_class}: MoCo uses plain "
        "shuffled batches; set it to 0.")


class MocoTrainer(train.Trainer):
  """Wires a config to data, the MoCo state, the compiled step, the kNN monitor, checkpoints.

  Shares the supervised Trainer's data plumbing (epoch order as a pure function of
  (seed, epoch), this process's share of each batch, padded eval batches, resume, `step`),
  and builds its own state and step instead of the supervised ones.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
               mesh: jax.sharding.Mesh | None = None, views: ViewSpec | None = None):
    # Not train.Trainer.__init__ (that builds the supervised cohort); its set-up steps.
    self._start(config, workdir, mesh)
    self._load_data()
    _validate_moco(config, self.streaming)
    # `views` replaces the recipe named by config.moco.views; the loss, head and tau stay
    # the config's.
    if views is None:
      views = VIEW_SPECS[config.moco.views]
    self.spec = views
    if self.streaming:  # Two crops per image from the input pipeline, at MoCo's scale.
      try:
        self.dataset.use_two_views(self.spec.crop_scale)
      except ValueError as e:
        raise config_lib.ConfigError(f"MoCo on {config.input.dataset}: {e}") from None
    self.encoders = build_encoders(config, self.image_shape)
    self.model = self.encoders.cohort  # the query encoders' cohort (Trainer.meta reads it)
    replicated = sharding_lib.replicated(self.mesh)
    self._put_training_set(with_labels=False)
    self.state = create_state(self.encoders, self.tx, jax.random.PRNGKey(config.seed),
                              self.mesh, queue_size=config.moco.queue_size)
    self.shardings = jax.tree.map(lambda _: replicated, self.state)
    self._train_step = self._compile_train_step()
    self._embed_step = jax.jit(
        functools.partial(embed_step, encoders=self.encoders,
                          preprocess=self._eval_preprocess),
        in_shardings=(replicated, replicated, sharding_lib.batch_sharded(self.mesh)),
        out_shardings=replicated)

  def _views(self, rng: Array, images: Array, images2: Array | None) -> tuple[Array, Array]:
    return two_views(rng, images, images2, self.spec, mean=self.dataset.mean,
                     std=self.dataset.std, size=self.image_shape[0],
                     dtype=self.encoders.cohort.dtype)

  def _compile_train_step(self):
    step = functools.partial(
        train_step, encoders=self.encoders, tx=self.tx, loss_cfg=self.config.loss,
        key_momentum=self.config.moco.key_momentum, views=self._views,
        soft_ramp_steps=self.config.loss.soft_warmup_epochs * self.steps_per_epoch)
    replicated = sharding_lib.replicated(self.mesh)
    return jax.jit(
        step, in_shardings=(self.shardings, sharding_lib.batch_sharded(self.mesh), replicated),
        out_shardings=(self.shardings, replicated), donate_argnums=(0,))

  # -- the kNN monitor
  def _embed_split(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Features [M, N, F] of a whole split (in order, padding dropped)."""
    from mcl_jax.data import pipeline
    batch_size = train._round_up(self.config.input.eval_batch_size, self.mesh.size)  # pylint: disable=protected-access
    chunks = []
    for batch in pipeline.eval_batches(images, labels, batch_size):
      local = batch["image"][sharding_lib.process_slice(batch_size)]
      feats = self._embed_step(self.state.params, self.state.batch_stats,
                               sharding_lib.global_batch(local, self.mesh))
      chunks.append(np.asarray(feats)[:, batch["mask"] > 0])
    return np.concatenate(chunks, axis=1)

  def knn_accuracy(self, ks: tuple[int, ...] = KNN_KS) -> dict[str, np.ndarray] | None:
    """kNN top-1 [M] of each member's frozen backbone features against the training split.

    {'top1': k = 200 on the test split, 'top1_k20': k = 20, ...} and, when a validation
    split is held out, the same keys with a `val_` prefix. None for streaming sources
    (their training split cannot be replayed un-augmented).
    """
    if self.streaming:
      return None
    ds = self.dataset
    train_f = self._embed_split(ds.train_images, ds.train_labels)
    result = {}
    for split, (images, labels) in ds.eval_splits().items():
      eval_f = self._embed_split(images, labels)
      for k in ks:
        key = ("" if split == "test" else "val_") + (
            "top1" if k == knn.DEFAULT_K else f"top1_k{k}")
        result[key] = np.asarray([float(knn.knn_accuracy(
            train_f[m], ds.train_labels, eval_f[m], labels, num_classes=ds.num_classes, k=k))
            for m in range(train_f.shape[0])])
    return result

  def meta(self) -> dict[str, Any]:
    """The supervised trainer's meta keys (what export needs), plus MoCo's."""
    return {**super().meta(), "moco_mlp": bool(self.config.moco.mlp),
            # The config does not name the augmentation when `views` replaced it.
            "views": dataclasses.asdict(self.spec)}


def _format_knn(result: dict[str, np.ndarray]) -> str:
  return "  |  ".join(
      f"{name}: " + " ".join(f"{100 * a:.2f}" for a in acc) for name, acc in result.items())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       views: ViewSpec | None = None) -> dict[str, Any]:
  """Pre-trains the MoCo-MCL cohort; kNN every `moco.knn_every_epochs`; resumes from workdir.

  `views`: the two-view augmentation, default the recipe named by `config.moco.views`
  (MocoTrainer).

  Returns {"knn": {"top1": [M], "top1_k20": [M], ...} (final kNN accuracy of each member's
  backbone features, `MocoTrainer.knn_accuracy`; None for streaming datasets), "train": the last logged training metrics, "steps": the
  step reached, "preempted": bool}. On SIGTERM it saves and returns with preempted=True.
  """
  trainer = MocoTrainer(config, workdir, views=views)

  def knn_top1():
    return trainer.knn_accuracy()

  result = train.fit(
      trainer, describe=(f"MoCo ({config.moco.views} views, "
                         f"{'MLP' if config.moco.mlp else 'linear'} head) pre-training "
                         f"{config.model.arch} "
                         f"x{config.cohort.num_members}"),
      evaluate=knn_top1, eval_every_epochs=config.moco.knn_every_epochs,
      eval_scalars=lambda r: train.flatten_metrics(r, "knn/"),
      format_eval=lambda r: f"kNN top-1 % (per member): {_format_knn(r)}")
  return {"knn": result.pop("eval"), **result}
