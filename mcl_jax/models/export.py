"""Between a Cohort and plain single networks (docs/SPEC.md 1: any member exports at no extra cost).

`extract_member` gives the variables of `create(arch, num_classes)` (no projection head)
whose eval-mode logits equal the cohort's member m; `cohort_from_members` stacks single
networks back into cohort variables. Trunk params and the branch params have disjoint
names (backbone contract), so a member is the plain union trunk | branch[m].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mcl_jax.models import cohort as cohort_lib
from mcl_jax.models import registry

_COLLECTIONS = ("params", "batch_stats")


def _check_trunk(tree: Mapping[str, Any], shared_stages: int, collection: str) -> None:
  has_trunk = "trunk" in tree
  if collection == "params" and has_trunk != (shared_stages > 0):
    raise ValueError(
      f"shared_stages={shared_stages} but the cohort variables "
      f"{'have' if has_trunk else 'have no'} 'trunk'; pass the cohort's "
      "shared_stages."
    )


def extract_member(
  cohort_variables: Mapping[str, Any], m: int, shared_stages: int
) -> dict[str, Any]:
  """Variables of the single network equal to cohort member `m` (head dropped).

  Returns {'params': ..., 'batch_stats': ...} for `create(arch, num_classes)`: the shared
  trunk (when shared_stages > 0) merged with slice m of the member branches.
  """
  out = {}
  for col in _COLLECTIONS:
    if col not in cohort_variables:
      continue
    tree = cohort_variables[col]
    _check_trunk(tree, shared_stages, col)
    branch = tree.get("members", {}).get("backbone", {})
    num_members = jax.tree.leaves(branch)[0].shape[0] if jax.tree.leaves(branch) else None
    if num_members is not None and not -num_members <= m < num_members:
      raise ValueError(f"Member index {m} out of range for a cohort of {num_members}.")
    single = {k: jax.tree.map(lambda a: a[m], v) for k, v in branch.items()}
    trunk = dict(tree.get("trunk", {}))
    clash = set(trunk) & set(single)
    if clash:
      raise ValueError(
        f"Trunk and member branches share names {sorted(clash)[:3]}; the "
        "backbone breaks the stage naming contract."
      )
    out[col] = {**trunk, **single}
  return out


def _trunk_names(arch: str, shared_stages: int) -> dict[str, set[str]]:
  """Top-level variable names of stages [0, shared_stages), per collection (no real init)."""
  trunk = registry.create(arch, 1, stage_slice=(0, shared_stages))
  shapes = jax.eval_shape(
    lambda: trunk.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), False)
  )
  return {col: set(shapes.get(col, {})) for col in _COLLECTIONS}


def _feature_width(arch: str) -> int:
  net = registry.create(arch, 1)
  _, features = jax.eval_shape(
    lambda: net.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), False)[0]
  )
  return features.shape[-1]


def _stack(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def cohort_from_members(
  members: Sequence[Mapping[str, Any]],
  shared_stages: int,
  heads: Any = None,
  *,
  arch: str,
  embed_dim: int = 128,
  rng: jax.Array | None = None,
) -> dict[str, Any]:
  """Cohort variables from single-network variables (one per member), the way back.

  With shared_stages > 0 the trunk (stages [0, shared_stages)) is taken from members[0];
  the other members' trunk weights are dropped. `heads` is the stacked head params
  (`params['members']['head']` of a cohort) or a list of per-member head params; when None
  the heads are freshly initialised from `rng` (default PRNGKey(0)), one key per member.
  `arch` names the backbone (to find the trunk's layers and the feature width).
  """
  if not members:
    raise ValueError("cohort_from_members needs at least one member.")
  trunk_names = (
    _trunk_names(arch, shared_stages) if shared_stages > 0 else {col: set() for col in _COLLECTIONS}
  )
  out: dict[str, Any] = {}
  for col in _COLLECTIONS:
    if col not in members[0]:
      continue
    tree: dict[str, Any] = {}
    if shared_stages > 0:
      tree["trunk"] = {k: v for k, v in members[0][col].items() if k in trunk_names[col]}
    branches = [
      {k: v for k, v in member[col].items() if k not in trunk_names[col]} for member in members
    ]
    tree["members"] = {"backbone": _stack(branches)}
    out[col] = tree
  if heads is None:
    keys = jax.random.split(jax.random.PRNGKey(0) if rng is None else rng, len(members))
    head = cohort_lib.ProjectionHead(embed_dim)
    dummy = jnp.zeros((1, _feature_width(arch)))
    heads = jax.vmap(lambda k: head.init(k, dummy)["params"])(keys)
  elif isinstance(heads, (list, tuple)):
    heads = _stack(heads)
  out["params"]["members"]["head"] = heads
  return out
