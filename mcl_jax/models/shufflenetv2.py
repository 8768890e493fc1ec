"""ShuffleNetV2 for CIFAR (32x32), as in the official MCL code (`models/shufflenetv2.py`).

The CIFAR variant differs from the ImageNet network: a 3x3 stride-1 stem with 24 channels,
no max-pool, and every stage opening with a stride-2 down-sampling block, so a 32x32 input
reaches the head at 4x4. Widths (docs/SPEC.md 1): 0.5x (48, 96, 192, 1024),
1x (116, 232, 464, 1024), blocks (3, 7, 3) after each stage's down-sampling block.

Stages (the backbone contract of docs/DESIGN.md):
  0  stem        conv1, bn1, ReLU
  1  layer1      DownBlock + 3 BasicBlocks
  2  layer2      DownBlock + 7 BasicBlocks
  3  layer3      DownBlock + 3 BasicBlocks, then conv2, bn2, ReLU (the 1x1 conv to 1024)
  head           global average pool, linear
The official M > 2 cohort (`ShuffleNetV2_b`) shares conv1/bn1/layer1 and gives every member
its own layer2, layer3, conv2, bn2 and classifier: that is exactly stages [0, 2) shared.

Layout is NHWC. The official channel split and channel shuffle act on the NCHW channel
axis; here they act on the last axis with the same channel order, so weights convert
one-to-one (conv OIHW <-> HWIO) and outputs match PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax.models import layers

Array = jax.Array

# The official file keeps PyTorch's default Conv2d init, U(+-1/sqrt(fan_in)): the same
# formula as the default nn.Linear init.
_conv_init = layers.torch_linear_init


def _conv(
  features: int,
  kernel: int,
  *,
  stride: int = 1,
  padding: int = 0,
  groups: int = 1,
  dtype: Any,
  name: str,
) -> nn.Conv:
  """A bias-free Conv2d (groups allowed) with PyTorch's explicit symmetric padding."""
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((padding, padding), (padding, padding)),
    feature_group_count=groups,
    use_bias=False,
    dtype=dtype,
    kernel_init=_conv_init,
    name=name,
  )


def _bn(train: bool, dtype: Any, name: str) -> layers.BatchNorm:
  """BatchNorm2d with PyTorch's defaults."""
  return layers.batch_norm(train, dtype=dtype, name=name)


def channel_shuffle(x: Array, groups: int = 2) -> Array:
  """PyTorch's NCHW shuffle view(N, g, C/g, H, W).permute(0, 2, 1, 3, 4), on NHWC.

  Output channel j * g + i is input channel i * (C / g) + j.
  """
  *lead, c = x.shape
  x = x.reshape(*lead, groups, c // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, c)


class BasicBlock(nn.Module):
  """Stride-1 unit: split channels, transform the second half, concat, shuffle."""

  channels: int
  split_ratio: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    c = int(x.shape[-1] * self.split_ratio)  # official SplitBlock: first c channels pass
    x1, x2 = x[..., :c], x[..., c:]
    mid = int(self.channels * self.split_ratio)
    out = nn.relu(_bn(train, self.dtype, "bn1")(_conv(mid, 1, dtype=self.dtype, name="conv1")(x2)))
    out = _bn(train, self.dtype, "bn2")(
      _conv(mid, 3, padding=1, groups=mid, dtype=self.dtype, name="conv2")(out)
    )
    out = nn.relu(_bn(train, self.dtype, "bn3")(_conv(mid, 1, dtype=self.dtype, name="conv3")(out)))
    return channel_shuffle(jnp.concatenate([x1, out], axis=-1))


class DownBlock(nn.Module):
  """Stride-2 unit: two branches over the whole input, each giving out_channels // 2."""

  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    cin = x.shape[-1]
    mid = self.out_channels // 2
    conv = functools.partial(_conv, dtype=self.dtype)
    bn = functools.partial(_bn, train, self.dtype)
    # Left: depthwise 3x3 stride 2 (no ReLU), then 1x1.
    left = bn("bn1")(conv(cin, 3, stride=2, padding=1, groups=cin, name="conv1")(x))
    left = nn.relu(bn("bn2")(conv(mid, 1, name="conv2")(left)))
    # Right: 1x1, depthwise 3x3 stride 2 (no ReLU), 1x1.
    right = nn.relu(bn("bn3")(conv(mid, 1, name="conv3")(x)))
    right = bn("bn4")(conv(mid, 3, stride=2, padding=1, groups=mid, name="conv4")(right))
    right = nn.relu(bn("bn5")(conv(mid, 1, name="conv5")(right)))
    return channel_shuffle(jnp.concatenate([left, right], axis=-1))


class ShuffleNetV2(nn.Module):
  """CIFAR ShuffleNetV2 following the backbone contract (docs/DESIGN.md).

  Param paths joined with '.' are the official PyTorch state-dict keys (`conv1`, `bn1`,
  `layer1.0.conv1`, ..., `conv2`, `bn2`, `linear`).
  """

  num_classes: int
  dtype: Any = jnp.float32
  stage_slice: tuple[int, int | None] = (0, None)
  out_channels: Sequence[int] = (116, 232, 464, 1024)
  num_blocks: Sequence[int] = (3, 7, 3)
  stem_channels: int = 24

  num_stages: ClassVar[int] = 4  # stem + 3 block groups; the head (pool + linear) is not a stage.

  @nn.compact
  def __call__(self, x: Array, train: bool):
    start, end, with_head = layers.stage_range(self)
    n = self.num_stages - 1
    if len(self.num_blocks) != n or len(self.out_channels) != n + 1:
      raise ValueError(
        f"{type(self).__name__} needs {n} block groups and {n + 1} widths "
        f"(the last for conv2), got num_blocks={self.num_blocks}, "
        f"out_channels={self.out_channels}."
      )
    x = x.astype(self.dtype)
    for stage in range(start, end):
      if stage == 0:
        x = _conv(self.stem_channels, 3, padding=1, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(_bn(train, self.dtype, "bn1")(x))
        continue
      i = stage - 1
      x = DownBlock(self.out_channels[i], dtype=self.dtype, name=f"layer{stage}.0")(x, train)
      for j in range(self.num_blocks[i]):
        x = BasicBlock(self.out_channels[i], dtype=self.dtype, name=f"layer{stage}.{j + 1}")(
          x, train
        )
      if stage == self.num_stages - 1:
        x = _conv(self.out_channels[-1], 1, dtype=self.dtype, name="conv2")(x)
        x = nn.relu(_bn(train, self.dtype, "bn2")(x))
    if not with_head:
      return x
    # Official single net: avg_pool2d(out, 4) on the 4x4 map of a 32x32 input, i.e. a global
    # mean (the M > 2 net uses AdaptiveAvgPool2d(1)); the global mean also serves other sizes.
    features = layers.global_avg_pool(x)
    logits = layers.linear(self.num_classes, features.shape[-1], dtype=self.dtype, name="linear")(
      features
    )
    return logits, features


def shufflenetv2_05x(
  num_classes: int,
  *,
  dtype: Any = jnp.float32,
  stage_slice: tuple[int, int | None] = (0, None),
  **kwargs,
) -> ShuffleNetV2:
  """ShuffleNetV2 0.5x (official `ShuffleNetV2_05x`): 444,292 params at 100 classes."""
  return ShuffleNetV2(
    num_classes=num_classes,
    dtype=dtype,
    stage_slice=stage_slice,
    out_channels=(48, 96, 192, 1024),
    num_blocks=(3, 7, 3),
    **kwargs,
  )


def shufflenetv2_1x(
  num_classes: int,
  *,
  dtype: Any = jnp.float32,
  stage_slice: tuple[int, int | None] = (0, None),
  **kwargs,
) -> ShuffleNetV2:
  """ShuffleNetV2 1x (official `ShuffleNetV2_1x`): 1,356,104 params at 100 classes."""
  return ShuffleNetV2(
    num_classes=num_classes,
    dtype=dtype,
    stage_slice=stage_slice,
    out_channels=(116, 232, 464, 1024),
    num_blocks=(3, 7, 3),
    **kwargs,
  )


ARCHS = {
  "shufflenetv2_0.5x": shufflenetv2_05x,
  "shufflenetv2_1x": shufflenetv2_1x,
}
