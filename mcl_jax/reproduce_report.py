"""The reproduction report: a suite's finished runs as Markdown tables and a plot.

`write_report` reads the result.json (`reproduce_eval`) of every finished run among the
chosen rows and seeds and writes `WORKDIR/results.md` and `WORKDIR/results.png`. Each table
(`format_tables`: one per suite table with a finished run) has a line per row: its seeds,
how many of its runs collapsed, each member's test top-1, the members' mean +- sample std
over seeds, the best member, and the ensemble (supervised) or the probes, kNN and few-shot
figures (self-supervised; `row_summary`), the same on the validation split, and minutes per
run. Under each table, every row that shares at least two seeds with its reference (the
table's first row of the same regime) gets the mean difference of each figure, paired by
seed, with its 95% Student-t interval (`paired_lines`). Every figure of a row with a
collapsed run carries `COLLAPSE_MARK` and the table the `COLLAPSE_FOOTNOTE`, so it is never
read as the method's. `plot` draws one panel per table, with the seeds' error bars.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import textwrap
from typing import Any

import numpy as np

from mcl_jax import regimes
from mcl_jax import suites
from mcl_jax.suites import Row


def read_results(
  workdir: str, rows: Sequence[Row], seeds: Sequence[int]
) -> dict[str, list[dict[str, Any]]]:
  """{row name: [result of each finished seed]} (rows without any finished seed left out)."""
  out: dict[str, list[dict[str, Any]]] = {}
  for row, _, _, result in suites.finished_runs(rows, seeds, workdir):
    out.setdefault(row.name, []).append(result)
  return out


def _spread(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample std over seeds; 0 for one seed)."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


# Few-shot columns of the self-supervised tables: (result key, column title).
FEWSHOT_COLUMNS = (
  ("nearest_centroid_1shot", "5-way 1-shot NC"),
  ("nearest_centroid_5shot", "5-way 5-shot NC"),
  ("logistic_regression_5shot", "5-way 5-shot LR"),
)


def row_summary(results: Sequence[dict[str, Any]], split: str = "test") -> dict[str, Any] | None:
  """Per-seed figures of one row, in %: members [seeds, M], members' mean, best member,
  ensemble (supervised); the probe's members, its mean and best member, kNN k=200 / k=20
  and few-shot members' means (self-supervised). None when the runs have no such split
  (a dataset without a validation split)."""
  if not regimes.get(results[0]["trainer"]).self_supervised:
    if split not in results[0]["eval"]:
      return None
    top1 = 100 * np.asarray([r["eval"][split]["top1"] for r in results])  # [seeds, M + 1]
    members = top1[:, :-1]
    return {
      "kind": "classifier",
      "members": members,
      "mean": members.mean(1),
      "best": members.max(1),
      "ensemble": top1[:, -1],
    }
  if split not in results[0]["probe"]:
    return None
  knn200 = 100 * np.asarray([r["knn"][split]["knn_top1"] for r in results])
  knn20 = 100 * np.asarray([r["knn"][split]["knn_top1_k20"] for r in results])
  probe = 100 * np.asarray([r["probe"][split]["top1"] for r in results])
  summary = {
    "kind": "probed",
    "members": probe,
    "mean": probe.mean(1),
    "best": probe.max(1),
    "knn200": knn200.mean(1),
    "knn20": knn20.mean(1),
  }
  if all("logreg_probe" in r for r in results):
    logreg = 100 * np.asarray([r["logreg_probe"][split]["top1"] for r in results])
    summary.update(logreg_members=logreg, logreg=logreg.mean(1))
  if split == "test" and all("fewshot" in r for r in results):
    for key, _ in FEWSHOT_COLUMNS:
      summary[key] = 100 * np.asarray([np.mean(r["fewshot"][key]) for r in results])
  return summary


def _test_split_summary(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """`row_summary` of the test split, which every run is evaluated on (never None)."""
  summary = row_summary(results, "test")
  assert summary is not None, "a run without a test split"
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
  "contrastive_vs_chance curves do."
)


def collapsed_runs(results: Sequence[dict[str, Any]]) -> tuple[int, int]:
  """(runs that collapsed, runs without the record) among one row's results."""
  return (
    sum(bool(r.get("collapsed")) for r in results),
    sum("collapsed" not in r for r in results),
  )


def _collapse_cell(results: Sequence[dict[str, Any]]) -> str:
  collapsed, unknown = collapsed_runs(results)
  return f"{collapsed}" + (f" (+{unknown} unread)" if unknown else "")


# Figures compared seed by seed between two rows of a table: (row_summary key, name).
PAIRED_FIGURES = {
  "classifier": (("mean", "members' mean"), ("best", "best member"), ("ensemble", "ensemble")),
  "probed": (
    ("logreg", "LR probe members' mean"),
    ("mean", "probe members' mean"),
    ("knn20", "kNN k=20 members' mean"),
  ),
}


def paired_difference(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
  """(mean, low, high): the mean of per-seed differences and its two-sided 95% confidence
  interval from Student's t with n - 1 degrees of freedom (n >= 2 differences)."""
  from scipy import stats

  d = np.asarray(values, np.float64)
  half = stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
  return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def paired_lines(table_rows: Sequence[Row], results: dict[str, list[dict[str, Any]]]) -> list[str]:
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
    ref = _test_split_summary([ref_runs[s] for s in seeds])
    this = _test_split_summary([runs[s] for s in seeds])
    cells = []
    for key, name in PAIRED_FIGURES[this["kind"]]:
      if key in this and key in ref:
        mean, low, high = paired_difference(np.asarray(this[key]) - np.asarray(ref[key]))
        cells.append(f"{name} {mean:+.2f} [{low:+.2f}, {high:+.2f}]")
    mark = (
      COLLAPSE_MARK
      if (collapsed_runs(results[row.name])[0] or collapsed_runs(results[reference.name])[0])
      else ""
    )
    lines.append(
      f"- {row.title} - {reference.title}, paired by seed ({len(seeds)} seeds: "
      f"{', '.join(map(str, seeds))}), mean difference in points [95% CI]: "
      + "; ".join(cells)
      + mark
    )
  return lines


def format_tables(
  rows: Sequence[Row], tables: dict[str, str], results: dict[str, list[dict[str, Any]]]
) -> str:
  """The Markdown tables of results.md (test split, and the validation split beside it)."""
  lines = []
  for table, title in tables.items():
    table_rows = [r for r in rows if r.table == table and r.name in results]
    if not table_rows:
      continue
    ssl = regimes.get(results[table_rows[0].name][0]["trainer"]).self_supervised
    fewshot = ssl and all("fewshot" in r for row in table_rows for r in results[row.name])
    extra = [title for _, title in FEWSHOT_COLUMNS] if fewshot else []
    logreg = ssl and all("logreg_probe" in r for row in table_rows for r in results[row.name])
    lines += [f"### {title}", ""]
    marked = False
    if ssl:
      header = (
        [
          "row",
          "seeds",
          "collapsed",
          "probe top-1 per member",
          "probe members' mean",
          "probe best member",
        ]
        + (["LR probe per member", "LR probe members' mean"] if logreg else [])
        + ["kNN k=200 members' mean", "kNN k=20 members' mean"]
        + extra
        + ["val probe mean"]
        + (["val LR probe mean"] if logreg else [])
        + ["min/run"]
      )
      lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    else:
      lines += [
        "| row | seeds | collapsed | top-1 per member | members' mean | best member "
        "| ensemble | val members' mean | val ensemble | min/run |",
        "|---|---|---|---|---|---|---|---|---|---|",
      ]
    for row in table_rows:
      res = results[row.name]
      test, val = _test_split_summary(res), row_summary(res, "validation") or {}
      per_member = " / ".join(f"{v:.2f}" for v in test["members"].mean(0))
      minutes = np.mean([r["wall_s"] for r in res]) / 60
      if ssl:
        lr_cells = (
          [" / ".join(f"{v:.2f}" for v in test["logreg_members"].mean(0)), _pm(test["logreg"])]
          if logreg
          else []
        )
        cells = (
          [per_member, _pm(test["mean"]), _pm(test["best"])]
          + lr_cells
          + [_pm(test["knn200"]), _pm(test["knn20"])]
          + [_pm(test[key]) for key, _ in FEWSHOT_COLUMNS if fewshot]
          + [_pm(val.get("mean"))]
          + ([_pm(val.get("logreg"))] if logreg else [])
        )
      else:
        cells = [
          per_member,
          _pm(test["mean"]),
          _pm(test["best"]),
          _pm(test["ensemble"]),
          _pm(val.get("mean")),
          _pm(val.get("ensemble")),
        ]
      if collapsed_runs(res)[0]:  # no plain number for a row with a collapsed run
        cells = [c if c == "-" else c + COLLAPSE_MARK for c in cells]
        marked = True
      lines.append(
        f"| {row.title} | {len(res)} | {_collapse_cell(res)} | "
        + " | ".join(cells)
        + f" | {minutes:.1f} |"
      )
    paired = paired_lines(table_rows, results)
    lines += [""] + paired if paired else []
    lines += ["", COLLAPSE_FOOTNOTE, ""] if marked else [""]
  return "\n".join(lines)


def plot(
  rows: Sequence[Row], tables: dict[str, str], results: dict[str, list[dict[str, Any]]], path: str
) -> str:
  """One panel per table: members' mean, best member and ensemble (or kNN) of every row,
  test split, bars at the mean over seeds with +- one std error bars."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  panels = [
    (t, title, [r for r in rows if r.table == t and r.name in results])
    for t, title in tables.items()
  ]
  panels = [p for p in panels if p[2]]
  fig = Figure(figsize=(8 + 0.6 * max(len(p[2]) for p in panels), 3.6 * len(panels)))
  FigureCanvasAgg(fig)
  for i, (_, title, table_rows) in enumerate(panels):
    ax = fig.add_subplot(len(panels), 1, i + 1)
    summaries = [_test_split_summary(results[r.name]) for r in table_rows]
    if summaries[0]["kind"] == "probed":
      series = [
        ("SGD probe, members' mean", "mean"),
        ("SGD probe, best member", "best"),
        ("kNN k=200, members' mean", "knn200"),
      ]
      if all("logreg" in s for s in summaries):
        series.insert(2, ("LR probe (C on validation), members' mean", "logreg"))
    else:
      series = [("members' mean", "mean"), ("best member", "best"), ("ensemble", "ensemble")]
    width = 0.8 / len(series)
    x = np.arange(len(table_rows))
    for j, (label, key) in enumerate(series):
      stats = [_spread(s[key]) for s in summaries]
      ax.bar(
        x + (j - (len(series) - 1) / 2) * width,
        [m for m, _ in stats],
        width,
        yerr=[e for _, e in stats],
        capsize=3,
        label=label,
      )
    lows = [min(s[key].min() for _, key in series) for s in summaries]
    highs = [max(s[key].max() for _, key in series) for s in summaries]
    ax.set_ylim(max(0.0, min(lows) - 2.0), min(100.0, max(highs) + 1.0))
    ax.set_xticks(
      x,
      [r.title + (COLLAPSE_MARK if collapsed_runs(results[r.name])[0] else "") for r in table_rows],
      rotation=20,
      ha="right",
      fontsize=8,
    )
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(textwrap.fill(title, 110), fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not on, bars
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  return path


def write_report(
  suite: str, rows: Sequence[Row], tables: dict[str, str], seeds: Sequence[int], workdir: str
) -> str | None:
  """results.md and results.png from the finished runs; returns the Markdown (None if none)."""
  results = read_results(workdir, rows, seeds)
  if not results:
    return None
  wall = sum(r["wall_s"] for res in results.values() for r in res) / 60
  text = "\n".join(
    [
      f"# {suite}: results",
      "",
      f"Test-split top-1 (%) per row: mean +- sample std over the seeds listed (seeds "
      f"{', '.join(map(str, seeds))}); 'members' mean' averages the members of each run, "
      "'best member' is the official scripts' reported metric (max over members), "
      "'ensemble' the mean of the members' logits. Validation columns: the held-out split "
      "the choices were made on. min/run: wall minutes per run (training and evaluation; "
      "self-supervised rows include exporting, probing and few-shot testing every member).",
      "",
      format_tables(rows, tables, results),
      f"Total training wall time of these runs: {wall:.0f} min.",
      "",
    ]
  )
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text)
  plot(rows, tables, results, os.path.join(workdir, "results.png"))
  return text
