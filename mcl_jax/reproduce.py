r"""`mcl-reproduce`: train a suite's rows over seeds, then write a results table and plot.

  python -m mcl_jax.reproduce --suite=fashion_mnist --seeds=0,1,2 --workdir=runs/fm \
      --rows=baseline,mcl_x2 --workers=2

A suite (`mcl_jax/suites/<suite>.py`, read by `mcl_jax.suites`) lists rows (a config
variant with optional overrides, the table it belongs to) and tables. For every chosen row
and seed the runner trains the row's config with `config.seed = seed` in
`WORKDIR/<variant>[__overrides]/seed<k>/` (rows of the same config share it) and writes
`result.json` there when the run and its evaluation are complete (`reproduce_eval`: test
and validation top-1 of supervised rows; kNN, the linear probes and few-shot accuracy of
self-supervised ones). The runner is resumable: a finished run is skipped, an interrupted
one resumes from its newest checkpoint. At the end (and with `--report_only`) it reads
every chosen run's `result.json` and writes `WORKDIR/results.md` and `WORKDIR/results.png`
(`reproduce_report`: each member, the members' mean +- std over seeds, the best member,
the ensemble or the probes, the paired difference of each row from its table's reference,
collapsed runs marked).

`--workers=N` runs N trainings at once as subprocesses, each pinned to its own share of the
CPU cores and writing its log to `log.txt` in its run folder (`reproduce_schedule`);
`--workers=0` trains in this process. `--smoke` runs the rows' smoke configs (a few steps
of a tiny network). The scheduler starts each child as this command with `--run_one`.
"""

from __future__ import annotations

from collections.abc import Sequence
import os

from absl import app
from absl import flags

# `load_suite`, `select_rows`, `run_all` and `write_report` are also this module's names
# for the callers that drive the runner as a library (mcl_jax/demo.py).
from mcl_jax import errors
from mcl_jax.reproduce_eval import train_one
from mcl_jax.reproduce_report import write_report
from mcl_jax.reproduce_schedule import run_all
from mcl_jax.suites import load_suite
from mcl_jax.suites import select_rows

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Command-line flags, defined only when this module is the program (the demo and the
  tests import it as a library and define their own)."""
  flags.DEFINE_string("suite", "fashion_mnist", "Suite in mcl_jax/suites/ (its rows and tables).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; every row trains once per seed.")
  flags.DEFINE_string("workdir", None, "Where the runs, results.md and results.png go.")
  flags.DEFINE_list("rows", [], "Rows to train and report (default: every row of the suite).")
  flags.DEFINE_integer(
    "workers", 1, "Trainings at once (subprocesses, cores split between them); 0: in this process."
  )
  flags.DEFINE_bool("smoke", False, "The rows' smoke configs: seconds per run, for tests.")
  flags.DEFINE_bool("report_only", False, "Only write results.md / results.png from what exists.")
  flags.DEFINE_string("run_one", None, "Internal: 'row:seed', train that run in this process.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {' '.join(argv[1:])}; use --flag=value.")
  from mcl_jax import loop

  loop.quiet_library_logs()
  if not FLAGS.workdir:
    errors.exit_with("--workdir is required: the folder for the runs and the results.")
  try:
    config_module, rows, tables = load_suite(FLAGS.suite)
    seeds = [int(s) for s in FLAGS.seeds]
    if FLAGS.run_one:
      name, seed = FLAGS.run_one.rsplit(":", 1)
      train_one(config_module, select_rows(rows, [name])[0], int(seed), FLAGS.workdir, FLAGS.smoke)
      return
    chosen = select_rows(rows, FLAGS.rows)
    if not FLAGS.report_only:
      run_all(FLAGS.suite, chosen, seeds, FLAGS.workdir, workers=FLAGS.workers, smoke=FLAGS.smoke)
    text = write_report(FLAGS.suite, chosen, tables, seeds, FLAGS.workdir)
  except (ValueError, RuntimeError, FileNotFoundError) as e:
    errors.exit_with(str(e))
  if text is None:
    errors.exit_with(f"No finished run in {FLAGS.workdir} yet.")
  print("\n" + text)
  print(f"Wrote {os.path.join(FLAGS.workdir, 'results.md')} and results.png.")


def run_cli() -> None:
  """The `mcl-reproduce` command."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run_cli()
