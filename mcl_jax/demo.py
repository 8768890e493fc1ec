r"""`make demo`: MCL x2 against two independently trained networks on real images.

  python -m mcl_jax.demo [--workdir=workdirs/demo] [--seeds=0,1]

On Fashion-MNIST when it is installed (`apt-get install dataset-fashion-mnist`): the
`demo_baseline` and `demo_mcl_x2` rows of mcl_jax/suites/fashion_mnist.py (the suite's recipe,
shortened to 4 epochs so two seeds of both fit in about ten minutes on two cores, two
trainings at a time); otherwise on scikit-learn's handwritten digits
(mcl_jax/configs/digits.py, rows in mcl_jax/suites/digits.py), saying so. Both go through
the reproduction runner (`mcl_jax.reproduce`), so a second `make demo` only prints the
table, and the table is the runner's: every member, the members' mean +- std over the
seeds, the best member, the ensemble. The full-length comparison and what it shows are in
docs/RESULTS.md.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command's flags, defined when it runs (importing this module defines none)."""
  flags.DEFINE_string("workdir", "workdirs/demo", "Parent directory of the runs.")
  flags.DEFINE_list("seeds", ["0", "1"], "Seeds; each seed trains both rows.")
  flags.DEFINE_integer("workers", 2, "Trainings at once (see mcl_jax.reproduce).")
  flags.DEFINE_bool("smoke", False, "The rows' smoke configs (seconds; for tests).")


ROWS = ("demo_baseline", "demo_mcl_x2")


def suite() -> str:
  """'fashion_mnist' when its data is on this machine, else 'digits'."""
  from mcl_jax.data import fashion_mnist

  return "fashion_mnist" if fashion_mnist.has_idx_files(fashion_mnist.DEBIAN_DIR) else "digits"


def main(argv):
  del argv
  from mcl_jax import loop
  from mcl_jax import reproduce_report
  from mcl_jax import reproduce_schedule
  from mcl_jax import suites

  loop.quiet_library_logs()
  name = suite()
  if name == "digits":
    print(
      "Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); the demo "
      "runs on scikit-learn's 8x8 digits instead, where both sit near 99% and MCL shows "
      "no gain (docs/RESULTS.md).",
      flush=True,
    )
  _, rows, tables = suites.load_suite(name)
  chosen = suites.select_rows(rows, ROWS)
  seeds = [int(s) for s in FLAGS.seeds]
  workdir = os.path.join(FLAGS.workdir, name)
  try:
    reproduce_schedule.run_all(
      name, chosen, seeds, workdir, workers=FLAGS.workers, smoke=FLAGS.smoke
    )
  except RuntimeError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  text = reproduce_report.write_report(name, chosen, tables, seeds, workdir)
  if text is None:
    print(f"error: no finished run to report in {workdir}.", file=sys.stderr)
    sys.exit(1)
  print("\n" + text)
  print(f"Runs, logs, results.md and results.png: {workdir}")


def run_cli() -> None:
  """The `mcl-demo` command."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run_cli()
