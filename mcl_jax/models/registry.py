"""The architectures by name: `create(arch, num_classes)` and `ARCHS`.

Every backbone module exports `ARCHS` (docs/DESIGN.md, "Adding an architecture"); this
merges them. The Cohort and member export build networks through `create`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from mcl_jax.models import hcgnet
from mcl_jax.models import resnet_cifar
from mcl_jax.models import resnet_imagenet
from mcl_jax.models import shufflenetv2
from mcl_jax.models import tiny
from mcl_jax.models import wrn

ARCHS: dict[str, Callable[..., nn.Module]] = {}
for _module in (resnet_cifar, wrn, shufflenetv2, hcgnet, resnet_imagenet, tiny):
  ARCHS.update(_module.ARCHS)


def create(arch: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """The single network `arch` (a docs/SPEC.md 1 name such as 'resnet32' or 'wrn_16_2').

  kwargs go to the module: `dtype` (compute dtype, params stay float32) and `stage_slice`.
  __call__(x [B, H, W, 3], train) -> (logits [B, num_classes], pooled features [B, F]).
  """
  if arch not in ARCHS:
    raise ValueError(f"Unknown arch {arch!r}; known archs: {', '.join(sorted(ARCHS))}.")
  return ARCHS[arch](num_classes=num_classes, **kwargs)
