r"""`make demo`: MCL x2 against independently trained networks on real handwritten digits.

  python -m mcl_jax.demo --workdir=workdirs/demo [--seeds=0,1,2] [--epochs=15]

Trains `configs/digits.py:baseline` (two networks, every MCL weight 0) and
`configs/digits.py:mcl_x2` with the same seeds through the normal trainer, then prints the
final-epoch top-1 of each member and of the ensemble side by side. Runs resume from their
workdirs, so a second `make demo` only prints the table.
"""
from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdirs/demo", "Parent directory of the runs.")
flags.DEFINE_list("seeds", ["0"], "Seeds; each seed trains both variants.")
flags.DEFINE_integer("epochs", None, "Override the config's number of epochs.")


def run_variant(variant: str, seed: int, workdir: str, epochs: int | None) -> dict:
  from configs import digits
  from mcl_jax import train
  config = digits.get_config(variant)
  config.seed = seed
  if epochs:
    config.schedule.epochs = epochs
  return train.train_and_evaluate(config, workdir)["eval"]


def summary_table(results: dict[str, list[dict]]) -> str:
  """Rows: variant; columns: mean +- std over seeds of each member and the ensemble."""
  lines = []
  for variant, runs in results.items():
    top1 = 100 * np.stack([r["top1"] for r in runs])  # [seeds, M + 1]
    members = top1[:, :-1]
    cells = [f"member {m}: {members[:, m].mean():.2f}" for m in range(members.shape[1])]
    cells.append(f"members' mean: {members.mean():.2f} +- {members.mean(axis=1).std():.2f}")
    cells.append(f"ensemble: {top1[:, -1].mean():.2f} +- {top1[:, -1].std():.2f}")
    lines.append(f"{variant:>9}  " + "  ".join(cells))
  return "\n".join(lines)


def main(argv):
  del argv
  from mcl_jax import config_lib, train
  config_lib.ensure_configs_importable()
  train.quiet_library_logs()  # our progress and results; Orbax's INFO lines drowned them
  results = {"baseline": [], "mcl_x2": []}
  for seed in map(int, FLAGS.seeds):
    for variant in results:
      workdir = os.path.join(FLAGS.workdir, f"{variant}_seed{seed}")
      logging.info("Training %s (seed %d) in %s", variant, seed, workdir)
      results[variant].append(run_variant(variant, seed, workdir, FLAGS.epochs))
  print(f"\nDigits test top-1 (%), final epoch, {len(FLAGS.seeds)} seed(s), 360 test images:")
  print(summary_table(results))


if __name__ == "__main__":
  app.run(main)
