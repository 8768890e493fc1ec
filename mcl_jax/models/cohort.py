"""The Cohort: M networks of one architecture over stacked variables (docs/SPEC.md 1,
docs/DESIGN.md).

Layout of the variables (every leaf under `members` has a leading axis M):

  params:      {'trunk': <stages [0, s) of the backbone>,          # only when s > 0
                'members': {'backbone': <stages [s, end) + classifier>,
                            'head': {'fc1', 'fc2'}}}                 # projection heads
  batch_stats: {'trunk': ..., 'members': {'backbone': ...}}

The official code builds M = 2 as independent networks (s = 0) and M > 2 with a shared
trunk: stem + first block group on CIFAR (s = 2), stem + layer1 + layer2 on ImageNet
(s = 3). Here `shared_stages` is explicit and independent of M.

Execution strategies, one set of variables (a checkpoint written under one runs under any):
  vmap    nn.vmap over members: one batched program (convs with a member axis).
  unroll  a Python loop inside one jit: member m runs `_Member.apply` on slice m of the
          stacked variables, so XLA sees M ordinary convolutions it can schedule freely.
  map     jax.lax.map over the stacked variables: one member's program in a loop (smallest
          compile and memory, members run one after another).
  auto    `resolve_strategy`: picked per backend and backbone from measurements.
Initialisation always goes through the nn.vmap path (params RNG split per member, so
members differ at init), hence the same RNG gives the same variables for every strategy.

The `train` flag reaches the members as a module attribute, never as a keyword argument
through a lifted transform: Flax's lifted transforms drop keyword arguments with only a
RuntimeWarning, which would leave BatchNorm in training mode during evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax import numerics
from mcl_jax.models import layers
from mcl_jax.models import registry

Array = jax.Array

STRATEGIES = ("vmap", "unroll", "map")


# Where `auto` is vmap: on GPU, the CIFAR ResNets (16-64 channels), whose steps are bound by
# kernel launches there, so one grouped convolution per layer beats M of them (measured on
# resnet32: docs/PERFORMANCE.md, "On a GPU"; resnet56 and resnet110 have the same layer
# widths). wrn_16_2 and the ImageNet resnet18 were measured no faster with vmap.
GPU_VMAP_ARCHS = frozenset({"resnet32", "resnet56", "resnet110"})


def resolve_strategy(strategy: str, backend: str | None = None, arch: str | None = None) -> str:
  """The concrete strategy for `strategy` ('auto' | 'vmap' | 'unroll' | 'map') on
  `backend` ('cpu', 'gpu' or 'cuda', 'tpu'; None: unknown) for backbone `arch`.

  'auto' is 'vmap' for GPU_VMAP_ARCHS on GPU, else 'unroll'. vmap turns each member's
  convolutions into one grouped convolution: on GPU that fills a chip that the narrow CIFAR
  ResNets' small convolutions leave idle; XLA:CPU runs it far slower at CIFAR widths, and
  under XLA:TPU's own counts (`mcl-plan` on a v5e-4: resnet32 x2 and x4 and wrn_16_2 x2 in
  float32 and bfloat16, resnet18 x3 in bfloat16) unroll was as fast or faster but for one
  tie. map runs members one after another in a loop XLA cannot fuse across.
  docs/PERFORMANCE.md has every measurement; re-measure with `benchmarks/gpu.sh` before
  changing this.
  """
  if strategy == "auto":
    on_gpu = backend in ("gpu", "cuda")
    return "vmap" if on_gpu and arch in GPU_VMAP_ARCHS else "unroll"
  if strategy not in STRATEGIES:
    raise ValueError(
      f"Unknown cohort strategy {strategy!r}; use one of auto, {', '.join(STRATEGIES)}."
    )
  return strategy


HEADS = ("mlp", "linear", "none")
HEAD_NORMS = ("none", "batchnorm")


class ProjectionHead(nn.Module):
  """h_m (docs/SPEC.md 1): Dense(F, d) - ReLU - Dense(d, d), then L2 normalisation.

  kind 'mlp' is the official head; 'linear' is Dense(F, d) then L2 normalisation (no
  hidden layer). `norm='batchnorm'` puts a BatchNorm1d (PyTorch defaults, `train` as the
  backbone's) on the head's input, centring the pooled features (averages of ReLU
  outputs, all positive); the official head has none. Whether it prevents the early
  collapse of the embeddings: docs/RESULTS.md, "The collapse".
  """

  embed_dim: int = 128
  dtype: Any = jnp.float32
  kind: str = "mlp"
  norm: str = "none"
  train: bool = False

  @nn.compact
  def __call__(self, features: Array) -> tuple[Array, Array | None]:
    """(embeddings [B, d] L2-normalised, at least float32; the MLP's fc1 pre-activations
    [B, d], None for a linear head)."""
    if self.norm == "batchnorm":
      features = layers.batch_norm(self.train, dtype=self.dtype, name="bn")(features)
    elif self.norm != "none":
      raise ValueError(f"Unknown head norm {self.norm!r}; use one of {', '.join(HEAD_NORMS)}.")
    fan_in = features.shape[-1]
    if self.kind == "linear":
      h = layers.linear(self.embed_dim, fan_in, dtype=self.dtype, name="fc1")(features)
      return numerics.l2_normalize(h), None
    if self.kind != "mlp":
      raise ValueError(f"Unknown projection head {self.kind!r}; use one of {', '.join(HEADS)}.")
    hidden = layers.linear(self.embed_dim, fan_in, dtype=self.dtype, name="fc1")(features)
    h = layers.linear(self.embed_dim, self.embed_dim, dtype=self.dtype, name="fc2")(nn.relu(hidden))
    return numerics.l2_normalize(h), hidden  # F.normalize(h, dim=1)


class _Member(nn.Module):
  """One member: backbone stages [first_stage, end) + classifier, and its projection head.

  `train` is an attribute (see the module docstring for why).
  """

  arch: str
  num_classes: int
  first_stage: int
  embed_dim: int
  dtype: Any
  train: bool
  head: str = "mlp"
  head_norm: str = "none"

  @nn.compact
  def __call__(self, h: Array) -> dict[str, Array]:
    backbone = registry.create(
      self.arch,
      self.num_classes,
      dtype=self.dtype,
      stage_slice=(self.first_stage, None),
      name="backbone",
    )
    logits, features = backbone(h, self.train)
    out = {"logits": numerics.at_least_float32(logits), "features": features}
    if self.head != "none":
      out["embeddings"], hidden = ProjectionHead(
        self.embed_dim,
        dtype=self.dtype,
        kind=self.head,
        norm=self.head_norm,
        train=self.train,
        name="head",
      )(features)
      if hidden is not None:
        out["head_hidden"] = hidden
    return out


class Cohort(nn.Module):
  """M members of `arch` on one input batch, optionally behind a shared trunk.

  __call__(x [B, H, W, C], train) -> {'logits': [M, B, C] float32, 'features': [M, B, F]
  (compute dtype), 'embeddings': [M, B, embed_dim] float32, L2-normalised (no head: none),
  'head_hidden': [M, B, embed_dim] an MLP head's first-layer pre-activations (for
  `metrics.embedding_health`)}. Apply with mutable=['batch_stats'] when train is True.
  `head`: 'mlp' (official), 'linear' or 'none' (MoCo brings its own projection).
  """

  arch: str
  num_classes: int
  num_members: int
  shared_stages: int = 0
  embed_dim: int = 128
  strategy: str = "unroll"
  dtype: Any = jnp.float32
  head: str = "mlp"  # ProjectionHead.kind, or 'none'
  head_norm: str = "none"  # ProjectionHead.norm

  @nn.compact
  def __call__(self, x: Array, train: bool) -> dict[str, Array]:
    strategy = resolve_strategy(self.strategy, jax.default_backend(), self.arch)
    if self.num_members < 1:
      raise ValueError(f"Cohort num_members must be >= 1, got {self.num_members}.")
    num_stages = registry.create(self.arch, self.num_classes).num_stages
    if not 0 <= self.shared_stages < num_stages:
      raise ValueError(
        f"shared_stages={self.shared_stages} must be in [0, {num_stages}) for "
        f"{self.arch} ({num_stages} stages, stem included)."
      )
    h = x
    if self.shared_stages:
      h = registry.create(
        self.arch,
        self.num_classes,
        dtype=self.dtype,
        stage_slice=(0, self.shared_stages),
        name="trunk",
      )(x, train)
    member = functools.partial(
      _Member,
      self.arch,
      self.num_classes,
      self.shared_stages,
      self.embed_dim,
      self.dtype,
      train,
      self.head,
      self.head_norm,
    )
    if strategy == "vmap" or self.is_initializing():
      stacked = nn.vmap(
        _Member,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True},
        in_axes=None,
        out_axes=0,
        axis_size=self.num_members,
      )
      # Same arguments as `member`, but the lifted class needs them as keywords here.
      return stacked(
        self.arch,
        self.num_classes,
        self.shared_stages,
        self.embed_dim,
        self.dtype,
        train,
        self.head,
        self.head_norm,
        name="members",
      )(h)
    return self._apply_stacked(member(parent=None), h, train, strategy)

  def _apply_stacked(
    self, member: _Member, h: Array, train: bool, strategy: str
  ) -> dict[str, Array]:
    """unroll / map: run the unbound `member` on each slice of the stacked variables."""
    variables: dict[str, Any] = {"params": self.get_variable("params", "members")}
    stats: Any = self.get_variable("batch_stats", "members")
    if stats is not None:
      variables["batch_stats"] = stats
    update = train and stats is not None

    def run(v: Mapping[str, Any]):
      if update:
        out, new = member.apply(v, h, mutable=["batch_stats"])
        return out, new["batch_stats"]
      return member.apply(v, h), None

    if strategy == "unroll":
      per_member = [
        run(jax.tree.map(lambda a, m=m: a[m], variables)) for m in range(self.num_members)
      ]
      out, new_stats = jax.tree.map(lambda *a: jnp.stack(a), *per_member)
    else:  # map
      out, new_stats = jax.lax.map(run, variables)
    if update:
      self.put_variable("batch_stats", "members", new_stats)
    return out


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays or jax.ShapeDtypeStructs."""
  return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(tree)))


def count_cohort_params(variables: Mapping[str, Any], heads: bool = False) -> int:
  """Cohort parameter count: trunk + every member's backbone and classifier.

  The projection heads are left out unless `heads` (docs/SPEC.md 1 counts backbone + classifier).
  Accepts the variables dict or its 'params' entry, arrays or eval_shape structs.
  """
  params = variables.get("params", variables)
  total = count_params(params)
  if not heads:
    total -= count_params(params["members"].get("head", {}))
  return total
