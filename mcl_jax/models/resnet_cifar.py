"""CIFAR ResNets of the official MCL code (`models/resnet.py`): resnet32, resnet56, resnet110.

A 3x3 stride-1 stem with 16 channels, no max-pool, three block groups of widths 16, 32, 64
(strides 1, 2, 2), global average pool and a linear `classifier`. resnet32 / resnet56 use
BasicBlock (5-5-5, 9-9-9); resnet110 uses Bottleneck (12-12-12, expansion 4, stride on the
3x3 conv), as the official file does (docs/SPEC.md 1).

Stages (docs/DESIGN.md):
  0  stem     conv1, bn1, ReLU
  1  layer1   2  layer2   3  layer3
  head        global average pool, classifier
The official M > 2 cohort (`ResNet_b`) shares conv1/bn1/layer1: stages [0, 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax.models import layers

Array = jax.Array


class BasicBlock(nn.Module):
  """torchvision BasicBlock: 3x3 (stride) - BN - ReLU - 3x3 - BN, + identity/downsample, ReLU."""

  planes: int
  stride: int = 1
  dtype: Any = jnp.float32

  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    out = layers.conv(
      self.planes, 3, stride=self.stride, padding=1, dtype=self.dtype, name="conv1"
    )(x)
    out = nn.relu(layers.batch_norm(train, dtype=self.dtype, name="bn1")(out))
    out = layers.conv(self.planes, 3, padding=1, dtype=self.dtype, name="conv2")(out)
    out = layers.batch_norm(train, dtype=self.dtype, name="bn2")(out)
    return nn.relu(out + _shortcut(x, self.planes, self.stride, train, self.dtype))


class Bottleneck(nn.Module):
  """torchvision Bottleneck (v1.5): 1x1 - 3x3 (stride) - 1x1 to 4 * planes, + shortcut, ReLU."""

  planes: int
  stride: int = 1
  dtype: Any = jnp.float32

  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    bn = lambda name: layers.batch_norm(train, dtype=self.dtype, name=name)  # noqa: E731
    out = layers.conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
    out = nn.relu(bn("bn1")(out))
    out = layers.conv(
      self.planes, 3, stride=self.stride, padding=1, dtype=self.dtype, name="conv2"
    )(out)
    out = nn.relu(bn("bn2")(out))
    out = layers.conv(self.planes * 4, 1, dtype=self.dtype, name="conv3")(out)
    out = bn("bn3")(out)
    return nn.relu(out + _shortcut(x, self.planes * 4, self.stride, train, self.dtype))


def _shortcut(x: Array, out_channels: int, stride: int, train: bool, dtype: Any) -> Array:
  """Identity, or `downsample` = Sequential(conv1x1(stride), BN) when the shape changes.

  Called inside a block's compact __call__, so the layers become that block's children
  `downsample.0` / `downsample.1`, the torchvision names.
  """
  if stride == 1 and x.shape[-1] == out_channels:
    return x
  y = layers.conv(out_channels, 1, stride=stride, dtype=dtype, name="downsample.0")(x)
  return layers.batch_norm(train, dtype=dtype, name="downsample.1")(y)


def block_group(
  x: Array,
  block: type[nn.Module],
  planes: int,
  num_blocks: int,
  stride: int,
  train: bool,
  dtype: Any,
  prefix: str,
) -> Array:
  """torchvision `_make_layer`: blocks named `{prefix}.{i}`, the first one strided."""
  for i in range(num_blocks):
    x = block(planes, stride if i == 0 else 1, dtype=dtype, name=f"{prefix}.{i}")(x, train)
  return x


class ResNetCifar(nn.Module):
  """The official CIFAR ResNet (single network), following the backbone contract."""

  num_classes: int
  num_blocks: Sequence[int] = (5, 5, 5)
  bottleneck: bool = False
  dtype: Any = jnp.float32
  stage_slice: tuple[int, int | None] = (0, None)
  widths: Sequence[int] = (16, 32, 64)
  stem_width: int = 16

  num_stages: ClassVar[int] = 4  # stem + 3 block groups; the head is not a stage.

  @nn.compact
  def __call__(self, x: Array, train: bool):
    start, end, with_head = layers.stage_range(self)
    if len(self.num_blocks) != self.num_stages - 1 or len(self.widths) != self.num_stages - 1:
      raise ValueError(
        f"{type(self).__name__} needs {self.num_stages - 1} block groups, got "
        f"num_blocks={self.num_blocks}, widths={self.widths}."
      )
    block = Bottleneck if self.bottleneck else BasicBlock
    x = x.astype(self.dtype)
    for stage in range(start, end):
      if stage == 0:
        x = layers.conv(self.stem_width, 3, padding=1, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(layers.batch_norm(train, dtype=self.dtype, name="bn1")(x))
      else:
        x = block_group(
          x,
          block,
          self.widths[stage - 1],
          self.num_blocks[stage - 1],
          1 if stage == 1 else 2,
          train,
          self.dtype,
          f"layer{stage}",
        )
    if not with_head:
      return x
    features = layers.global_avg_pool(x)
    logits = layers.linear(
      self.num_classes, features.shape[-1], dtype=self.dtype, name="classifier"
    )(features)
    return logits, features


def resnet32(num_classes: int, **kwargs: Any) -> ResNetCifar:
  """BasicBlock 5-5-5: 472,756 params at 100 classes."""
  return ResNetCifar(num_classes=num_classes, num_blocks=(5, 5, 5), **kwargs)


def resnet56(num_classes: int, **kwargs: Any) -> ResNetCifar:
  """BasicBlock 9-9-9: 861,620 params at 100 classes."""
  return ResNetCifar(num_classes=num_classes, num_blocks=(9, 9, 9), **kwargs)


def resnet110(num_classes: int, **kwargs: Any) -> ResNetCifar:
  """Bottleneck 12-12-12 (expansion 4, as in the official file): 1,170,868 params at 100."""
  return ResNetCifar(num_classes=num_classes, num_blocks=(12, 12, 12), bottleneck=True, **kwargs)


ARCHS = {"resnet32": resnet32, "resnet56": resnet56, "resnet110": resnet110}
