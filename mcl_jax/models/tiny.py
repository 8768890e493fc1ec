"""`tiny`: a test-only backbone (about 4k params) with the full backbone contract.

The CIFAR ResNet code with one block group: stem conv1 3x3 (8 channels) + bn1 + ReLU, then
`layer1.0`, a BasicBlock to 16 channels with a `downsample` shortcut, then global average
pool and `classifier`. Two stages, so a cohort can share stage 0 (`shared_stages=1`), and
every layer kind that conversion and export must handle (conv, BN, downsample, linear).

`tiny_imagenet`: the torchvision ResNet layout (7x7/2 stem + max-pool, `layer1`..`layer4`,
`fc`) with one BasicBlock per group (ResNet-10). Five stages like resnet18/34, so it stands
in for them in the ImageNet configs' CPU smoke runs (shared trunks of up to 4 stages, the
bank regime) at about half the compile time of resnet18.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from mcl_jax.models.resnet_cifar import ResNetCifar
from mcl_jax.models.resnet_imagenet import ResNetImageNet


class Tiny(ResNetCifar):
  """Stem + one block group + head; same names as the CIFAR ResNets."""

  num_blocks: Sequence[int] = (1,)
  widths: Sequence[int] = (16,)
  stem_width: int = 8

  num_stages: ClassVar[int] = 2


def tiny(num_classes: int, **kwargs: Any) -> Tiny:
  """4,082 params at 10 classes."""
  return Tiny(num_classes=num_classes, **kwargs)


def tiny_imagenet(num_classes: int, **kwargs: Any) -> ResNetImageNet:
  """ResNet-10: BasicBlock 1-1-1-1 with resnet18's widths and names."""
  return ResNetImageNet(num_classes=num_classes, num_blocks=(1, 1, 1, 1), **kwargs)


ARCHS = {"tiny": tiny, "tiny_imagenet": tiny_imagenet}
