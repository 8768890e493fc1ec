"""Per-device memory of the train state of an experiment at full size, from shapes only.

  .venv/bin/python benchmarks/state_memory.py --config=imagenet_r18_x3 --devices=16

Nothing is allocated: the state is built with `jax.eval_shape` (the trainer's own init),
placed with the trainer's own shardings on a mesh of `--devices` fake CPU devices, and each
leaf's per-device bytes are read off `sharding.shard_shape`. `--devices=16` is a v4-32 pod
slice (16 chips, one JAX device each). `--train_examples` defaults to ImageNet-1k's
1,281,167 (the bank's rows). Also printed: the replicated class-index table of the bank
and the per-step working set of the sampled rows and of their similarities (see
memory_bank.gather_similarities), which are not state but are the largest bank-related
buffers of a step.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

import _common  # benchmarks/_common.py (this folder is on sys.path when run as a script)

flags.DEFINE_integer("devices", 16, "Devices on the mesh (v4-32: 16).")
flags.DEFINE_integer("train_examples", 1_281_167, "Training examples N (the bank's rows).")
flags.DEFINE_string("config", "imagenet_r18_x3", "Experiment config file[:arg].")
FLAGS = flags.FLAGS

MiB = 2**20


def _tree_bytes(tree, shardings) -> tuple[int, int]:
  """(global bytes, bytes on one device) of an abstract tree placed with `shardings`."""
  import jax
  import numpy as np

  total = per_device = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    itemsize = np.dtype(leaf.dtype).itemsize
    total += int(np.prod(leaf.shape)) * itemsize
    per_device += int(np.prod(sharding.shard_shape(leaf.shape))) * itemsize
  return total, per_device


def main(argv):
  del argv
  _common.request_cpu_devices(FLAGS.devices)
  import importlib

  import jax

  from mcl_jax import optim
  from mcl_jax import sharding as sharding_lib
  from mcl_jax import train_state

  path, _, arg = FLAGS.config.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  config = importlib.import_module(f"mcl_jax.configs.{name}").get_config(arg or None)
  mesh = sharding_lib.make_mesh(jax.devices()[: FLAGS.devices])
  n = FLAGS.train_examples
  num_classes = config.model.num_classes
  batch = config.input.global_batch_size
  model = train_state.build_model(config, num_classes)
  tx, _ = optim.make_optimizer(config, steps_per_epoch=n // batch)
  image_shape = (config.input.image_size, config.input.image_size, 3)
  bank_rows = n if config.loss.regime == "bank" else 0
  state = train_state.abstract_train_state(
    model, tx, image_shape, mesh, bank_rows=bank_rows, bank_dtype=config.bank.dtype
  )
  shardings = train_state.state_shardings(state, mesh)

  print(
    f"{path}{':' + arg if arg else ''}: M={model.num_members} arch={config.model.arch} "
    f"N={n} d={model.embed_dim} K={config.bank.num_negatives} B={batch} on "
    f"{mesh.size} devices"
  )
  rows = [
    ("params", state.params, shardings.params),
    ("batch_stats", state.batch_stats, shardings.batch_stats),
    ("opt_state", state.opt_state, shardings.opt_state),
    ("bank", state.bank, shardings.bank),
  ]
  total_global = total_device = 0
  print(f"{'part':<12} {'global MiB':>12} {'per device MiB':>15}  placement")
  for name, tree, tree_shardings in rows:
    if tree is None:
      continue
    g, d = _tree_bytes(tree, tree_shardings)
    total_global += g
    total_device += d
    placement = "rows split over devices" if name == "bank" else "replicated"
    print(f"{name:<12} {g / MiB:12.1f} {d / MiB:15.1f}  {placement}")
  print(f"{'state':<12} {total_global / MiB:12.1f} {total_device / MiB:15.1f}")
  if bank_rows:
    table = (n + 2 * num_classes) * 4  # sorted_idx [N] + class_start, class_count [C], int32
    print(f"class table (replicated, int32): {table / MiB:.1f} MiB per device")
    candidates = 1 + config.bank.num_positives + config.bank.num_negatives
    m = model.num_members
    rows = m * batch * candidates * model.embed_dim * 4
    sims = m * m * batch * candidates * 4
    print(
      f"per step, rows of the global batch's samples [M, B, 1+P+K, d] f32 taken from "
      f"each device's shard (zeros where not held): {rows / MiB:.1f} MiB per device, "
      "transient (rematerialised for the backward pass)"
    )
    print(
      f"per step, similarities [M, M, B, 1+P+K] f32 reduce-scattered over devices: "
      f"{sims / MiB:.1f} MiB per device before, {sims / mesh.size / MiB:.1f} MiB after "
      f"(moving the rows instead would be {rows / MiB:.1f} MiB)"
    )


if __name__ == "__main__":
  app.run(main)
