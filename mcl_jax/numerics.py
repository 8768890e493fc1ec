"""Numerical conventions shared by models, losses and metrics.

`at_least_float32`: reductions, softmaxes and losses run in float32 when the network
computes in bfloat16 (softmaxes at temperature 0.07 are too sharp for bfloat16), and stay
in float64 when it computes in float64 (under `jax.enable_x64`, e.g. the step-parity test
against the official code, tests/test_step_parity.py).
`l2_normalize`: PyTorch's F.normalize(x, dim=-1) = x / max(||x||, 1e-12), the one
definition behind the projection heads, MoCo's queues and keys and the kNN features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def accum_dtype(dtype) -> jnp.dtype:
  """float32 for bfloat16/float16/float32 inputs, float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def at_least_float32(x: Array) -> Array:
  return x.astype(accum_dtype(x.dtype))


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / max(||x||_2, eps) along the last axis, in at least float32 (zero rows stay zero)."""
  x = at_least_float32(x)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
