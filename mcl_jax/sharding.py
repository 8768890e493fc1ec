"""Meshes and shardings: data parallelism over every device of every host.

One mesh axis, `data`, spans all devices (all hosts in a multi-process run). Batches are
split along it; params, optimizer state and BN statistics are replicated; the memory bank
is split along its row axis or replicated, as `bank.layout` says (memory_bank.py). Global
arrays are built from each process's local share, so the same code runs on one CPU and on
a TPU pod.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


def make_mesh(devices: list[Any] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over devices."""
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local: Any, mesh: Mesh) -> Any:
  """Global arrays (split on the batch axis) from this process's local share of a batch."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local
  )


def process_slice(global_size: int) -> slice:
  """The contiguous slice of a global batch that this process feeds."""
  per_process = global_size // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def compile_step(
  step_fn: Callable[..., Any], state_shardings: Any, mesh: Mesh
) -> jax.stages.Wrapped:
  """jit of `step_fn(state, batch, consts) -> (state, metrics)` with its shardings.

  The state keeps `state_shardings` and is donated (updated in place), the batch is split
  over `data`, the constants (an in-memory training set, the bank's class table, frozen
  weights) and the metrics are replicated. Every trainer's step is compiled here.
  """
  return jax.jit(
    step_fn,
    in_shardings=(state_shardings, batch_sharded(mesh), replicated(mesh)),
    out_shardings=(state_shardings, replicated(mesh)),
    donate_argnums=(0,),
  )


def compile_embed(embed_fn: Callable[..., Any], mesh: Mesh) -> jax.stages.Wrapped:
  """jit of `embed_fn(params, batch_stats, images)` for the kNN monitor: the variables
  replicated, the images split over `data`, the features gathered (replicated)."""
  return jax.jit(
    embed_fn,
    in_shardings=(replicated(mesh), replicated(mesh), batch_sharded(mesh)),
    out_shardings=replicated(mesh),
  )
