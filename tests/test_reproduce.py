"""The reproduction runner: rows x seeds, resumable, results.md and results.png.

Runs the Fashion-MNIST suite's smoke configs in this process (a few steps of `tiny`), so it
needs the Debian copy of Fashion-MNIST; the report functions are also tested on
hand-written results that need no data.
"""
import json
import os

import numpy as np
import pytest

from mcl_jax import reproduce
from mcl_jax.data import fashion_mnist

pytestmark = pytest.mark.xdist_group("reproduce")

COMMITTED_SSL = os.path.join(os.path.dirname(__file__), "..", "results", "fashion_mnist", "ssl")


def fake_result(row, seed, top1, trainer="supervised", collapsed=None):
  if trainer == "moco":
    return {"row": row, "seed": seed, "trainer": "moco", "wall_s": 60.0, "collapsed": collapsed,
            "knn": {"top1": top1, "top1_k20": top1, "val_top1": top1, "val_top1_k20": top1},
            "probe": {"top1": top1, "val_top1": top1},
            "logreg_probe": {"top1": [v + 0.05 for v in top1],
                             "val_top1": [v + 0.05 for v in top1]}}
  split = {"top1": top1, "top5": [1.0] * len(top1)}
  return {"row": row, "seed": seed, "trainer": trainer, "wall_s": 120.0, "collapsed": collapsed,
          "eval": {"test": split, "validation": split}}


def test_report_from_results(tmp_path):
  rows = [reproduce.Row("baseline", "baseline", "main"), reproduce.Row("mcl_x2", "mcl_x2", "main"),
          reproduce.Row("moco", "mocov2", "ssl")]
  values = {"baseline": [[0.80, 0.82, 0.85], [0.84, 0.82, 0.86]],
            "mcl_x2": [[0.83, 0.85, 0.87], [0.85, 0.85, 0.88]]}
  for row in rows[:2]:
    for seed, top1 in enumerate(values[row.name]):
      directory = reproduce.run_dir(str(tmp_path), row, seed)
      os.makedirs(directory)
      with open(os.path.join(directory, reproduce.RESULT_FILE), "w") as f:
        json.dump(fake_result(row.name, seed, top1), f)
  directory = reproduce.run_dir(str(tmp_path), rows[2], 0)
  os.makedirs(directory)
  with open(os.path.join(directory, reproduce.RESULT_FILE), "w") as f:
    json.dump(fake_result("moco", 0, [0.7], "moco"), f)
  text = reproduce.write_report("suite", rows, {"main": "Main", "ssl": "SSL"}, [0, 1],
                                str(tmp_path))
  # baseline: members' means 81.0 and 83.0 -> 82.00 +- 1.41; best 82 and 84; ensemble 85, 86.
  assert ("| baseline | 2 | 0 | 82.00 / 82.00 | 82.00 +- 1.41 | 83.00 +- 1.41 | 85.50 +- 0.71 |"
          in text)
  assert "| mcl_x2 | 2 | 0 |" in text and "### SSL" in text and "†" not in text
  # SSL: SGD probe 70.00 (per member, mean, best), then the logistic-regression probe 75.00.
  assert "| moco | 1 | 0 | 70.00 | 70.00 +- 0.00 | 70.00 +- 0.00 | 75.00 | 75.00 +- 0.00 |" in text
  assert os.path.getsize(tmp_path / "results.png") > 10_000
  summary = reproduce.row_summary([fake_result("b", 0, [0.8, 0.9, 0.95])])
  np.testing.assert_allclose(summary["best"], [90.0])


def test_rows_with_a_collapsed_run_count_them_and_carry_no_plain_number():
  first = {"step": 39, "member": 1, "signal": "contrastive_vs_chance", "value": 0.98}
  rows = [reproduce.Row("moco", "mocov2", "ssl"), reproduce.Row("mcl", "mocov2_mcl_x2", "ssl")]
  results = {"moco": [fake_result("moco", s, [0.7], "moco") for s in range(2)],
             "mcl": [fake_result("mcl", 0, [0.6, 0.62], "moco", collapsed=first),
                     fake_result("mcl", 1, [0.6, 0.64], "moco")]}
  del results["mcl"][1]["collapsed"]  # a run from before the record: counted as unread
  text = reproduce.format_tables(rows, {"ssl": "SSL"}, results)
  assert "| moco | 2 | 0 | 70.00 | 70.00 +- 0.00 |" in text
  line = next(l for l in text.splitlines() if l.startswith("| mcl |"))
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[:3] == ["mcl", "2", "1 (+1 unread)"]
  assert all(c.endswith(reproduce.COLLAPSE_MARK.strip()) for c in cells[3:-1]), cells
  assert reproduce.COLLAPSE_FOOTNOTE in text


def test_rows_sharing_seeds_get_the_paired_difference_and_its_interval():
  # Differences 1, 2, 3 points: mean 2, std 1, t(0.975, 2 dof) = 4.3027 -> +-2.484.
  mean, low, high = reproduce.paired_difference([1.0, 2.0, 3.0])
  assert mean == pytest.approx(2.0) and high - mean == pytest.approx(4.30265 / np.sqrt(3), 1e-4)
  assert mean - low == pytest.approx(high - mean)
  rows = [reproduce.Row("base", "baseline", "main"), reproduce.Row("mcl", "mcl_x2", "main"),
          reproduce.Row("lone", "mcl_x2", "main")]
  results = {"base": [fake_result("base", s, [0.80, 0.80, 0.80]) for s in range(3)],
             # members' mean up by 1, 2, 3 points on seeds 0, 1, 2; seed 3 has no partner.
             "mcl": [fake_result("mcl", s, [0.81 + s / 100] * 3) for s in range(4)],
             "lone": [fake_result("lone", 5, [0.9] * 3)]}  # no seed in common: no line
  text = reproduce.format_tables(rows, {"main": "Main"}, results)
  paired = [l for l in text.splitlines() if "paired by seed" in l]
  assert len(paired) == 1 and paired[0].startswith("- mcl - base, paired by seed (3 seeds: 0, 1, 2)")
  assert "members' mean +2.00 [-0.48, +4.48]" in paired[0]


@pytest.mark.skipif(not os.path.isdir(COMMITTED_SSL), reason="no committed SSL results")
@pytest.mark.parametrize("row,expected", [
    ("held_mocov2", None),
    ("held_mocov2_mcl_x2", {"step": 39, "member": 0, "signal": "contrastive_vs_chance"}),
    ("held_simclr_mcl_x2", None)])
def test_collapse_is_read_back_from_the_logs_of_older_runs(row, expected):
  """The committed Fashion-MNIST SSL runs (seed 0) were trained before the collapse signals
  were logged: read back from their logs, MoCo + MCL x2 sat at chance (ce/member_m over
  log(1 + K)) after its first epoch; MoCo alone and SimCLR + MCL x2 did not. Their
  result.json files hold the record the runner backfilled from the same logs."""
  module, rows, _ = reproduce.load_suite("fashion_mnist")
  (chosen,) = reproduce.select_rows(rows, [row])
  directory = reproduce.run_dir(COMMITTED_SSL, chosen, 0)
  result = json.load(open(os.path.join(directory, reproduce.RESULT_FILE)))
  found = reproduce.collapse_from_logs(directory, reproduce._config(module, chosen, 0, False),
                                       result["steps"])
  assert result.get("collapsed", found) == found
  if expected is None:
    assert found is None
  else:
    assert {k: found[k] for k in expected} == expected and found["value"] > 0.95


def test_rows_with_the_same_config_share_a_run(tmp_path):
  a = reproduce.Row("m2", "mcl_x2", "cohort")
  b = reproduce.Row("mcl_x2", "mcl_x2", "main")
  c = reproduce.Row("official", "mcl_x2", "collapse", overrides=(("schedule.warmup_epochs", 0.0),))
  assert reproduce.run_dir("W", a, 0) == reproduce.run_dir("W", b, 0)
  assert reproduce.run_dir("W", c, 0) != reproduce.run_dir("W", b, 0)
  assert len(reproduce._pending(str(tmp_path), [a, b, c], [0, 1])) == 4


def test_minutes_left_shares_queued_runs_among_workers():
  # Four 6-minute runs on two workers: when the first ends, its twin is about done and two
  # more remain, which take one more run's time together (not two runs' time).
  assert reproduce.minutes_left([6.0], queued=2, running_for=[5.5], workers=2) == \
      pytest.approx((2 * 6.0 + 0.5) / 2)
  # One worker: the queue runs one after another.
  assert reproduce.minutes_left([4.0, 6.0], queued=3, running_for=[], workers=1) == 15.0
  # A long run still going bounds the wait from below.
  assert reproduce.minutes_left([10.0], queued=0, running_for=[1.0, 2.0], workers=2) == 9.0


def test_a_probe_takes_the_rows_data_but_not_its_recipe():
  module, rows, _ = reproduce.load_suite("fashion_mnist")
  (half_lr,) = reproduce.select_rows(rows, ["held_mocov2_mcl_x2_half_lr"])
  row_config = reproduce._config(module, half_lr, 0, smoke=False)
  probe_config = reproduce._config(module, half_lr, 0, smoke=False, variant="probe")
  assert row_config.optim.lr == 0.03
  assert probe_config.optim.lr == module.get_config("probe").optim.lr != 0.03
  assert tuple(probe_config.input.classes) == tuple(row_config.input.classes) == (0, 1, 2, 3, 4)


def test_unknown_row_is_one_sentence():
  _, rows, _ = reproduce.load_suite("fashion_mnist")
  with pytest.raises(ValueError, match="unknown row 'mcl_x9'"):
    reproduce.select_rows(rows, ["mcl_x9"])


@pytest.mark.skipif(not fashion_mnist.has_idx_files(fashion_mnist.DEBIAN_DIR),
                    reason="apt-get install dataset-fashion-mnist")
def test_smoke_suite_trains_resumes_and_reports(tmp_path):
  _, rows, tables = reproduce.load_suite("fashion_mnist")
  chosen = reproduce.select_rows(rows, ["baseline", "held_mocov2"])
  workdir = str(tmp_path)
  reproduce.run_all("fashion_mnist", chosen, [0], workdir, workers=0, smoke=True)
  result = json.load(open(os.path.join(reproduce.run_dir(workdir, chosen[0], 0), "result.json")))
  assert np.asarray(result["eval"]["test"]["top1"]).shape == (3,)
  assert "collapsed" in result  # loop.fit's first collapse, or None
  moco = json.load(open(os.path.join(reproduce.run_dir(workdir, chosen[1], 0), "result.json")))
  assert len(moco["probe"]["top1"]) == 1 and len(moco["knn"]["top1_k20"]) == 1
  assert set(moco["fewshot"]) >= {"nearest_centroid_1shot", "logistic_regression_5shot"}
  assert len(moco["logreg_probe"]["top1"]) == 1 and moco["logreg_probe"]["c"][0] > 0
  # A run finished before the logistic-regression probe existed gets it from its exports.
  moco_file = os.path.join(reproduce.run_dir(workdir, chosen[1], 0), "result.json")
  older = {k: v for k, v in moco.items() if k != "logreg_probe"}
  json.dump(older, open(moco_file, "w"))
  module, _, _ = reproduce.load_suite("fashion_mnist")
  reproduce.add_missing_logreg_probes(module, chosen, [0], workdir, smoke=True)
  assert json.load(open(moco_file))["logreg_probe"] == moco["logreg_probe"]
  # And the collapse record, from its logged metrics (what fit reported, on the same logs).
  json.dump({k: v for k, v in moco.items() if k != "collapsed"}, open(moco_file, "w"))
  reproduce.add_missing_collapse_marks(module, chosen, [0], workdir, smoke=True)
  assert json.load(open(moco_file))["collapsed"] == moco["collapsed"]
  assert reproduce._pending(workdir, chosen, [0]) == []  # finished runs are not repeated
  text = reproduce.write_report("fashion_mnist", rows, tables, [0], workdir)
  assert "baseline (2 independent)" in text and "MoCo v2 (1 network)" in text
  assert "LR probe members' mean" in text
