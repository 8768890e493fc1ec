r"""Reproduction runner: train a suite's rows over seeds, then write a results table and plot.

  python -m mcl_jax.reproduce --suite=fashion_mnist --seeds=0,1,2 --workdir=runs/fm \
      --rows=baseline,mcl_x2 --workers=2

A suite is a config module `mcl_jax/configs/<suite>.py` with a `ROWS` list (name, config variant,
table, optional config overrides) and `TABLES` (table id -> title). For every row and seed
the runner trains `<suite>:<variant>` with `config.seed = seed` in
`WORKDIR/<variant>[__overrides]/seed<k>/` (rows of the same config share it) and writes
`result.json` there when the run is complete:
- supervised rows: every member's and the ensemble's top-1/top-5 on the test split and on
  the held-out validation split;
- self-supervised (MoCo, SimCLR) rows: each member's kNN top-1 (k = 20 and 200), then each
  member is exported (`mcl_jax.export`) and probed on the frozen backbone twice: the
  suite's `probe` variant (SGD, as the official main_lincls.py) and a logistic regression
  on the features with its L2 strength chosen on the validation split
  (`mcl_jax.logreg_probe`); each probe's test and validation top-1; few-shot accuracy on
  the row's held-out classes when it names them.
The runner is resumable: a finished run (its `result.json`) is skipped, an interrupted one
resumes from its newest checkpoint, and a finished self-supervised run without the
logistic-regression probe (one from before it existed) gets it from its exports. At the
end (and with `--report_only`) it reads every `result.json` and writes
`WORKDIR/results.md` (tables: each member, the members' mean +- std over seeds, the best
member, the ensemble; wall time) and `WORKDIR/results.png` (the same with seed error bars).
Each result records the run's first collapse (`collapsed`: `loop.fit`'s summary, or re-read
from the logged metrics of runs from before that, `collapse_from_logs`); a table's
`collapsed` column counts a row's collapsed runs, and every figure of such a row carries a
mark and a footnote, so it is never read as the method's.

`--workers=N` runs N trainings at once as subprocesses, each pinned to its own share of the
CPU cores (two single-core JAX processes train ~1.25x more steps per second than one
two-core process on a 2-core machine: small convolutions do not use two threads well);
each writes its log to `log.txt` in its run folder. `--workers=0` runs in this process
(tests). `--smoke` runs the rows' smoke configs (a few steps of a tiny network).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any, Iterator, Sequence

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Command-line flags, defined only when this module is the program (the demo and the
  tests import it as a library and define their own)."""
  flags.DEFINE_string("suite", "fashion_mnist", "Config in mcl_jax/configs/ that lists ROWS.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; every row trains once per seed.")
  flags.DEFINE_string("workdir", None, "Where the runs, results.md and results.png go.")
  flags.DEFINE_list("rows", [], "Rows to train and report (default: every row of the "
                    "suite).")
  flags.DEFINE_integer("workers", 1, "Trainings at once (subprocesses, cores split between "
                       "them); 0: in this process.")
  flags.DEFINE_bool("smoke", False, "The rows' smoke configs: seconds per run, for tests.")
  flags.DEFINE_bool("report_only", False,
                    "Only write results.md / results.png from what exists.")
  flags.DEFINE_string("run_one", None, "Internal: 'row:seed', train that run in this process.")

RESULT_FILE = "result.json"
SELF_SUPERVISED = ("moco", "simclr")


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of a results table: a config variant (+ overrides) trained over seeds."""
  name: str
  variant: str
  table: str
  overrides: tuple[tuple[str, Any], ...] = ()
  label: str = ""
  fewshot: tuple[int, ...] = ()  # self-supervised rows: held-out classes for mcl_jax.fewshot

  @property
  def title(self) -> str:
    return self.label or self.name


def load_suite(suite: str) -> tuple[Any, list[Row], dict[str, str]]:
  """(config module, rows, tables) of `mcl_jax/configs/<suite>.py`."""
  try:
    module = importlib.import_module(f"mcl_jax.configs.{suite}")
  except ModuleNotFoundError:
    raise ValueError(f"--suite={suite}: there is no mcl_jax/configs/{suite}.py.") from None
  if not hasattr(module, "ROWS"):
    raise ValueError(f"--suite={suite}: mcl_jax/configs/{suite}.py has no ROWS list to "
                     "reproduce.")
  rows = [Row(name=r["name"], variant=r["variant"], table=r["table"],
              overrides=tuple(sorted(r.get("overrides", {}).items())), label=r.get("label", ""),
              fewshot=tuple(r.get("fewshot", ())))
          for r in module.ROWS]
  return module, rows, dict(module.TABLES)


def select_rows(rows: Sequence[Row], names: Sequence[str]) -> list[Row]:
  if not names:
    return list(rows)
  by_name = {r.name: r for r in rows}
  unknown = [n for n in names if n not in by_name]
  if unknown:
    raise ValueError(f"--rows: unknown row {unknown[0]!r}; this suite has "
                     f"{', '.join(by_name)}.")
  return [by_name[n] for n in names]


def run_dir(workdir: str, row: Row, seed: int) -> str:
  """WORKDIR/<variant>[__field=value...]/seed<k>: rows with the same config share a run."""
  name = "__".join([row.variant.replace("+", "-")] + [f"{k}={v}" for k, v in row.overrides])
  return os.path.join(workdir, name, f"seed{seed}")


def _config(module: Any, row: Row, seed: int, smoke: bool, variant: str | None = None):
  """The row's config (or the suite's `variant`, e.g. 'probe') with the row's overrides;
  another variant takes only the row's data overrides (`input.*`): a probe sees the row's
  images with its own recipe, not the row's learning rate."""
  config = module.get_config((variant or row.variant) + (",smoke" if smoke else ""))
  for key, value in row.overrides:
    if variant and not key.startswith("input."):
      continue
    node, *path, field = key.split(".")
    target = config[node]
    for part in path:
      target = target[part]
    target[field] = value
  config.seed = seed
  return config


def _to_json(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _to_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_json(v) for v in x]
  if isinstance(x, (np.ndarray, np.generic)) or hasattr(x, "tolist"):
    return np.asarray(x).tolist()
  return x


def train_one(module: Any, row: Row, seed: int, workdir: str, smoke: bool) -> dict[str, Any]:
  """Trains (or resumes) one run and writes its result.json; returns the result."""
  from mcl_jax import jobs
  directory = run_dir(workdir, row, seed)
  config = _config(module, row, seed, smoke)
  t0 = time.time()
  summary = jobs.run(config, directory)
  if summary["preempted"]:
    raise RuntimeError(f"{row.name} seed {seed} was preempted; rerun to resume it.")
  result = {"row": row.name, "variant": row.variant, "seed": seed, "trainer": config.trainer,
            "members": int(config.cohort.num_members), "steps": summary["steps"],
            "train": summary["train"], "collapsed": summary["collapsed"]}
  if config.trainer in SELF_SUPERVISED:
    result["knn"] = summary["eval"]
    result["probe"] = probe_members(module, row, seed, directory, smoke)
    if config.input.validation_size:
      result["logreg_probe"] = logreg_members(config, directory)
    if row.fewshot:
      result["fewshot"] = fewshot_members(row, directory, smoke)
  else:
    result["eval"] = summary["eval"]
  result["wall_s"] = time.time() - t0
  with open(os.path.join(directory, RESULT_FILE), "w") as f:
    json.dump(_to_json(result), f, indent=1)
  return result


def probe_members(module: Any, row: Row, seed: int, directory: str, smoke: bool
                  ) -> dict[str, list[float]]:
  """Exports each member of a MoCo run and trains the suite's linear probe on it.

  Returns {'top1': [M], 'val_top1': [M], ...}: each member's probe accuracy.
  """
  from mcl_jax import export, jobs
  _, _, meta = export.read_checkpoint(directory)
  probes: dict[str, list[float]] = {}
  for member in range(int(meta["num_members"])):
    out = os.path.join(directory, f"member{member}")
    export.export_member(directory, member, out)
    config = _config(module, row, seed, smoke, variant="probe")
    config.lincls.pretrained = out
    result = jobs.run(config, os.path.join(directory, f"probe{member}"))
    for key, value in result["eval"].items():
      probes.setdefault(key, []).append(float(value))
  return probes


def logreg_members(config: Any, directory: str) -> dict[str, list[float]]:
  """The logistic-regression probe (mcl_jax.logreg_probe) of each exported member on the
  run's own labelled images: {'top1': [M], 'val_top1': [M], 'c': [M]}."""
  from mcl_jax import export, logreg_probe
  _, _, meta = export.read_checkpoint(directory)
  out: dict[str, list[float]] = {}
  for member in range(int(meta["num_members"])):
    result = logreg_probe.evaluate(
        os.path.join(directory, f"member{member}"), classes=tuple(config.input.classes),
        validation_size=int(config.input.validation_size),
        train_subset=int(config.input.train_subset))
    for key in ("top1", "val_top1", "c"):
      out.setdefault(key, []).append(result[key])
  return out


def finished_runs(rows: Sequence[Row], seeds: Sequence[int], workdir: str
                  ) -> Iterator[tuple[Row, int, str, dict[str, Any]]]:
  """(row, seed, run directory, its result) of every finished run among rows x seeds."""
  for row in rows:
    for seed in seeds:
      directory = run_dir(workdir, row, seed)
      path = os.path.join(directory, RESULT_FILE)
      if os.path.exists(path):
        with open(path) as f:
          yield row, seed, directory, json.load(f)


def _rewrite_result(directory: str, result: dict[str, Any]) -> None:
  with open(os.path.join(directory, RESULT_FILE), "w") as f:
    json.dump(_to_json(result), f, indent=1)


def add_missing_logreg_probes(module: Any, rows: Sequence[Row], seeds: Sequence[int],
                              workdir: str, smoke: bool) -> None:
  """Adds the logistic-regression probe to finished self-supervised runs that lack it."""
  for row, seed, directory, result in finished_runs(rows, seeds, workdir):
    config = _config(module, row, seed, smoke)
    if (result["trainer"] not in SELF_SUPERVISED or "logreg_probe" in result
        or not config.input.validation_size):
      continue
    print(f"  logistic-regression probe of {row.name} seed {seed} (finished before it "
          "existed)", flush=True)
    result["logreg_probe"] = logreg_members(config, directory)
    _rewrite_result(directory, result)


def collapse_from_logs(directory: str, config: Any, steps: int) -> dict[str, Any] | None:
  """The first collapse of a finished run, re-read from its TensorBoard metrics (runs from
  before `loop.fit` reported it): what `loop.CollapseWatch` would have found.

  Runs that logged no `contrastive_vs_chance` get it from the loss they logged: MoCo's
  `ce/member_m` over log(1 + K); the in-batch, SimCLR and bank regimes' VCL shared equally
  by the members (the mean, where the members' own losses were not logged) over log(B - 1),
  log(2B - 1) and log(P + K).
  """
  import math
  from mcl_jax import metrics as metrics_lib
  from mcl_jax import plots
  scalars = {tag[len("train/"):]: dict(zip(steps_.tolist(), values.tolist()))
             for tag, (steps_, values) in plots.read_scalars(directory).items()
             if tag.startswith("train/")}
  members, batch = int(config.cohort.num_members), int(config.input.global_batch_size)
  if not any(name.startswith("contrastive_vs_chance/") for name in scalars):
    if config.trainer == "moco":
      chance = math.log(1 + config.moco.queue_size)
      own = {m: scalars.get(f"ce/member_{m}", {}) for m in range(members)}
    else:
      candidates = {"batch": batch - 1, "simclr": 2 * batch - 1,
                    "bank": config.bank.num_positives + config.bank.num_negatives}
      chance = math.log(candidates[config.loss.regime])
      shared = {t: v / members for t, v in scalars.get("vcl", {}).items()}
      own = {m: shared for m in range(members)}
    for m, series in own.items():
      scalars[f"contrastive_vs_chance/member_{m}"] = {t: v / chance for t, v in series.items()}
  epochs = config.schedule.epochs
  steps_per_epoch = (steps / epochs if not config.schedule.num_train_steps and epochs
                     else _steps_per_epoch(config))
  grace = round(metrics_lib.COLLAPSE_GRACE_EPOCHS * steps_per_epoch)
  for step in sorted({t for series in scalars.values() for t in series}):
    logged = {name: series[step] for name, series in scalars.items() if step in series}
    found = metrics_lib.first_collapse(
        logged, check_loss=step >= grace,
        check_cosine=config.trainer not in SELF_SUPERVISED or step >= grace)
    if found is not None:
      return {"step": int(step), **found}
  return None


def _steps_per_epoch(config: Any) -> int:
  """Training steps per epoch of a config (its data source's size over the batch)."""
  from mcl_jax import data
  return data.make_source(config.input).num_train // config.input.global_batch_size


def add_missing_collapse_marks(module: Any, rows: Sequence[Row], seeds: Sequence[int],
                               workdir: str, smoke: bool) -> None:
  """Adds `collapsed` (`collapse_from_logs`) to finished runs from before it was reported."""
  for row, seed, directory, result in finished_runs(rows, seeds, workdir):
    if "collapsed" not in result:
      config = _config(module, row, seed, smoke)
      result["collapsed"] = collapse_from_logs(directory, config, result["steps"])
      _rewrite_result(directory, result)


def fewshot_members(row: Row, directory: str, smoke: bool) -> dict[str, list[float]]:
  """Few-shot accuracy (mcl_jax.fewshot) of each exported member on the row's held-out
  classes: {'<classifier>_<K>shot': [M] mean accuracies} (the exports of probe_members)."""
  from mcl_jax import export, fewshot
  _, _, meta = export.read_checkpoint(directory)
  out: dict[str, list[float]] = {}
  for member in range(int(meta["num_members"])):
    result = fewshot.evaluate(os.path.join(directory, f"member{member}"),
                              classes=row.fewshot, episodes=20 if smoke else 600)
    for key, value in result.items():
      out.setdefault(key, []).append(value["mean"])
  return out


def _pending(workdir: str, rows: Sequence[Row], seeds: Sequence[int]) -> list[tuple[Row, int]]:
  """Unfinished (row, seed) pairs, one per run folder (rows sharing a config train once)."""
  todo, seen = [], set()
  for row in rows:
    for seed in seeds:
      directory = run_dir(workdir, row, seed)
      if directory not in seen and not os.path.exists(os.path.join(directory, RESULT_FILE)):
        todo.append((row, seed))
      seen.add(directory)
  return todo


def _core_sets(workers: int) -> list[set[int]]:
  cores = sorted(os.sched_getaffinity(0))
  per = max(1, len(cores) // workers)
  return [set(cores[i * per:(i + 1) * per]) or set(cores) for i in range(workers)]


def run_all(suite: str, rows: Sequence[Row], seeds: Sequence[int], workdir: str, *,
            workers: int, smoke: bool) -> None:
  """Trains every pending (row, seed), `workers` at a time (0: in this process)."""
  module, _, _ = load_suite(suite)
  todo = _pending(workdir, rows, seeds)
  print(f"{suite}: {len(todo)} runs to train (workdir {workdir}).", flush=True)
  t0 = time.time()
  if workers == 0:
    for i, (row, seed) in enumerate(todo):
      print(f"[{i + 1}/{len(todo)}] {row.name} seed {seed}", flush=True)
      train_one(module, row, seed, workdir, smoke)
    add_missing_logreg_probes(module, rows, seeds, workdir, smoke)
    return
  running: list[tuple[subprocess.Popen, Row, int, float, set[int], Any]] = []
  free = _core_sets(workers)
  queue = list(todo)
  finished, failed, durations = 0, [], []
  while queue or running:
    while queue and free:
      row, seed = queue.pop(0)
      cores = free.pop(0)
      directory = run_dir(workdir, row, seed)
      os.makedirs(directory, exist_ok=True)
      log = open(os.path.join(directory, "log.txt"), "a")
      cmd = [sys.executable, "-m", "mcl_jax.reproduce", f"--suite={suite}",
             f"--workdir={workdir}", f"--run_one={row.name}:{seed}",
             f"--smoke={'true' if smoke else 'false'}"]
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                              preexec_fn=lambda c=cores: os.sched_setaffinity(0, c))
      running.append((proc, row, seed, time.time(), cores, log))
      print(f"  start {row.name} seed {seed} on cores {sorted(cores)} "
            f"(log: {os.path.join(directory, 'log.txt')})", flush=True)
    time.sleep(2)
    for item in list(running):
      proc, row, seed, started, cores, log = item
      if proc.poll() is None:
        continue
      running.remove(item)
      log.close()
      free.append(cores)
      finished += 1
      minutes = (time.time() - started) / 60
      if proc.returncode == 0:
        durations.append(minutes)
        left = minutes_left(durations, len(queue),
                            [(time.time() - r[3]) / 60 for r in running], workers)
        print(f"  [{finished}/{len(todo)}] {row.name} seed {seed} done in {minutes:.1f} min; "
              f"{(time.time() - t0) / 60:.1f} min so far, about {left:.0f} min left",
              flush=True)
      else:
        failed.append(f"{row.name} seed {seed}")
        print(f"  [{finished}/{len(todo)}] {row.name} seed {seed} FAILED (exit "
              f"{proc.returncode}); see its log.txt", flush=True)
  add_missing_logreg_probes(module, rows, seeds, workdir, smoke)
  if failed:
    raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(failed)}; their log.txt "
                       "says why, and rerunning the same command retries them.")


def minutes_left(durations: Sequence[float], queued: int, running_for: Sequence[float],
                 workers: int) -> float:
  """Wall minutes until every run is done, assuming each takes the mean finished duration.

  Runs go `workers` at a time, so the queued runs' work is shared among the workers (a
  plain elapsed / done * left would count them one after another).
  """
  mean = sum(durations) / len(durations)
  running_rest = [max(0.0, mean - elapsed) for elapsed in running_for]
  work = queued * mean + sum(running_rest)
  return max(max(running_rest, default=0.0), work / max(1, workers))


# ----------------------------------------------------------------------------- the report


def read_results(workdir: str, rows: Sequence[Row], seeds: Sequence[int]
                 ) -> dict[str, list[dict[str, Any]]]:
  """{row name: [result of each finished seed]} (rows without any finished seed left out)."""
  out: dict[str, list[dict[str, Any]]] = {}
  for row, _, _, result in finished_runs(rows, seeds, workdir):
    out.setdefault(row.name, []).append(result)
  return out


def _spread(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample std over seeds; 0 for one seed)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


# Few-shot columns of the self-supervised tables: (result key, column title).
FEWSHOT_COLUMNS = (("nearest_centroid_1shot", "5-way 1-shot NC"),
                   ("nearest_centroid_5shot", "5-way 5-shot NC"),
                   ("logistic_regression_5shot", "5-way 5-shot LR"))


def row_summary(results: Sequence[dict[str, Any]], split: str = "test"
                ) -> dict[str, Any] | None:
  """Per-seed figures of one row, in %: members [seeds, M], members' mean, best member,
  ensemble (supervised); the probe's members, its mean and best member, kNN k=200 / k=20
  and few-shot members' means (self-supervised). None when the runs have no such split
  (a dataset without a validation split)."""
  if results[0]["trainer"] not in SELF_SUPERVISED:
    if split not in results[0]["eval"]:
      return None
    top1 = 100 * np.asarray([r["eval"][split]["top1"] for r in results])  # [seeds, M + 1]
    members = top1[:, :-1]
    return {"kind": "supervised", "members": members, "mean": members.mean(1),
            "best": members.max(1), "ensemble": top1[:, -1]}
  prefix = "" if split == "test" else "val_"
  if prefix + "top1" not in results[0]["probe"]:
    return None
  knn200 = 100 * np.asarray([r["knn"][prefix + "top1"] for r in results])
  knn20 = 100 * np.asarray([r["knn"][prefix + "top1_k20"] for r in results])
  probe = 100 * np.asarray([r["probe"][prefix + "top1"] for r in results])
  summary = {"kind": "ssl", "members": probe, "mean": probe.mean(1), "best": probe.max(1),
             "knn200": knn200.mean(1), "knn20": knn20.mean(1)}
  if all("logreg_probe" in r for r in results):
    logreg = 100 * np.asarray([r["logreg_probe"][prefix + "top1"] for r in results])
    summary.update(logreg_members=logreg, logreg=logreg.mean(1))
  if split == "test" and all("fewshot" in r for r in results):
    for key, _ in FEWSHOT_COLUMNS:
      summary[key] = 100 * np.asarray([np.mean(r["fewshot"][key]) for r in results])
  return summary


def _pm(values: Sequence[float] | None) -> str:
  if values is None:
    return "-"
  mean, std = _spread(values)
  return f"{mean:.2f} +- {std:.2f}"


# Suffix of every figure of a row with at least one collapsed run (`collapsed_runs`).
COLLAPSE_MARK = " †"
COLLAPSE_FOOTNOTE = (
    "†: at least one run of the row collapsed at some step (column 'collapsed': how many; "
    "the first step, member and signal are in its result.json): a member's embeddings "
    "pointed one way or its own contrastive loss sat near chance (loop.CollapseWatch). The "
    "mark does not say whether the run recovered: its logged embed_cosine and "
    "contrastive_vs_chance curves do.")


def collapsed_runs(results: Sequence[dict[str, Any]]) -> tuple[int, int]:
  """(runs that collapsed, runs without the record) among one row's results."""
  return (sum(bool(r.get("collapsed")) for r in results),
          sum("collapsed" not in r for r in results))


def _collapse_cell(results: Sequence[dict[str, Any]]) -> str:
  collapsed, unknown = collapsed_runs(results)
  return f"{collapsed}" + (f" (+{unknown} unread)" if unknown else "")


# Figures compared seed by seed between two rows of a table: (row_summary key, name).
PAIRED_FIGURES = {"supervised": (("mean", "members' mean"), ("best", "best member"),
                                 ("ensemble", "ensemble")),
                  "ssl": (("logreg", "LR probe members' mean"), ("mean", "probe members' mean"),
                          ("knn20", "kNN k=20 members' mean"))}


def paired_difference(values: Sequence[float]) -> tuple[float, float, float]:
  """(mean, low, high): the mean of per-seed differences and its two-sided 95% confidence
  interval from Student's t with n - 1 degrees of freedom (n >= 2 differences)."""
  from scipy import stats
  d = np.asarray(values, np.float64)
  half = stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
  return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def paired_lines(table_rows: Sequence[Row], results: dict[str, list[dict[str, Any]]]
                 ) -> list[str]:
  """One line per row that shares at least two seeds with its reference, the first row of
  the table with the same trainer (MoCo rows against MoCo alone, SimCLR rows against SimCLR
  alone): the difference (row - reference) of each figure, paired by seed, with its 95%
  interval."""
  by_seed = lambda res: {r["seed"]: r for r in res}  # noqa: E731
  trainer = lambda row: results[row.name][0]["trainer"]  # noqa: E731
  lines = []
  for i, row in enumerate(table_rows):
    reference = next((r for r in table_rows[:i] if trainer(r) == trainer(row)), None)
    if reference is None:
      continue
    runs, ref_runs = by_seed(results[row.name]), by_seed(results[reference.name])
    seeds = sorted(set(runs) & set(ref_runs))
    if len(seeds) < 2:
      continue
    ref = row_summary([ref_runs[s] for s in seeds])
    this = row_summary([runs[s] for s in seeds])
    cells = []
    for key, name in PAIRED_FIGURES[this["kind"]]:
      if key in this and key in ref:
        mean, low, high = paired_difference(np.asarray(this[key]) - np.asarray(ref[key]))
        cells.append(f"{name} {mean:+.2f} [{low:+.2f}, {high:+.2f}]")
    mark = COLLAPSE_MARK if (collapsed_runs(results[row.name])[0]
                             or collapsed_runs(results[reference.name])[0]) else ""
    lines.append(f"- {row.title} - {reference.title}, paired by seed ({len(seeds)} seeds: "
                 f"{', '.join(map(str, seeds))}), mean difference in points [95% CI]: "
                 + "; ".join(cells) + mark)
  return lines


def format_tables(rows: Sequence[Row], tables: dict[str, str],
                  results: dict[str, list[dict[str, Any]]]) -> str:
  """The Markdown tables of results.md (test split, and the validation split beside it)."""
  lines = []
  for table, title in tables.items():
    table_rows = [r for r in rows if r.table == table and r.name in results]
    if not table_rows:
      continue
    ssl = results[table_rows[0].name][0]["trainer"] in SELF_SUPERVISED
    fewshot = ssl and all("fewshot" in r for row in table_rows for r in results[row.name])
    extra = [title for _, title in FEWSHOT_COLUMNS] if fewshot else []
    logreg = ssl and all("logreg_probe" in r for row in table_rows for r in results[row.name])
    lines += [f"### {title}", ""]
    marked = False
    if ssl:
      header = (["row", "seeds", "collapsed", "probe top-1 per member",
                 "probe members' mean", "probe best member"]
                + (["LR probe per member", "LR probe members' mean"] if logreg else [])
                + ["kNN k=200 members' mean", "kNN k=20 members' mean"]
                + extra + ["val probe mean"] + (["val LR probe mean"] if logreg else [])
                + ["min/run"])
      lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    else:
      lines += ["| row | seeds | collapsed | top-1 per member | members' mean | best member "
                "| ensemble | val members' mean | val ensemble | min/run |",
                "|---|---|---|---|---|---|---|---|---|---|"]
    for row in table_rows:
      res = results[row.name]
      test, val = row_summary(res, "test"), row_summary(res, "validation") or {}
      per_member = " / ".join(f"{v:.2f}" for v in test["members"].mean(0))
      minutes = np.mean([r["wall_s"] for r in res]) / 60
      if ssl:
        lr_cells = [" / ".join(f"{v:.2f}" for v in test["logreg_members"].mean(0)),
                    _pm(test["logreg"])] if logreg else []
        cells = ([per_member, _pm(test["mean"]), _pm(test["best"])] + lr_cells
                 + [_pm(test["knn200"]), _pm(test["knn20"])]
                 + [_pm(test[key]) for key, _ in FEWSHOT_COLUMNS if fewshot]
                 + [_pm(val.get("mean"))] + ([_pm(val.get("logreg"))] if logreg else []))
      else:
        cells = [per_member, _pm(test["mean"]), _pm(test["best"]), _pm(test["ensemble"]),
                 _pm(val.get("mean")), _pm(val.get("ensemble"))]
      if collapsed_runs(res)[0]:  # no plain number for a row with a collapsed run
        cells = [c if c == "-" else c + COLLAPSE_MARK for c in cells]
        marked = True
      lines.append(f"| {row.title} | {len(res)} | {_collapse_cell(res)} | " + " | ".join(cells)
                   + f" | {minutes:.1f} |")
    paired = paired_lines(table_rows, results)
    lines += [""] + paired if paired else []
    lines += ["", COLLAPSE_FOOTNOTE, ""] if marked else [""]
  return "\n".join(lines)


def plot(rows: Sequence[Row], tables: dict[str, str], results: dict[str, list[dict[str, Any]]],
         path: str) -> str:
  """One panel per table: members' mean, best member and ensemble (or kNN) of every row,
  test split, bars at the mean over seeds with +- one std error bars."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  panels = [(t, title, [r for r in rows if r.table == t and r.name in results])
            for t, title in tables.items()]
  panels = [p for p in panels if p[2]]
  fig = Figure(figsize=(8 + 0.6 * max(len(p[2]) for p in panels), 3.6 * len(panels)))
  FigureCanvasAgg(fig)
  for i, (_, title, table_rows) in enumerate(panels):
    ax = fig.add_subplot(len(panels), 1, i + 1)
    summaries = [row_summary(results[r.name]) for r in table_rows]
    if summaries[0]["kind"] == "ssl":
      series = [("SGD probe, members' mean", "mean"), ("SGD probe, best member", "best"),
                ("kNN k=200, members' mean", "knn200")]
      if all("logreg" in s for s in summaries):
        series.insert(2, ("LR probe (C on validation), members' mean", "logreg"))
    else:
      series = [("members' mean", "mean"), ("best member", "best"), ("ensemble", "ensemble")]
    width = 0.8 / len(series)
    x = np.arange(len(table_rows))
    for j, (label, key) in enumerate(series):
      stats = [_spread(s[key]) for s in summaries]
      ax.bar(x + (j - (len(series) - 1) / 2) * width, [m for m, _ in stats], width,
             yerr=[e for _, e in stats], capsize=3, label=label)
    lows = [min(s[key].min() for _, key in series) for s in summaries]
    highs = [max(s[key].max() for _, key in series) for s in summaries]
    ax.set_ylim(max(0.0, min(lows) - 2.0), min(100.0, max(highs) + 1.0))
    ax.set_xticks(x, [r.title + (COLLAPSE_MARK if collapsed_runs(results[r.name])[0] else "")
                      for r in table_rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(textwrap.fill(title, 110), fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not on, bars
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  return path


def write_report(suite: str, rows: Sequence[Row], tables: dict[str, str], seeds: Sequence[int],
                 workdir: str) -> str | None:
  """results.md and results.png from the finished runs; returns the Markdown (None if none)."""
  results = read_results(workdir, rows, seeds)
  if not results:
    return None
  wall = sum(r["wall_s"] for res in results.values() for r in res) / 60
  text = "\n".join([
      f"# {suite}: results", "",
      f"Test-split top-1 (%) per row: mean +- sample std over the seeds listed (seeds "
      f"{', '.join(map(str, seeds))}); 'members' mean' averages the members of each run, "
      "'best member' is the official scripts' reported metric (max over members), "
      "'ensemble' the mean of the members' logits. Validation columns: the held-out split "
      "the choices were made on. min/run: wall minutes per run (training and evaluation; "
      "self-supervised rows include exporting, probing and few-shot testing every member).",
      "",
      format_tables(rows, tables, results),
      f"Total training wall time of these runs: {wall:.0f} min.", ""])
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text)
  plot(rows, tables, results, os.path.join(workdir, "results.png"))
  return text


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {' '.join(argv[1:])}; use --flag=value.")
  from mcl_jax import loop
  loop.quiet_library_logs()
  if not FLAGS.workdir:
    _fail("--workdir is required: the folder for the runs and the results.")
  try:
    module, rows, tables = load_suite(FLAGS.suite)
    seeds = [int(s) for s in FLAGS.seeds]
    if FLAGS.run_one:
      name, seed = FLAGS.run_one.rsplit(":", 1)
      train_one(module, select_rows(rows, [name])[0], int(seed), FLAGS.workdir, FLAGS.smoke)
      return
    chosen = select_rows(rows, FLAGS.rows)
    if not FLAGS.report_only:
      run_all(FLAGS.suite, chosen, seeds, FLAGS.workdir, workers=FLAGS.workers,
              smoke=FLAGS.smoke)
    add_missing_collapse_marks(module, chosen, seeds, FLAGS.workdir, FLAGS.smoke)
    text = write_report(FLAGS.suite, chosen, tables, seeds, FLAGS.workdir)
  except (ValueError, RuntimeError, FileNotFoundError) as e:
    _fail(str(e))
  if text is None:
    _fail(f"No finished run in {FLAGS.workdir} yet.")
  print("\n" + text)
  print(f"Wrote {os.path.join(FLAGS.workdir, 'results.md')} and results.png.")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def run_cli() -> None:
  """The `mcl-reproduce` command."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run_cli()
