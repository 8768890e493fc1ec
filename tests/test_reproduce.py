"""The reproduction runner: suites, rows x seeds, resumable, results.md and results.png.

Runs the Fashion-MNIST suite's smoke configs in this process (a few steps of `tiny`), so it
needs the Debian copy of Fashion-MNIST; the report functions are also tested on
hand-written results that need no data, and the committed results on what the report reads.
"""

import glob
import json
import os

import numpy as np
import pytest

from mcl_jax import regimes
from mcl_jax import reproduce_report
from mcl_jax import reproduce_schedule
from mcl_jax import suites
from mcl_jax.data import fashion_mnist

pytestmark = pytest.mark.xdist_group("reproduce")

COMMITTED = os.path.join(os.path.dirname(__file__), "..", "results", "fashion_mnist")
COMMITTED_SSL = os.path.join(COMMITTED, "ssl")


def fake_result(row, seed, top1, trainer="supervised", collapsed=None):
  if trainer == "moco":
    return {
      "row": row,
      "seed": seed,
      "trainer": "moco",
      "wall_s": 60.0,
      "collapsed": collapsed,
      "knn": {split: {"knn_top1": top1, "knn_top1_k20": top1} for split in ("test", "validation")},
      "probe": {split: {"top1": top1} for split in ("test", "validation")},
      "logreg_probe": {
        "test": {"top1": [v + 0.05 for v in top1]},
        "validation": {"top1": [v + 0.05 for v in top1]},
        "c": [1.0] * len(top1),
      },
    }
  split = {"top1": top1, "top5": [1.0] * len(top1)}
  return {
    "row": row,
    "seed": seed,
    "trainer": trainer,
    "wall_s": 120.0,
    "collapsed": collapsed,
    "eval": {"test": split, "validation": split},
  }


def test_report_from_results(tmp_path):
  rows = [
    suites.Row("baseline", "baseline", "main"),
    suites.Row("mcl_x2", "mcl_x2", "main"),
    suites.Row("moco", "mocov2", "ssl"),
  ]
  values = {
    "baseline": [[0.80, 0.82, 0.85], [0.84, 0.82, 0.86]],
    "mcl_x2": [[0.83, 0.85, 0.87], [0.85, 0.85, 0.88]],
  }
  for row in rows[:2]:
    for seed, top1 in enumerate(values[row.name]):
      directory = suites.run_dir(str(tmp_path), row, seed)
      os.makedirs(directory)
      with open(os.path.join(directory, suites.RESULT_FILE), "w") as f:
        json.dump(fake_result(row.name, seed, top1), f)
  directory = suites.run_dir(str(tmp_path), rows[2], 0)
  os.makedirs(directory)
  with open(os.path.join(directory, suites.RESULT_FILE), "w") as f:
    json.dump(fake_result("moco", 0, [0.7], "moco"), f)
  text = reproduce_report.write_report(
    "suite", rows, {"main": "Main", "ssl": "SSL"}, [0, 1], str(tmp_path)
  )
  # baseline: members' means 81.0 and 83.0 -> 82.00 +- 1.41; best 82 and 84; ensemble 85, 86.
  assert (
    "| baseline | 2 | 0 | 82.00 / 82.00 | 82.00 +- 1.41 | 83.00 +- 1.41 | 85.50 +- 0.71 |" in text
  )
  assert "| mcl_x2 | 2 | 0 |" in text and "### SSL" in text and "†" not in text
  # SSL: SGD probe 70.00 (per member, mean, best), then the logistic-regression probe 75.00.
  assert "| moco | 1 | 0 | 70.00 | 70.00 +- 0.00 | 70.00 +- 0.00 | 75.00 | 75.00 +- 0.00 |" in text
  assert os.path.getsize(tmp_path / "results.png") > 10_000
  summary = reproduce_report.row_summary([fake_result("b", 0, [0.8, 0.9, 0.95])])
  np.testing.assert_allclose(summary["best"], [90.0])


def test_rows_with_a_collapsed_run_count_them_and_carry_no_plain_number():
  first = {"step": 39, "member": 1, "signal": "contrastive_vs_chance", "value": 0.98}
  rows = [suites.Row("moco", "mocov2", "ssl"), suites.Row("mcl", "mocov2_mcl_x2", "ssl")]
  results = {
    "moco": [fake_result("moco", s, [0.7], "moco") for s in range(2)],
    "mcl": [
      fake_result("mcl", 0, [0.6, 0.62], "moco", collapsed=first),
      fake_result("mcl", 1, [0.6, 0.64], "moco"),
    ],
  }
  del results["mcl"][1]["collapsed"]  # a run from before the record: counted as unread
  text = reproduce_report.format_tables(rows, {"ssl": "SSL"}, results)
  assert "| moco | 2 | 0 | 70.00 | 70.00 +- 0.00 |" in text
  line = next(x for x in text.splitlines() if x.startswith("| mcl |"))
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[:3] == ["mcl", "2", "1 (+1 unread)"]
  assert all(c.endswith(reproduce_report.COLLAPSE_MARK.strip()) for c in cells[3:-1]), cells
  assert reproduce_report.COLLAPSE_FOOTNOTE in text


def test_rows_sharing_seeds_get_the_paired_difference_and_its_interval():
  # Differences 1, 2, 3 points: mean 2, std 1, t(0.975, 2 dof) = 4.3027 -> +-2.484.
  mean, low, high = reproduce_report.paired_difference([1.0, 2.0, 3.0])
  assert mean == pytest.approx(2.0) and high - mean == pytest.approx(4.30265 / np.sqrt(3), 1e-4)
  assert mean - low == pytest.approx(high - mean)
  rows = [
    suites.Row("base", "baseline", "main"),
    suites.Row("mcl", "mcl_x2", "main"),
    suites.Row("lone", "mcl_x2", "main"),
  ]
  results = {
    "base": [fake_result("base", s, [0.80, 0.80, 0.80]) for s in range(3)],
    # members' mean up by 1, 2, 3 points on seeds 0, 1, 2; seed 3 has no partner.
    "mcl": [fake_result("mcl", s, [0.81 + s / 100] * 3) for s in range(4)],
    "lone": [fake_result("lone", 5, [0.9] * 3)],
  }  # no seed in common: no line
  text = reproduce_report.format_tables(rows, {"main": "Main"}, results)
  paired = [x for x in text.splitlines() if "paired by seed" in x]
  assert len(paired) == 1
  assert paired[0].startswith("- mcl - base, paired by seed (3 seeds: 0, 1, 2)")
  assert "members' mean +2.00 [-0.48, +4.48]" in paired[0]


@pytest.mark.skipif(not os.path.isdir(COMMITTED), reason="no committed results")
def test_committed_results_hold_every_record_the_report_reads():
  """Every committed run records its first collapse, and every self-supervised one its
  logistic-regression probe (runs from before either existed were given them from their
  logs and exports once), its accuracies split-first (runs from before that were
  rewritten once), so the report reads them as they are."""
  paths = glob.glob(os.path.join(COMMITTED, "**", suites.RESULT_FILE), recursive=True)
  assert paths
  for path in paths:
    result = json.load(open(path))
    assert "collapsed" in result, path
    if regimes.get(result["trainer"]).self_supervised:
      assert "logreg_probe" in result, path
      splits = {"test", "validation"}
      assert set(result["knn"]) == set(result["probe"]) == splits, path
      assert set(result["logreg_probe"]) == splits | {"c"}, path
      for split in splits:
        assert set(result["knn"][split]) == {"knn_top1", "knn_top1_k20"}, path
        assert "top1" in result["probe"][split] and "top1" in result["logreg_probe"][split]
    else:
      assert "test" in result["eval"], path


@pytest.mark.skipif(not os.path.isdir(COMMITTED_SSL), reason="no committed SSL results")
@pytest.mark.parametrize(
  "row,expected",
  [
    ("held_mocov2", None),
    ("held_mocov2_mcl_x2_icl1", {"step": 39, "member": 0, "signal": "contrastive_vs_chance"}),
    ("held_mocov2_mcl_x2", {"step": 39, "member": 0, "signal": "embed_cosine"}),
    ("held_simclr_mcl_x2", None),
  ],
)
def test_committed_ssl_runs_record_their_collapse(row, expected):
  """The committed Fashion-MNIST SSL runs (seed 0): MoCo + MCL x2 with the official ICL
  weight sat at chance (its ce/member_m over log(1 + K)) after its first epoch; at ICL
  weight 0.1 its queries pointed one way at step 39 (cosine above the limit); MoCo alone
  and SimCLR + MCL x2 did not collapse."""
  _, rows, _ = suites.load_suite("fashion_mnist")
  (chosen,) = suites.select_rows(rows, [row])
  directory = suites.run_dir(COMMITTED_SSL, chosen, 0)
  found = json.load(open(os.path.join(directory, suites.RESULT_FILE)))["collapsed"]
  if expected is None:
    assert found is None
  else:
    assert {k: found[k] for k in expected} == expected and found["value"] > 0.95


def test_rows_with_the_same_config_share_a_run(tmp_path):
  a = suites.Row("m2", "mcl_x2", "cohort")
  b = suites.Row("mcl_x2", "mcl_x2", "main")
  c = suites.Row("official", "mcl_x2", "collapse", overrides=(("schedule.warmup_epochs", 0.0),))
  assert suites.run_dir("W", a, 0) == suites.run_dir("W", b, 0)
  assert suites.run_dir("W", c, 0) != suites.run_dir("W", b, 0)
  assert len(reproduce_schedule.pending_runs(str(tmp_path), [a, b, c], [0, 1])) == 4
  # Overrides given as a mapping are kept as pairs sorted by key: one folder name.
  d = suites.Row("d", "mcl_x2", "t", overrides={"optim.lr": 0.03, "input.classes": (0, 1)})
  assert d.overrides == (("input.classes", (0, 1)), ("optim.lr", 0.03))


@pytest.mark.parametrize("suite", ["fashion_mnist", "digits"])
def test_every_row_of_a_suite_builds_its_config(suite):
  config_module, rows, tables = suites.load_suite(suite)
  assert len({r.name for r in rows}) == len(rows)
  for row in rows:
    assert row.table in tables, row
    config = suites.row_config(config_module, row, 3, smoke=True)
    assert config.seed == 3


def test_unknown_suite_is_one_sentence():
  with pytest.raises(ValueError, match="no mcl_jax/suites/nope.py"):
    suites.load_suite("nope")


def test_minutes_left_shares_queued_runs_among_workers():
  # Four 6-minute runs on two workers: when the first ends, its twin is about done and two
  # more remain, which take one more run's time together (not two runs' time).
  assert reproduce_schedule.minutes_left(
    [6.0], queued=2, running_for=[5.5], workers=2
  ) == pytest.approx((2 * 6.0 + 0.5) / 2)
  # One worker: the queue runs one after another.
  assert reproduce_schedule.minutes_left([4.0, 6.0], queued=3, running_for=[], workers=1) == 15.0
  # A long run still going bounds the wait from below.
  assert reproduce_schedule.minutes_left([10.0], queued=0, running_for=[1.0, 2.0], workers=2) == 9.0


def test_a_probe_takes_the_rows_data_but_not_its_recipe():
  module, rows, _ = suites.load_suite("fashion_mnist")
  (half_lr,) = suites.select_rows(rows, ["held_mocov2_mcl_x2_half_lr"])
  row_config = suites.row_config(module, half_lr, 0, smoke=False)
  probe_config = suites.row_config(module, half_lr, 0, smoke=False, variant="probe")
  assert row_config.optim.lr == 0.03
  assert probe_config.optim.lr == module.get_config("probe").optim.lr != 0.03
  assert tuple(probe_config.input.classes) == tuple(row_config.input.classes) == (0, 1, 2, 3, 4)


def test_unknown_row_is_one_sentence():
  _, rows, _ = suites.load_suite("fashion_mnist")
  with pytest.raises(ValueError, match="unknown row 'mcl_x9'"):
    suites.select_rows(rows, ["mcl_x9"])


@pytest.mark.skipif(
  not fashion_mnist.has_idx_files(fashion_mnist.DEBIAN_DIR),
  reason="apt-get install dataset-fashion-mnist",
)
def test_smoke_suite_trains_resumes_and_reports(tmp_path):
  _, rows, tables = suites.load_suite("fashion_mnist")
  chosen = suites.select_rows(rows, ["baseline", "held_mocov2"])
  workdir = str(tmp_path)
  reproduce_schedule.run_all("fashion_mnist", chosen, [0], workdir, workers=0, smoke=True)
  result = json.load(open(os.path.join(suites.run_dir(workdir, chosen[0], 0), "result.json")))
  assert np.asarray(result["eval"]["test"]["top1"]).shape == (3,)
  assert "collapsed" in result  # loop.fit's first collapse, or None
  moco = json.load(open(os.path.join(suites.run_dir(workdir, chosen[1], 0), "result.json")))
  assert len(moco["probe"]["test"]["top1"]) == 1 and len(moco["knn"]["test"]["knn_top1_k20"]) == 1
  assert set(moco["probe"]) == set(moco["knn"]) == {"test", "validation"}
  assert set(moco["fewshot"]) >= {"nearest_centroid_1shot", "logistic_regression_5shot"}
  logreg = moco["logreg_probe"]
  assert len(logreg["test"]["top1"]) == len(logreg["validation"]["top1"]) == 1
  assert logreg["c"][0] > 0
  # Finished runs are not repeated.
  assert reproduce_schedule.pending_runs(workdir, chosen, [0]) == []
  text = reproduce_report.write_report("fashion_mnist", rows, tables, [0], workdir)
  assert "baseline (2 independent)" in text and "MoCo v2 (1 network)" in text
  assert "LR probe members' mean" in text
