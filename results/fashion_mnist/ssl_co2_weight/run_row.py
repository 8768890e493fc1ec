"""One fashion_mnist suite row with extra config overrides, trained and evaluated exactly as
`mcl-reproduce --run_one=ROW:SEED` does (reproduce_eval.train_one: training, the kNN
monitor, the linear and LR probes, few-shot episodes; result.json in the run folder).
mcl-reproduce has no flag for overrides beyond a row's own, hence this script.

  .venv/bin/python results/fashion_mnist/ssl_co2_weight/run_row.py ROW SEED WORKDIR \
      field=value ...
"""

import ast
import dataclasses

from absl import app

from mcl_jax import loop
from mcl_jax import reproduce_eval
from mcl_jax.suites import load_suite
from mcl_jax.suites import select_rows


def main(argv):
  name, seed, workdir, *pairs = argv[1:]
  loop.quiet_library_logs()
  module, rows, _ = load_suite("fashion_mnist")
  row = select_rows(rows, [name])[0]
  extra = {k: ast.literal_eval(v) for k, v in (p.split("=", 1) for p in pairs)}
  row = dataclasses.replace(row, overrides={**dict(row.overrides), **extra})
  print(row, flush=True)
  reproduce_eval.train_one(module, row, int(seed), workdir, False)


app.run(main)
