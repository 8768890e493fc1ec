r"""What is bit-exact and what is not: the same training run repeated, and on other device
counts.

  .venv/bin/python benchmarks/determinism.py [--steps=20] [--arch=tiny] [--image_size=16]

Trains MCL x2 (CIFAR recipe, synthetic data, in-memory, class-aware batches of 64) for
`--steps` steps: twice on 8 devices, then on 4, 2 and 1 (fake CPU devices here; the real
devices on an accelerator, where `--devices` lists the counts to try). Prints, against the
first 8-device run, whether every parameter, BN statistic and optimizer slot is bit for
bit the same, and otherwise the largest absolute difference, plus the last step's loss.
docs/RELIABILITY.md quotes the output (benchmarks/results/determinism_cpu.txt).
"""

from __future__ import annotations

from absl import app
from absl import flags

import _common  # benchmarks/_common.py (this folder is on sys.path when run as a script)

flags.DEFINE_integer("steps", 20, "Training steps per run.")
flags.DEFINE_string("arch", "tiny", "Architecture (tiny: the test network).")
flags.DEFINE_integer("image_size", 16, "Synthetic image side.")
flags.DEFINE_list(
  "devices", ["8", "8", "4", "2", "1"], "Device counts, one run each; the first is the reference."
)
FLAGS = flags.FLAGS


def run(num_devices: int):
  import jax

  from mcl_jax import jobs
  from mcl_jax import sharding
  from mcl_jax.configs import cifar100_common
  from mcl_jax.configs import common

  c = common.smoke(cifar100_common.set_variant(cifar100_common.base(FLAGS.arch), "mcl_x2"))
  c.input.image_size = FLAGS.image_size
  c.input.synthetic_train_size = 64 * FLAGS.steps
  c.input.global_batch_size = 64
  c.input.samples_per_class = 8  # 8 of the 10 synthetic classes x 8
  c.schedule.num_train_steps = FLAGS.steps
  mesh = sharding.make_mesh(jax.devices()[:num_devices])
  job = jobs.build(c, "/tmp/mcl_determinism_unused", mesh=mesh)
  history = job.train_steps()
  state = jax.device_get(job.state)
  return (state.params, state.batch_stats, state.opt_state), float(history[-1]["loss"])


def main(argv):
  del argv
  counts = [int(n) for n in FLAGS.devices]
  _common.request_cpu_devices(max(counts))
  import jax
  import numpy as np

  print(
    f"# {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), jax "
    f"{jax.__version__}, {FLAGS.arch} x2 MCL, {FLAGS.steps} steps of 64 at "
    f"{FLAGS.image_size} px"
  )
  reference, ref_loss = run(counts[0])
  print(f"run 1: {counts[0]} devices, final loss {ref_loss:.9f} (reference)")
  for i, n in enumerate(counts[1:], start=2):
    tree, loss = run(n)
    diffs = [
      float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
      if np.size(a)
      else 0.0
      for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(tree))
    ]
    exact = all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(tree))
    )
    verdict = "bit for bit equal" if exact else f"max |diff| {max(diffs):.3g}"
    print(
      f"run {i}: {n} devices, final loss {loss:.9f} (diff {loss - ref_loss:+.3g}); "
      f"params, BN statistics, optimizer state: {verdict}"
    )


if __name__ == "__main__":
  app.run(main)
