"""`tiny`: a test-only backbone (about 4k params) with the full backbone contract.

The CIFAR ResNet code with one block group: stem conv1 3x3 (8 channels) + bn1 + ReLU, then
`layer1.0`, a BasicBlock to 16 channels with a `downsample` shortcut, then global average
pool and `classifier`. Two stages, so a cohort can share stage 0 (`shared_stages=1`), and
every layer kind that conversion and export must handle (conv, BN, downsample, linear).
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

from mcl_jax.models.resnet_cifar import ResNetCifar


class Tiny(ResNetCifar):
  """Stem + one block group + head; same names as the CIFAR ResNets."""
  num_blocks: Sequence[int] = (1,)
  widths: Sequence[int] = (16,)
  stem_width: int = 8

  num_stages: ClassVar[int] = 2


def tiny(num_classes: int, **kwargs: Any) -> Tiny:
  """4,082 params at 10 classes."""
  return Tiny(num_classes=num_classes, **kwargs)


ARCHS = {"tiny": tiny}
