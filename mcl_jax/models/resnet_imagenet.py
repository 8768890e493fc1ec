"""ImageNet ResNets with torchvision's layout and names: resnet18, resnet34, resnet50.

`conv1` 7x7/2 (pad 3), `bn1`, ReLU, 3x3/2 max-pool (pad 1), `layer1`..`layer4` of widths
64-512 (strides 1, 2, 2, 2), global average pool, `fc`. The official MCL code
(`models/resnet_imagenet.py`) is torchvision's ResNet returning (logits, embedding).

Stages (docs/DESIGN.md):
  0  stem     conv1, bn1, ReLU, max-pool
  1  layer1   2  layer2   3  layer3   4  layer4
  head        global average pool, fc
The official M > 2 cohort shares conv1/bn1/layer1/layer2: stages [0, 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax.models import layers
from mcl_jax.models.resnet_cifar import BasicBlock
from mcl_jax.models.resnet_cifar import Bottleneck
from mcl_jax.models.resnet_cifar import block_group

Array = jax.Array


class ResNetImageNet(nn.Module):
  """torchvision ResNet (single network), following the backbone contract."""

  num_classes: int
  num_blocks: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  dtype: Any = jnp.float32
  stage_slice: tuple[int, int | None] = (0, None)

  num_stages: ClassVar[int] = 5  # stem + 4 block groups; the head is not a stage.

  @nn.compact
  def __call__(self, x: Array, train: bool):
    start, end, with_head = layers.stage_range(self)
    block = Bottleneck if self.bottleneck else BasicBlock
    x = x.astype(self.dtype)
    for stage in range(start, end):
      if stage == 0:
        x = layers.conv(64, 7, stride=2, padding=3, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(layers.batch_norm(train, dtype=self.dtype, name="bn1")(x))
        x = layers.max_pool_3x3_s2(x)
      else:
        x = block_group(
          x,
          block,
          64 * 2 ** (stage - 1),
          self.num_blocks[stage - 1],
          1 if stage == 1 else 2,
          train,
          self.dtype,
          f"layer{stage}",
        )
    if not with_head:
      return x
    features = layers.global_avg_pool(x)
    logits = layers.linear(self.num_classes, features.shape[-1], dtype=self.dtype, name="fc")(
      features
    )
    return logits, features


def resnet18(num_classes: int = 1000, **kwargs: Any) -> ResNetImageNet:
  """BasicBlock 2-2-2-2: 11,689,512 params at 1000 classes (torchvision's count)."""
  return ResNetImageNet(num_classes=num_classes, num_blocks=(2, 2, 2, 2), **kwargs)


def resnet34(num_classes: int = 1000, **kwargs: Any) -> ResNetImageNet:
  """BasicBlock 3-4-6-3: 21,797,672 params at 1000 classes."""
  return ResNetImageNet(num_classes=num_classes, num_blocks=(3, 4, 6, 3), **kwargs)


def resnet50(num_classes: int = 1000, **kwargs: Any) -> ResNetImageNet:
  """Bottleneck 3-4-6-3 (stride on the 3x3, torchvision v1.5): 25,557,032 params at 1000."""
  return ResNetImageNet(num_classes=num_classes, num_blocks=(3, 4, 6, 3), bottleneck=True, **kwargs)


ARCHS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
