"""One reproduction run: train (or resume) a suite row at one seed, evaluate it, and write
its result.json (`suites.RESULT_FILE` in `suites.run_dir`).

The result holds the row, variant, seed, regime (`trainer`), member count, steps, the last
logged training metrics and the run's first collapse (`collapsed`: `loop.fit`'s summary,
None when there was none), then:
- supervised rows (`eval`): every member's and the ensemble's top-1/top-5 on the test split
  and on the held-out validation split;
- self-supervised rows (`Regime.self_supervised`): each member's kNN top-1 (k = 20 and
  200, `knn`); each member exported (`mcl_jax.export`) and probed on the frozen backbone
  twice: the suite's `probe` variant (SGD, as the official main_lincls.py; `probe`) and a
  logistic regression on the features with its L2 strength chosen on the validation split
  (`mcl_jax.logreg_probe`; `logreg_probe`), each with its test and validation top-1; and
  few-shot accuracy on the row's held-out classes when it names them (`fewshot`);
and the run's wall time (`wall_s`). Accuracies are split-first, as the tasks' evaluations
and the TensorBoard tags: `eval` {split: {'top1': [M + 1], 'top5': [M + 1]}}; `knn`
{split: {'knn_top1': [M], 'knn_top1_k20': [M]}}; `probe` {split: {'top1': [M],
'top5': [M]}}; `logreg_probe` {split: {'top1': [M]}, 'c': [M]} (each member's chosen C);
split in 'test' and, when the row holds one out, 'validation'.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from mcl_jax import regimes
from mcl_jax import suites
from mcl_jax.suites import Row


def _to_json(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _to_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_json(v) for v in x]
  if isinstance(x, (np.ndarray, np.generic)) or hasattr(x, "tolist"):
    return np.asarray(x).tolist()
  return x


def train_one(config_module: Any, row: Row, seed: int, workdir: str, smoke: bool) -> dict[str, Any]:
  """Trains (or resumes) one run and writes its result.json; returns the result."""
  from mcl_jax import jobs

  directory = suites.run_dir(workdir, row, seed)
  config = suites.row_config(config_module, row, seed, smoke)
  t0 = time.time()
  summary = jobs.run(config, directory)
  if summary["preempted"]:
    raise RuntimeError(f"{row.name} seed {seed} was preempted; rerun to resume it.")
  result = {
    "row": row.name,
    "variant": row.variant,
    "seed": seed,
    "trainer": config.trainer,
    "members": int(config.cohort.num_members),
    "steps": summary["steps"],
    "train": summary["train"],
    "collapsed": summary["collapsed"],
  }
  if regimes.get(config.trainer).self_supervised:
    result["knn"] = summary["eval"]
    result["probe"] = probe_members(config_module, row, seed, directory, smoke)
    if config.input.validation_size:
      result["logreg_probe"] = logreg_members(config, directory)
    if row.fewshot:
      result["fewshot"] = fewshot_members(row, directory, smoke)
  else:
    result["eval"] = summary["eval"]
  result["wall_s"] = time.time() - t0
  with open(os.path.join(directory, suites.RESULT_FILE), "w") as f:
    json.dump(_to_json(result), f, indent=1)
  return result


def probe_members(
  config_module: Any, row: Row, seed: int, directory: str, smoke: bool
) -> dict[str, dict[str, list[float]]]:
  """Exports each member of a self-supervised run and trains the suite's linear probe on it.

  Returns {split: {'top1': [M], 'top5': [M]}}: each member's probe accuracy on 'test'
  and (when held out) 'validation' (`lincls.LinclsTask.evaluate`'s splits and metrics).
  """
  from mcl_jax import export
  from mcl_jax import jobs

  _, _, meta = export.read_checkpoint(directory)
  probes: dict[str, dict[str, list[float]]] = {}
  for member in range(int(meta["num_members"])):
    out = os.path.join(directory, f"member{member}")
    export.export_member(directory, member, out)
    config = suites.row_config(config_module, row, seed, smoke, variant="probe")
    config.lincls.pretrained = out
    result = jobs.run(config, os.path.join(directory, f"probe{member}"))
    for split, split_metrics in result["eval"].items():
      for key, value in split_metrics.items():
        probes.setdefault(split, {}).setdefault(key, []).append(float(value))
  return probes


def logreg_members(config: Any, directory: str) -> dict[str, Any]:
  """The logistic-regression probe (mcl_jax.logreg_probe) of each exported member on the
  run's own labelled images: {'test': {'top1': [M]}, 'validation': {'top1': [M]},
  'c': [M]} (each member's C, chosen on validation)."""
  from mcl_jax import export
  from mcl_jax import logreg_probe

  _, _, meta = export.read_checkpoint(directory)
  out: dict[str, Any] = {"test": {"top1": []}, "validation": {"top1": []}, "c": []}
  for member in range(int(meta["num_members"])):
    result = logreg_probe.evaluate(
      os.path.join(directory, f"member{member}"),
      classes=tuple(config.input.classes),
      validation_size=int(config.input.validation_size),
      train_subset=int(config.input.train_subset),
    )
    for split in ("test", "validation"):
      out[split]["top1"].append(result[split]["top1"])
    out["c"].append(result["c"])
  return out


def fewshot_members(row: Row, directory: str, smoke: bool) -> dict[str, list[float]]:
  """Few-shot accuracy (mcl_jax.fewshot) of each exported member on the row's held-out
  classes: {'<classifier>_<K>shot': [M] mean accuracies} (the exports of probe_members)."""
  from mcl_jax import export
  from mcl_jax import fewshot

  _, _, meta = export.read_checkpoint(directory)
  out: dict[str, list[float]] = {}
  for member in range(int(meta["num_members"])):
    result = fewshot.evaluate(
      os.path.join(directory, f"member{member}"), classes=row.fewshot, episodes=20 if smoke else 600
    )
    for key, value in result.items():
      out.setdefault(key, []).append(value["mean"])
  return out
