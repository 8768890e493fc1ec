"""Backbones, the Cohort and member export (docs/DESIGN.md, SPEC 1).

`create(arch, num_classes, **kw)` builds one network of the SPEC table; every backbone
module exports `ARCHS` and follows the backbone contract (stage_slice, num_stages, PyTorch
names). `Cohort` runs M members over stacked variables; `extract_member` /
`cohort_from_members` move between a cohort and plain single networks.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from mcl_jax.models import hcgnet, resnet_cifar, resnet_imagenet, shufflenetv2, tiny, wrn

ARCHS: dict[str, Callable[..., nn.Module]] = {}
for _module in (resnet_cifar, wrn, shufflenetv2, hcgnet, resnet_imagenet, tiny):
  ARCHS.update(_module.ARCHS)


def create(arch: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """The single network `arch` (a SPEC name such as 'resnet32' or 'wrn_16_2').

  kwargs go to the module: `dtype` (compute dtype, params stay float32) and `stage_slice`.
  __call__(x [B, H, W, 3], train) -> (logits [B, num_classes], pooled features [B, F]).
  """
  if arch not in ARCHS:
    raise ValueError(f"Unknown arch {arch!r}; known archs: {', '.join(sorted(ARCHS))}.")
  return ARCHS[arch](num_classes=num_classes, **kwargs)


# Imported last: they call create().
from mcl_jax.models.cohort import (  # noqa: E402
    STRATEGIES, Cohort, ProjectionHead, count_cohort_params, count_params, resolve_strategy)
from mcl_jax.models.export import cohort_from_members, extract_member  # noqa: E402

__all__ = [
    "ARCHS", "Cohort", "ProjectionHead", "STRATEGIES", "cohort_from_members",
    "count_cohort_params", "count_params", "create", "extract_member", "resolve_strategy",
]
