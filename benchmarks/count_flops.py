r"""Fill in the model FLOPs (and MFU) that a backend left out of `mcl_jax.bench` records.

  python benchmarks/count_flops.py IN.jsonl OUT.jsonl

XLA:GPU counted nothing for the unoptimised step (jax 0.11 on an H200), so records made
there before `bench.model_flops` learnt to count on the host's CPU have model_flops and
mfu empty. The count is of the program, not of the chip: this counts each such record's
setting on one CPU device the same way (the `unroll` step before optimisation) and sets
mfu = model_flops / step time / (the record's own peak x its devices). Records that have
a count are copied unchanged; filled ones get "model_flops_basis": "host CPU count".
"""

from __future__ import annotations

import dataclasses
import json
import sys

import _common  # benchmarks/_common.py (this folder is on sys.path when run as a script)


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise SystemExit(__doc__.strip().splitlines()[2].strip())
  _common.request_cpu_devices(1)
  import jax

  from mcl_jax import bench
  from mcl_jax import sharding as sharding_lib

  mesh = sharding_lib.make_mesh(jax.devices("cpu")[:1])
  fields = [f.name for f in dataclasses.fields(bench.Setting)]
  with open(argv[0]) as f:
    records = [json.loads(line) for line in f if line.strip()]
  counted: dict[tuple, float | None] = {}
  for r in records:
    if r.get("model_flops") is None:
      s = bench.Setting(**{k: r[k] for k in fields})
      key = dataclasses.astuple(dataclasses.replace(s, strategy="unroll"))
      if key not in counted:  # the count is strategy-independent (the unroll program)
        counted[key] = bench.model_flops(s, mesh)
        print(f"{key}: {counted[key]:.4g} FLOPs", flush=True)
      r["model_flops"] = counted[key]
      r["model_flops_basis"] = "host CPU count"
      if r.get("peak_tflops"):
        r["achieved_tflops"] = r["model_flops"] / r["step_s_median"] / 1e12
        r["mfu"] = r["achieved_tflops"] / (r["peak_tflops"] * r["num_devices"])
  with open(argv[1], "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main(sys.argv[1:])
