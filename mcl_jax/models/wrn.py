"""Wide ResNets of the official MCL code (`models/wrn.py`): wrn_16_2, wrn_40_2, wrn_28_4.

Pre-activation blocks (BN - ReLU - conv), depth 6n + 4, widths 16, 16k, 32k, 64k, no
dropout. Names follow the official single network `WideResNet`: `conv1`,
`block1.layer.0.{bn1,conv1,bn2,conv2,convShortcut}`, final `bn1`, classifier `fc`.

Stages (docs/DESIGN.md):
  0  stem     conv1 (no BN: the blocks are pre-activation)
  1  block1   2  block2   3  block3
  head        bn1, ReLU, global average pool, fc
The official M > 2 cohort (`WideResNet_b`) shares conv1/block1 and gives every member its
own block2, block3, final BN and classifier: stages [0, 2) shared, and the final BN belongs
to the head, so it is never shared.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax.models import layers

Array = jax.Array


class WideBasicBlock(nn.Module):
  """Official WRN BasicBlock (dropRate 0).

  When the width changes, the pre-activation relu(bn1(x)) feeds both conv1 and the 1x1
  `convShortcut`; otherwise conv1 sees relu(bn1(x)) and the identity path the raw x.
  """

  out_planes: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    bn = lambda name: layers.batch_norm(train, dtype=self.dtype, name=name)  # noqa: E731
    equal_in_out = x.shape[-1] == self.out_planes
    pre = nn.relu(bn("bn1")(x))
    out = layers.conv(
      self.out_planes, 3, stride=self.stride, padding=1, dtype=self.dtype, name="conv1"
    )(pre)
    out = nn.relu(bn("bn2")(out))
    out = layers.conv(self.out_planes, 3, padding=1, dtype=self.dtype, name="conv2")(out)
    if equal_in_out:
      shortcut = x
    else:
      shortcut = layers.conv(
        self.out_planes, 1, stride=self.stride, dtype=self.dtype, name="convShortcut"
      )(pre)
    return shortcut + out


class WideResNet(nn.Module):
  """The official WideResNet (single network), following the backbone contract."""

  num_classes: int
  depth: int = 16
  widen_factor: int = 2
  dtype: Any = jnp.float32
  stage_slice: tuple[int, int | None] = (0, None)

  num_stages: ClassVar[int] = 4  # stem + 3 block groups; the head (incl. final BN) is not.

  @nn.compact
  def __call__(self, x: Array, train: bool):
    start, end, with_head = layers.stage_range(self)
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n + 4, got {self.depth}.")
    n = (self.depth - 4) // 6
    widths = (16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor)
    x = x.astype(self.dtype)
    for stage in range(start, end):
      if stage == 0:
        x = layers.conv(16, 3, padding=1, dtype=self.dtype, name="conv1")(x)
        continue
      for i in range(n):
        stride = (1 if stage == 1 else 2) if i == 0 else 1
        x = WideBasicBlock(
          widths[stage - 1], stride, dtype=self.dtype, name=f"block{stage}.layer.{i}"
        )(x, train)
    if not with_head:
      return x
    x = nn.relu(layers.batch_norm(train, dtype=self.dtype, name="bn1")(x))
    # Official: F.avg_pool2d(out, 8) on the 8x8 map of a 32x32 input, i.e. a global mean.
    features = layers.global_avg_pool(x)
    logits = layers.linear(
      self.num_classes, features.shape[-1], dtype=self.dtype, name="fc", zero_bias=True
    )(features)
    return logits, features


def wrn_16_2(num_classes: int, **kwargs: Any) -> WideResNet:
  """WRN-16-2: 703,284 params at 100 classes."""
  return WideResNet(num_classes=num_classes, depth=16, widen_factor=2, **kwargs)


def wrn_40_2(num_classes: int, **kwargs: Any) -> WideResNet:
  """WRN-40-2: 2,255,156 params at 100 classes."""
  return WideResNet(num_classes=num_classes, depth=40, widen_factor=2, **kwargs)


def wrn_28_4(num_classes: int, **kwargs: Any) -> WideResNet:
  """WRN-28-4: 5,872,180 params at 100 classes."""
  return WideResNet(num_classes=num_classes, depth=28, widen_factor=4, **kwargs)


ARCHS = {"wrn_16_2": wrn_16_2, "wrn_40_2": wrn_40_2, "wrn_28_4": wrn_28_4}
