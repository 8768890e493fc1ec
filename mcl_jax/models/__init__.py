"""Backbones, the Cohort and member export (docs/DESIGN.md, docs/SPEC.md 1).

`create(arch, num_classes, **kw)` builds one network of the docs/SPEC.md table (`registry`); every
backbone module exports `ARCHS` and follows the backbone contract (stage_slice,
num_stages, PyTorch names). `Cohort` runs M members over stacked variables;
`extract_member` / `cohort_from_members` move between a cohort and single networks.
"""

from mcl_jax.models.cohort import HEAD_NORMS
from mcl_jax.models.cohort import HEADS
from mcl_jax.models.cohort import STRATEGIES
from mcl_jax.models.cohort import Cohort
from mcl_jax.models.cohort import ProjectionHead
from mcl_jax.models.cohort import count_cohort_params
from mcl_jax.models.cohort import count_params
from mcl_jax.models.cohort import resolve_strategy
from mcl_jax.models.export import cohort_from_members
from mcl_jax.models.export import extract_member
from mcl_jax.models.registry import ARCHS
from mcl_jax.models.registry import create

__all__ = [
  "ARCHS",
  "Cohort",
  "HEADS",
  "HEAD_NORMS",
  "ProjectionHead",
  "STRATEGIES",
  "cohort_from_members",
  "count_cohort_params",
  "count_params",
  "create",
  "extract_member",
  "resolve_strategy",
]
