r"""How the memory bank's layout and the gather's rematerialisation change what XLA:TPU makes
of the bank's step: the bank's part of imagenet_r18_x3 alone (M = 3 members, N = 1,281,168
rows of d = 128, float32, replicated; a global batch of 256 with 1 + 1 + 8,192 candidates
each; the similarities' gradient and the momentum update), compiled for v5e:2x2 with
`mcl_jax.plan`'s compile-only devices. Needs libtpu (`pip install "jax[tpu]==0.10.2"`).

  .venv/bin/python benchmarks/tpu_bank_layouts.py > out.txt

Forms compared (same values, different programs):
  library         memory_bank.gather_similarities_replicated + update_replicated, [M, N, d]
  rematerialised  the same gather wrapped in jax.checkpoint (what the library did before)
  rows_first      the bank stored [N, M, d]
  flat            the bank stored [N, M * d]
"""

import re
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from mcl_jax import memory_bank
from mcl_jax import plan

M, N, D, BATCH, CANDIDATES, TAU, MOMENTUM = 3, 1281168, 128, 256, 8194, 0.1, 0.5
TOPOLOGY = "v5e:2x2"


def normalized(rows):
  return rows / jnp.maximum(jnp.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


def member_major(mesh, remat):
  def gather(bank, idx, z):
    read = lambda b, i, z: memory_bank.gather_similarities_replicated(b, i, z, mesh)  # noqa: E731
    return (jax.checkpoint(read) if remat else read)(bank, idx, z)

  def update(bank, own, z):
    return memory_bank.update_replicated(bank, own, z, MOMENTUM, mesh)

  return (M, N, D), gather, update


def rows_first(mesh, flat):
  shape = (N, M * D) if flat else (N, M, D)

  def local_sims(bank, idx, z):  # this device's examples: idx [b, C], z [M, b, d]
    rows = jnp.take(bank, idx, axis=0).reshape(*idx.shape, M, D)  # [b, C, M, d]
    return jnp.einsum("ikad,bid->abik", rows, z, precision=jax.lax.Precision.HIGHEST)

  def gather(bank, idx, z):
    return jax.shard_map(
      local_sims,
      mesh=mesh,
      in_specs=(P(), P("data"), P(None, "data")),
      out_specs=P(None, None, "data"),
    )(jax.lax.stop_gradient(bank), idx, z)

  def local_update(bank, own, z):
    old = jnp.take(bank, own, axis=0).reshape(-1, M, D)
    new = normalized(MOMENTUM * old + (1 - MOMENTUM) * jnp.swapaxes(z, 0, 1))
    return bank.at[own].set(new.reshape(-1, *shape[1:]))

  def update(bank, own, z):
    return jax.shard_map(local_update, mesh=mesh, in_specs=(P(), P(), P()), out_specs=P())(
      bank, own, jax.lax.stop_gradient(z)
    )

  return shape, gather, update


def compile_form(name, mesh):
  shape, gather, update = {
    "library": lambda: member_major(mesh, remat=False),
    "rematerialised": lambda: member_major(mesh, remat=True),
    "rows_first": lambda: rows_first(mesh, flat=False),
    "flat": lambda: rows_first(mesh, flat=True),
  }[name]()

  def step(bank, idx, z):
    loss = lambda z: jnp.sum(jax.nn.logsumexp(gather(bank, idx, z) / TAU, axis=-1))  # noqa: E731
    value, grad = jax.value_and_grad(loss)(z)
    return value, grad, update(bank, idx[:, 0], z)

  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
  args = (
    jax.ShapeDtypeStruct(shape, jnp.float32, sharding=replicated),
    jax.ShapeDtypeStruct((BATCH, CANDIDATES), jnp.int32, sharding=NamedSharding(mesh, P("data"))),
    jax.ShapeDtypeStruct((M, BATCH, D), jnp.float32, sharding=split),
  )
  start = time.perf_counter()
  with plan.no_persistent_cache():
    jitted = jax.jit(step, donate_argnums=0, out_shardings=(replicated, split, replicated))
    compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  hlo = compiled.as_text()
  dims = ",".join(map(str, shape))
  copies = [
    line.split("=")[0].strip()
    for line in hlo.splitlines()
    if re.search(rf"= f32\[{dims}\]\S* copy(-start)?\(", line)
  ]
  return {
    "form": name,
    "bank": f"f32[{dims}]",
    "bytes_accessed_per_chip_gb": round(cost["bytes accessed"] / 1e9, 2),
    "temporaries_gib": round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 2),
    "whole_bank_copies": len(copies),
    "compile_s": round(seconds, 1),
  }


def main():
  mesh = Mesh(np.array(plan.topology_devices(TOPOLOGY)), ("data",))
  forms = sys.argv[1:] or ["library", "rematerialised", "rows_first", "flat"]
  print(
    f"bank step alone on {TOPOLOGY}: M={M}, N={N}, d={D}, batch {BATCH}, {CANDIDATES} candidates"
  )
  for name in forms:
    print(compile_form(name, mesh), flush=True)


if __name__ == "__main__":
  main()
