"""Markdown tables and the README's ratios from `python -m mcl_jax.bench` JSON lines.

  python benchmarks/summarize.py benchmarks/results/cpu_*.jsonl \
      [--torch=torch.jsonl] [--epoch=epoch.jsonl]

`--torch` adds the PyTorch MCL step (benchmarks/torch_step.py) and the JAX / PyTorch
ratio of every setting both measured (same arch, members, batch, image size); `--epoch`
the end-to-end epochs of benchmarks/epoch.py.

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

CONFIG_KEYS = (
  "arch",
  "members",
  "strategy",
  "mcl",
  "dtype",
  "batch",
  "image_size",
  "shared_stages",
  "device_kind",
  "num_devices",
)


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
  lines = [
    "| arch | M | strategy | MCL | dtype | B | image | compile s | step ms median (p10-p90) "
    "| host CPU ms/step | member-img/s | GFLOP/step | MFU | load avg (1 min) | repeats |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in records:
    strategy = r["strategy"] + (" (auto)" if r["auto"] and r["members"] > 1 else "")
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    flops = "-" if r["model_flops"] is None else f"{r['model_flops'] / 1e9:.1f}"
    load = f"{r['loadavg_before'][0]:.1f} / {r['loadavg_after'][0]:.1f}"
    lines.append(
      f"| {r['arch']} | {r['members']} | {strategy} | {'on' if r['mcl'] else 'off'} "
      f"| {r['dtype']} "
      f"| {r['batch']} | {r['image_size']} | {r['compile_s']:.1f} "
      f"| {1e3 * r['step_s_median']:.0f} ({1e3 * r['step_s_p10']:.0f}-"
      f"{1e3 * r['step_s_p90']:.0f}) | {1e3 * r['cpu_s_median']:.0f} "
      f"| {r['member_images_per_s']:.1f} | {flops} | {mfu} | {load} "
      f"| {r['repeats']} |"
    )
  return "\n".join(lines)


def torch_table(jax_records: list[dict], torch_records: list[dict]) -> str:
  """The PyTorch steps, each beside the fastest JAX step of the same setting."""
  lines = [
    "| PyTorch code | M | B | image | dtype | channels_last | step ms | member-img/s "
    "| fastest JAX step ms (strategy, dtype) | JAX speed-up |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for t in torch_records:
    same = [
      r
      for r in jax_records
      if r["arch"] == t["arch"]
      and r["members"] == t["members"]
      and r["batch"] == t["batch"]
      and r["image_size"] == t["image_size"]
      and r["mcl"]
    ]
    best = min(same, key=lambda r: r["step_s_median"]) if same else None
    jax_cell = (
      "-"
      if best is None
      else (f"{1e3 * best['step_s_median']:.1f} ({best['strategy']}, {best['dtype']})")
    )
    ratio = "-" if best is None else f"{t['step_s_median'] / best['step_s_median']:.2f}x"
    lines.append(
      f"| {t['code']} | {t['members']} | {t['batch']} | {t['image_size']} "
      f"| {t['dtype']} | {t['channels_last']} | {1e3 * t['step_s_median']:.1f} "
      f"| {t['member_images_per_s']:.0f} | {jax_cell} | {ratio} |"
    )
  return "\n".join(lines)


def epoch_table(records: list[dict]) -> str:
  lines = [
    "| arch | M | dtype | steps | seconds | s per 390-step epoch | device |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in records:
    lines.append(
      f"| {r['arch']} | {r['members']} | {r['dtype']} | {r['steps']} "
      f"| {r['seconds']:.2f} | {r['seconds_per_390_steps']:.2f} | {r['device_kind']} |"
    )
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  paths = [a for a in argv if not a.startswith("--")]
  extra = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
  records = best_of_repeats(load(paths))
  records.sort(key=lambda r: (r["arch"], r["members"], r["strategy"], r["mcl"], r["dtype"]))
  print(markdown(records))
  print()
  for line in bench.ratios(records):
    print(f"- {line}")
  if extra.get("torch") and os.path.exists(extra["torch"]):
    print()
    print(torch_table(records, load([extra["torch"]])))
  if extra.get("epoch") and os.path.exists(extra["epoch"]):
    print()
    print(epoch_table(load([extra["epoch"]])))


if __name__ == "__main__":
  main(sys.argv[1:])
