r"""The memory bank's per-step cost on the CPU: sampling, the sharded similarities (with
their gradient) and the update, and the transient memory of the gather per chunk size.

  .venv/bin/python benchmarks/bank.py [--devices=8] [--rows=1281167] [--batch=32] \
      [--negatives=8192] [--chunks=0,4096,1024,256]

The ImageNet bank of imagenet_r18_x3 (M = 3, d = 128, N = 1,281,167 rows, 1 positive and
K = 8,192 negatives per example) split over `--devices` fake CPU devices, with a global
batch small enough for a CPU (the per-device transient grows linearly with the global
batch B). For each chunk size of `memory_bank.gather_similarities`: XLA's temporary
memory per device (memory_analysis) of the jitted sample + similarities + gradient +
update, and the median wall time of that program. docs/IMAGENET.md quotes the output
(benchmarks/results/bank_cpu.txt).
"""

from __future__ import annotations

import time

from absl import app
from absl import flags

import _common  # benchmarks/_common.py (this folder is on sys.path when run as a script)

flags.DEFINE_integer("devices", 8, "Fake CPU devices (the bank is split over them).")
flags.DEFINE_integer("rows", 1_281_167, "Bank rows N (ImageNet's training set).")
flags.DEFINE_integer("members", 3, "Cohort size M.")
flags.DEFINE_integer("dim", 128, "Embedding width d.")
flags.DEFINE_integer("batch", 32, "Global batch B.")
flags.DEFINE_integer("negatives", 8192, "Negatives K per example.")
flags.DEFINE_integer("classes", 1000, "Classes.")
flags.DEFINE_list("chunks", ["0", "4096", "1024", "256"], "gather_chunk values to compare.")
flags.DEFINE_integer("repeats", 5, "Timed calls per chunk size.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  _common.request_cpu_devices(FLAGS.devices)
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  from mcl_jax import losses
  from mcl_jax import memory_bank
  from mcl_jax import sharding

  mesh = sharding.make_mesh(jax.devices()[: FLAGS.devices])
  m, n, d, b, k = FLAGS.members, FLAGS.rows, FLAGS.dim, FLAGS.batch, FLAGS.negatives
  padded = -(-n // mesh.size) * mesh.size
  rng = np.random.default_rng(0)
  labels_all = rng.integers(0, FLAGS.classes, n)
  table = memory_bank.class_index_table(labels_all, FLAGS.classes)
  replicated = sharding.replicated(mesh)
  table = {key: jax.device_put(v, replicated) for key, v in table.items()}
  bank = jax.jit(
    lambda key: jnp.pad(memory_bank.init(key, m, n, d), ((0, 0), (0, padded - n), (0, 0))),
    out_shardings=memory_bank.bank_sharding(mesh),
  )(jax.random.PRNGKey(0))
  own = jnp.asarray(rng.permutation(n)[:b], jnp.int32)
  labels = jnp.asarray(labels_all[np.asarray(own)], jnp.int32)
  z = jnp.asarray(rng.normal(size=(m, b, d)), jnp.float32)
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  print(
    f"# M={m} N={n} d={d} B={b} 1+P+K={2 + k} on {mesh.size} CPU devices; bank "
    f"{m * padded * d * 4 / 2**30:.2f} GiB, {m * padded * d * 4 / mesh.size / 2**20:.0f} "
    f"MiB per device; jax {jax.__version__}",
    flush=True,
  )

  def step(bank, z, key, chunk):
    pos, neg = memory_bank.sample_indices(key, labels, own, table, num_positives=1, num_negatives=k)
    idx = jnp.concatenate([pos, neg], axis=1)

    def loss(z):
      sims = memory_bank.gather_similarities(bank, idx, z, mesh, chunk_size=chunk)
      terms = losses.bank_mcl_from_similarities(sims, num_positives=1, tau=0.07, kd_temperature=3.0)
      return sum(terms.values())

    value, grad = jax.value_and_grad(loss)(z)
    return memory_bank.update_sharded(bank, own, z, 0.5, mesh), value, grad

  print(
    "| gather_chunk | transient rows per device (formula) | XLA temp per device | "
    "ms per call (median) |\n|---|---|---|---|"
  )
  for chunk in (int(c) for c in FLAGS.chunks):
    fn = jax.jit(functools.partial(step, chunk=chunk))
    compiled = fn.lower(bank, z, jax.random.PRNGKey(1)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    rows = m * b * (min(chunk, k + 2) if chunk else k + 2) * d * 4
    out = compiled(bank, z, jax.random.PRNGKey(1))
    jax.block_until_ready(out)
    times = []
    for i in range(FLAGS.repeats):
      t = time.perf_counter()
      jax.block_until_ready(compiled(bank, z, jax.random.PRNGKey(2 + i)))
      times.append(time.perf_counter() - t)
    print(
      f"| {chunk or 'all'} | {rows / 2**20:.0f} MiB | {temp / 2**20:.0f} MiB | "
      f"{1e3 * np.median(times):.0f} |",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
