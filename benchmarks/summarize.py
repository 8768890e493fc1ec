"""Markdown tables and the README's two ratios from `python -m mcl_jax.bench` JSON lines.

  .venv/bin/python benchmarks/summarize.py benchmarks/results/cpu_*.jsonl

Several records of one configuration (repeated runs appended to the same file) are
reduced to the one with the smallest median step time: on a shared machine the other
users' load only ever adds time, so the fastest repeat is the least disturbed one. The
table says how many repeats each row had.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcl_jax import bench  # noqa: E402  (no TensorFlow, no device work at import)

CONFIG_KEYS = ("arch", "members", "strategy", "mcl", "dtype", "batch", "image_size",
               "shared_stages", "device_kind", "num_devices")


def load(paths: list[str]) -> list[dict]:
  records = []
  for path in paths:
    with open(path) as f:
      records += [json.loads(line) for line in f if line.strip()]
  return records


def best_of_repeats(records: list[dict]) -> list[dict]:
  groups: dict[tuple, list[dict]] = {}
  for r in records:
    groups.setdefault(tuple(r.get(k) for k in CONFIG_KEYS), []).append(r)
  out = []
  for group in groups.values():
    best = dict(min(group, key=lambda r: r["step_s_median"]))
    best["repeats"] = len(group)
    best["all_medians_s"] = [r["step_s_median"] for r in group]
    out.append(best)
  return out


def markdown(records: list[dict]) -> str:
  lines = ["| arch | M | strategy | MCL | B | image | compile s | step ms median (p10-p90) "
           "| host CPU ms/step | member-img/s | GFLOP/step | MFU | load avg (1 min) | repeats |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    strategy = r["strategy"] + (" (auto)" if r["auto"] and r["members"] > 1 else "")
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    load = f"{r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f}"
    lines.append(
        f"| {r['arch']} | {r['members']} | {strategy} | {'on' if r['mcl'] else 'off'} "
        f"| {r['batch']} | {r['image_size']} | {r['compile_s']:.1f} "
        f"| {1e3 * r['step_s_median']:.0f} ({1e3 * r['step_s_p10']:.0f}-"
        f"{1e3 * r['step_s_p90']:.0f}) | {1e3 * r['cpu_s_median']:.0f} "
        f"| {r['member_images_per_s']:.1f} | {r['model_flops'] / 1e9:.1f} | {mfu} | {load} "
        f"| {r['repeats']} |")
  return "\n".join(lines)


def main(paths: list[str]) -> None:
  records = best_of_repeats(load(paths))
  records.sort(key=lambda r: (r["arch"], r["members"], r["strategy"], r["mcl"]))
  print(markdown(records))
  print()
  for line in bench.ratios(records):
    print(f"- {line}")


if __name__ == "__main__":
  main(sys.argv[1:])
