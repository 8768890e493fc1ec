r"""One CIFAR-shaped training epoch end to end, timed: the number to set against the
official code's 55 s per epoch of MCL x4 resnet32 on an RTX 3090.

  python benchmarks/epoch.py [--arch=resnet32] [--members=4] [--steps=390] \
      [--train_examples=50000] [--dtype=float32] [--json_out=FILE]

What runs is what `mcl-train --config=cifar100_resnet32:mcl_x4` runs, with the data made
up: 50,000 random 32x32x3 uint8 images with 100 balanced labels held on the device (as the
in-memory sources hold CIFAR), class-aware batches of 64 classes x 2 from the sampler, the
on-device crop + flip + normalise, the official shared trunk for M > 2, the four MCL terms,
SGD. The time covers `--steps` steps after the first (compile) step, with the host's
per-step work (index batches, global arrays) included, ended by a block on the state.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _common  # benchmarks/_common.py (this folder is on sys.path when run as a script)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", default="resnet32")
  parser.add_argument("--members", type=int, default=4)
  parser.add_argument(
    "--shared_stages",
    type=int,
    default=-1,
    help="-1: the config's (official: stem + first stage for M > 2)",
  )
  parser.add_argument("--steps", type=int, default=390)
  parser.add_argument("--train_examples", type=int, default=50000)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--strategy", default="auto")
  parser.add_argument("--json_out", default=None)
  parser.add_argument("--workdir", default="/tmp/mcl_epoch_bench")
  args = parser.parse_args(argv)

  import jax

  from mcl_jax import jobs
  from mcl_jax.configs import cifar100_common

  c = cifar100_common.set_variant(
    cifar100_common.base(args.arch), "mcl_x4" if args.members > 2 else "mcl_x2"
  )
  c.cohort.num_members = args.members
  if args.shared_stages >= 0:
    c.model.shared_stages = args.shared_stages
  c.model.dtype, c.model.strategy = args.dtype, args.strategy
  c.input.dataset = "synthetic"
  c.input.synthetic_train_size = args.train_examples
  c.input.synthetic_eval_size = args.batch
  c.input.synthetic_num_classes = 100
  c.input.image_size = args.image_size
  c.input.global_batch_size = args.batch
  run = jobs.build(c, args.workdir)
  batches = run.batches()
  t0 = time.perf_counter()
  run.step(next(batches)[1])
  jax.block_until_ready(run.state)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  done = 0
  for _, batch in batches:
    if done == args.steps:
      break
    run.step(batch)
    done += 1
  jax.block_until_ready(run.state)
  seconds = time.perf_counter() - t0
  device = jax.devices()[0]
  record = {
    "framework": "jax",
    "what": "epoch",
    "arch": args.arch,
    "members": args.members,
    "shared_stages": int(c.model.shared_stages),
    "batch": args.batch,
    "steps": done,
    "dtype": args.dtype,
    "strategy": args.strategy,
    "seconds": seconds,
    "seconds_per_390_steps": seconds * 390 / max(done, 1),
    "first_step_s": compile_s,
    "backend": device.platform,
    "device_kind": device.device_kind,
    "num_devices": jax.device_count(),
    "jax_version": jax.__version__,
  }
  print(
    f"epoch: {args.arch} x{args.members} B={args.batch} {args.dtype}: {done} steps in "
    f"{seconds:.2f} s ({record['seconds_per_390_steps']:.2f} s per 390-step epoch; "
    f"first step with compile {compile_s:.1f} s) on {device.device_kind}",
    flush=True,
  )
  _common.append_json_line(args.json_out, record)


if __name__ == "__main__":
  main()
