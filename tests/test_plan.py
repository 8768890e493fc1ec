"""Every regime and every architecture family compiles for a TPU slice (`mcl_jax.plan`).

XLA's TPU compiler runs on this CPU host (libtpu, `pip install "jax[tpu]==0.10.2"`); the
tests skip with that reason where it is not installed. Each test compiles the regime's
real train step, as its task builds it, for compile-only `v5e:2x2` devices (4 chips) at
shrunken shapes (the `tiny` arch, 16 px, batch 8), and checks the properties a pod run
depends on: the memory bank is split over the chips and never gathered whole, the
gradients are all-reduced once per step (not once per member), nothing is float64 and
nothing calls back to the host. One xdist worker runs the module: libtpu's start-up and
the topology are paid once.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys

import jax
import numpy as np
import plan_checks
from plan_checks import assert_gradients_reduced_once
from plan_checks import shrunk
import pytest

from mcl_jax import plan
from mcl_jax.errors import ConfigError

pytestmark = [
  pytest.mark.xdist_group("plan_tpu"),
  pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="XLA's TPU compiler is not installed: pip install 'jax[tpu]==0.10.2'",
  ),
]
TOPOLOGY = "v5e:2x2"
CHIPS = 4


def compile_train(config):
  planned, result, _ = plan_checks.compile_train(config, TOPOLOGY, CHIPS)
  return planned, result


def num_elements(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def nbytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def assert_clean(result) -> None:
  assert not result["float64"], "a float64 array in the compiled step"
  assert not result["host_callbacks"], f"host callbacks: {result['host_callbacks']}"
  assert result["hbm_per_chip"]["fits"]
  assert result["flops_per_chip"] > 0


@pytest.fixture(scope="module", autouse=True)
def _topology():
  plan.topology_devices(TOPOLOGY)


def test_in_batch_step_reduces_the_gradients_once():
  planned, result = compile_train(shrunk("cifar100_resnet32:mcl_x2,smoke", model__arch="tiny"))
  assert_clean(result)
  assert_gradients_reduced_once(planned, result)
  assert planned.state.bank is None


def test_all_reduce_bytes_do_not_grow_faster_than_the_parameters():
  """M = 4 members: the gradient reduction is still one pass over the parameters."""
  planned, result = compile_train(
    shrunk("cifar100_resnet32:mcl_x4,smoke", model__arch="tiny", model__shared_stages=0)
  )
  assert_clean(result)
  assert_gradients_reduced_once(planned, result)


def compile_bank_step(layout, gather_chunk=0):
  config = shrunk(
    "imagenet_r18_x3:smoke",
    model__arch="tiny",
    model__shared_stages=1,
    input__synthetic_train_size=1000,
    bank__layout=layout,
    bank__gather_chunk=gather_chunk,
  )
  planned, result, compiled = plan_checks.compile_train(config, TOPOLOGY, CHIPS)
  assert_clean(result)
  assert_gradients_reduced_once(planned, result)
  return planned, result, compiled


def test_bank_step_keeps_the_bank_split_over_the_chips():
  planned, result, compiled = compile_bank_step("sharded")
  members, rows, dim = planned.state.bank.shape
  assert rows == 1000
  assert planned.state.bank.sharding.shard_shape((members, rows, dim)) == (
    members,
    rows // CHIPS,
    dim,
  )
  # The compiled per-chip program takes only its rows, and no op in it (no all-gather, no
  # copy) ever holds the whole bank.
  hlo = compiled.as_text()
  assert f"f32[{members},{rows // CHIPS},{dim}]" in hlo
  assert f"f32[{members},{rows},{dim}]" not in hlo


def test_a_chunked_gather_is_flagged_as_undercounted():
  """The chunked bank gather is a loop, whose body XLA's cost analysis counts once: the
  plan counts the loops and says so."""
  _, unchunked, _ = compile_bank_step("replicated")
  _, chunked, _ = compile_bank_step("replicated", gather_chunk=4)
  assert chunked["while_loops"] > unchunked["while_loops"]
  assert chunked["flops_per_chip"] < unchunked["flops_per_chip"]  # the undercount itself
  header = {"config": "c", "topology": TOPOLOGY, "chips": CHIPS, "chip": "TPU v5e"}
  text = plan.format_plan({**header, "global_batch": 8, "dtype": "float32", "train": chunked})
  assert "counts a loop's body once" in text


def test_a_replicated_bank_is_read_on_each_chip_without_moving_rows():
  """bank.layout="replicated": each chip holds the whole bank and reads its own examples'
  candidates from it; no collective carries bank rows (only the batch's [M, B, d]
  embeddings and [B] indices are gathered, for the update)."""
  planned, result, compiled = compile_bank_step("replicated")
  members, rows, dim = planned.state.bank.shape
  assert planned.state.bank.sharding.is_fully_replicated
  hlo = compiled.as_text()
  assert f"f32[{members},{rows},{dim}]" in hlo
  for line in hlo.splitlines():
    if re.search(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all)(-start)?\(", line):
      assert f"{rows},{dim}]" not in line, line  # no bank rows in any collective
  # Nor is the whole bank copied into another layout each step (what a rematerialised
  # gather of its rows made XLA:TPU do).
  whole_bank_copy = re.compile(rf"= f32\[{members},{rows},{dim}\]\S* copy(-start)?\(")
  assert not [line for line in hlo.splitlines() if whole_bank_copy.search(line)]


def test_moco_step_compiles():
  planned, result = compile_train(shrunk("mocov2_r18_x2:smoke"))
  assert_clean(result)
  assert_gradients_reduced_once(planned, result)


def test_simclr_step_compiles():
  planned, result = compile_train(
    shrunk(
      "fashion_mnist:simclr_mcl_x2,smoke",
      input__dataset="synthetic",
      model__arch="tiny",
      input__synthetic_train_size=64,
      input__train_subset=0,
      input__validation_size=0,
      model__num_classes=0,
    )
  )
  assert_clean(result)
  assert_gradients_reduced_once(planned, result)


def test_linear_probe_step_and_its_eval_step_compile():
  result = plan.plan(shrunk("lincls_r18:smoke"), TOPOLOGY)
  assert_clean(result["train"])
  assert_clean(result["eval"])
  # Only the classifier is trained: its gradient is the only parameter-sized reduction.
  assert result["train"]["collectives"]["all-reduce"]["max_bytes"] < 1 << 20


@pytest.mark.parametrize(
  "arch",
  [
    "resnet32",
    "wrn_16_2",
    "shufflenetv2_0.5x",
    "resnet18",
    # XLA:TPU compiles HCGNet's step several times slower than all the other families'
    # together (docs/TESTING.md): with --runslow only.
    pytest.param("hcgnet_a1", marks=pytest.mark.slow),
  ],
)
def test_every_architecture_family_compiles(arch):
  """One member, cross-entropy only (the cohort and MCL paths are the regimes' tests)."""
  planned, result = compile_train(
    shrunk("cifar100_resnet32:baseline,smoke", model__arch=arch, cohort__num_members=1)
  )
  assert_clean(result)
  assert_gradients_reduced_once(planned, result)


def test_bad_topology_and_batch_are_one_sentence():
  with pytest.raises(ConfigError, match="Unknown --topology"):
    plan.chip_spec("h100:8")
  with pytest.raises(ConfigError, match="libtpu does not know"):
    plan.topology_devices("v5e:3x7x9")
  with pytest.raises(ConfigError, match="global_batch_size"):
    plan.build(shrunk("cifar100_resnet32:mcl_x2,smoke", input__global_batch_size=6), TOPOLOGY)


def test_collective_parser_counts_async_pairs_once():
  hlo = """
  %ar = f32[256,4]{1,0} all-reduce(f32[256,4]{1,0} %g), replica_groups={}
  %ags = (bf16[8,16]{1,0}, bf16[32,16]{1,0}) all-gather-start(bf16[8,16]{1,0} %x)
  %agd = bf16[32,16]{1,0} all-gather-done((bf16[8,16]{1,0}, bf16[32,16]{1,0}) %ags)
  %t = (f32[3]{0}, s32[2]{0}) all-reduce(f32[3]{0} %a, s32[2]{0} %b)
  """
  found = plan.collectives(hlo)
  assert found["all-reduce"] == {
    "count": 2,
    "bytes": 4096 + 20,
    "max_bytes": 4096,
    "elements": 1024 + 5,
  }
  assert found["all-gather"] == {"count": 1, "bytes": 1024, "max_bytes": 1024, "elements": 512}


def test_command_line_errors_exit_2_with_one_sentence():
  run = subprocess.run(
    [sys.executable, "-m", "mcl_jax.plan", "--config=digits", "--topology=v9:2x2"],
    capture_output=True,
    text=True,
  )
  assert run.returncode == 2
  assert run.stderr.strip().splitlines()[-1].startswith("error: Unknown --topology")


def test_missing_libtpu_is_one_sentence(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
  )
  with pytest.raises(ConfigError, match=r"pip install 'jax\[tpu\]==0.10.2'"):
    plan.require_libtpu()


def test_command_line_prints_the_plan_and_appends_json(tmp_path):
  out = tmp_path / "plans.jsonl"
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "mcl_jax.plan",
      "--config=lincls_r18:smoke",
      f"--topology={TOPOLOGY}",
      "--noeval",
      f"--json_out={out}",
      "--config.input.image_size=16",
      "--batch=8",
    ],
    capture_output=True,
    text=True,
  )
  assert run.returncode == 0, run.stderr[-2000:]
  assert "not measurements" in run.stdout and "HBM/chip" in run.stdout
  result = json.loads(out.read_text())
  assert (result["topology"], result["chips"], result["global_batch"]) == (TOPOLOGY, CHIPS, 8)
  assert result["train"]["hbm_per_chip"]["fits"] and "eval" not in result
  assert result["strategy"] == "unroll"  # the config's `auto`, resolved for a TPU


def test_the_state_initialisation_compiles_for_tpu_with_its_compiler_options():
  """`train_state.initialise` passes XLA options (backend optimisations off) that must be
  accepted by the TPU compiler too, not only by XLA:CPU where the tests run it; the state
  comes out sharded as `state_shardings` says."""
  from mcl_jax import config_lib
  from mcl_jax import optim
  from mcl_jax import sharding
  from mcl_jax import train_state
  from mcl_jax.configs import common

  mesh = sharding.make_mesh(list(plan.topology_devices(TOPOLOGY)))
  c = common.smoke(config_lib.default_config(), arch="tiny", image_size=8)
  model = train_state.build_model(c, 10)
  tx, _ = optim.make_optimizer(c, 4)
  init = train_state.state_init(model, tx, (8, 8, 3), mesh.size, bank_rows=64)
  rng = jax.random.PRNGKey(0)
  shardings = train_state.state_shardings(jax.eval_shape(init, rng), mesh)
  with plan.no_persistent_cache():  # a compile-only TPU program cannot be cached
    compiled = (
      jax.jit(init, out_shardings=shardings)
      .lower(rng)
      .compile(compiler_options=train_state.INIT_COMPILER_OPTIONS)  # type: ignore[arg-type]
    )
  bank = compiled.output_shardings.bank
  assert bank.shard_shape((c.cohort.num_members, 64, c.model.embed_dim))[1] == 64 // CHIPS


def test_a_named_config_that_fails_is_reported_and_the_others_still_planned(tmp_path, monkeypatch):
  """`--all` / `--names`: a compile failure of one config is written to the JSON and does
  not lose the plans of the configs after it; a config error is printed and skipped."""
  import ml_collections

  def fake_plan(config, topology, *, with_eval):
    if config.seed == 1:
      raise RuntimeError("RESOURCE_EXHAUSTED: compile failed\nmore detail")
    if config.seed == 2:
      raise ConfigError("the batch does not divide over the chips.")
    return {"config": "c", "topology": topology}

  monkeypatch.setattr(plan, "plan", fake_plan)
  monkeypatch.setattr(plan, "format_plan", lambda result: "a plan")

  def config(seed):
    return ml_collections.ConfigDict({"seed": seed, "input": {"global_batch_size": 8}})

  out = tmp_path / "plans.jsonl"
  plans = plan.plan_configs(
    [("a", config(1)), ("b", config(2)), ("c", config(3))], TOPOLOGY, json_out=str(out)
  )
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert lines == [
    {
      "config_name": "a",
      "topology": TOPOLOGY,
      "error": "RuntimeError: RESOURCE_EXHAUSTED: compile failed",
    },
    {"config": "c", "topology": TOPOLOGY, "config_name": "c"},
  ]
  assert [p["config_name"] for p in plans] == ["c"]
  with pytest.raises(RuntimeError):  # a single --config fails loudly
    plan.plan_configs([(None, config(1))], TOPOLOGY)


def test_table_from_prints_one_row_per_plan_and_failure(tmp_path):
  """`mcl-plan --table_from=F`: the committed `--all` output as one markdown table, with
  failures, loops (undercounted) and plans that do not fit said in their rows."""
  train = {
    "hbm_per_chip": {"total": 3 * 2**30, "capacity": 16e9, "fits": True},
    "flops_per_step": 4.8e12,
    "step_seconds": 0.0138,
    "step_seconds_basis": "roofline (compiler estimate invalid): bytes accessed/HBM bandwidth",
    "images_per_second": 18527.0,
    "mfu": 0.11,
    "collectives": {"all-reduce": {"count": 71}, "all-gather": {"count": 104}},
    "while_loops": 0,
    "compile_seconds": 273.0,
  }
  good = {
    "config_name": "imagenet_r18_x3",
    "config": "resnet18 x3 (supervised)",
    "topology": "v5e:4x4",
    "global_batch": 256,
    "dtype": "bfloat16",
    "train": train,
  }
  looped = {
    **good,
    "config_name": "looped",
    "train": {**train, "while_loops": 2, "hbm_per_chip": {**train["hbm_per_chip"], "fits": False}},
  }
  failed = {"config_name": "broken", "topology": "v5e:4x4", "error": "RuntimeError: no"}
  out = tmp_path / "plans.jsonl"
  out.write_text("".join(json.dumps(p) + "\n" for p in (good, looped, failed)))
  run = subprocess.run(
    [sys.executable, "-m", "mcl_jax.plan", f"--table_from={out}"], capture_output=True, text=True
  )
  assert run.returncode == 0, run.stderr[-2000:]
  rows = [line for line in run.stdout.splitlines() if line.startswith("| ")][1:]
  assert len(rows) == 3
  assert rows[0].startswith(
    "| imagenet_r18_x3 | resnet18 x3 (supervised) | v5e:4x4 | 256, bfloat16 | "
    "3.00 of 14.9 GiB | 4.8 |"
  )
  assert (
    "13.80 ms (roofline)" in rows[0] and "18,527, 11.0%" in rows[0] and "| 71 / 104 |" in rows[0]
  )
  assert "(does not fit)" in rows[1] and "2 (undercounted)" in rows[1]
  assert rows[2].startswith("| broken | FAILED: RuntimeError: no |")
  bad = subprocess.run(
    [sys.executable, "-m", "mcl_jax.plan", f"--table_from={tmp_path / 'none.jsonl'}"],
    capture_output=True,
    text=True,
  )
  assert bad.returncode == 2 and "not a file of mcl-plan JSON lines" in bad.stderr


def _largest_that_fits(memory, capacity, unit, limit):
  fitting = [b for b in range(unit, limit + 1, unit) if (memory(b) or capacity + 1) <= capacity]
  return max(fitting, default=0)


@pytest.mark.parametrize(
  "name, memory, capacity, start, most_compiles",
  [
    # Linear (fixed part + activations): the line through two compiles finds the boundary,
    # a fourth confirms it.
    ("linear", lambda b: 10_000 + 37 * b, 10_000 + 37 * 3000, 256, 4),
    # Curved (buffer sizes rounded up, reuse): still exact, with a few more compiles.
    ("curved", lambda b: 5_000 + b * b // 40 + 64 * ((b + 511) // 512), 400_000, 128, 7),
    # Quadratic, then flat past the boundary (as when the compiler starts rematerialising):
    # the line through the first points overshoots; regula falsi and bisection recover.
    (
      "quadratic then flat",
      lambda b: 10**6 + b * b if b <= 2000 else 5 * 10**6 + 10 * b,
      4 * 10**6,
      256,
      9,
    ),
    # The config's batch does not fit: halve, then search above what fits.
    ("start too big", lambda b: 100 + 50 * b, 100 + 50 * 100, 1024, 7),
    # A batch the config cannot run (None) counts as not fitting; the line through the
    # batches that fit points past it, so the search bisects.
    ("config refuses", lambda b: None if b > 700 else 10 * b, 10**9, 256, 11),
    # Everything up to the limit fits.
    ("limit", lambda b: b, 10**9, 256, 3),
    # Nothing fits.
    ("none", lambda b: 10**6 + b, 10**5, 64, 3),
  ],
)
def test_max_batch_search_is_exact_in_few_compiles(name, memory, capacity, start, most_compiles):
  """plan.search_max_batch against every batch tried: the largest multiple of the unit
  that fits, with few calls of the (at real size, minutes-long) compile."""
  unit, limit = 16, 4096
  calls = []

  def compile_bytes(batch):
    calls.append(batch)
    return memory(batch)

  found = plan.search_max_batch(compile_bytes, capacity, start=start, unit=unit, limit=limit)
  assert found["max_global_batch"] == _largest_that_fits(memory, capacity, unit, limit), name
  assert len(calls) == len(set(calls)) <= most_compiles, (name, calls)
  assert all(b % unit == 0 and unit <= b <= limit for b in calls), calls
  assert found["bytes_per_chip"] == {b: memory(b) for b in calls}


def test_max_batch_compiles_the_real_step():
  """plan.max_batch on a tiny cohort whose step fits at any batch here, on a dataset of 10
  classes: class-aware batches of 2 per class stop at 20 (larger ones are refused by the
  config, so they do not count as fitting). Each try is a real TPU compile whose per-chip
  memory grows with the batch."""
  config = shrunk("cifar100_resnet32:mcl_x2,smoke", model__arch="tiny", input__image_size=8)
  lines = []
  found = plan.max_batch(config, TOPOLOGY, limit=24, report=lines.append)
  assert found["max_global_batch"] == 20
  tried = {int(b): used for b, used in found["tried"].items()}
  fitting = [tried[b] for b in sorted(tried) if b <= 20]
  assert len(fitting) >= 2 and fitting == sorted(fitting) and fitting[0] < fitting[-1]
  assert all(tried[b] is None for b in tried if b > 20)
  assert list(tried) == [8, 16, 20, 24], tried
  assert len(lines) == len(tried) and "per chip, fits (compiled in" in lines[0], lines
  at_max = found["train_at_max"]  # the plan of the step at the largest batch
  assert at_max["hbm_per_chip"]["total"] == tried[20] and at_max["flops_per_step"] > 0
  header = {"config": "c", "topology": TOPOLOGY, "chips": CHIPS, "chip": "v5e"}
  text = plan.format_plan({**header, "global_batch": 8, "dtype": "float32", "max_batch": found})
  assert "largest global batch that fits: 20 (" in text and "images/s" in text


def test_max_batch_search_is_exact_on_random_growing_curves():
  """Piecewise-linear memory with random kinks, slopes, capacity and start: always the
  exact answer, never a batch twice, and at most about twice bisection's compiles."""
  import random

  unit, limit = 16, 4096
  for seed in range(300):
    rng = random.Random(seed)
    kinks = sorted(rng.sample(range(unit, limit, unit), rng.randint(1, 5)))
    slopes = [rng.choice([0.5, 1, 5, 50, 500, 5000]) for _ in range(len(kinks) + 1)]

    def memory(b, kinks=kinks, slopes=slopes):
      used, left = 1000.0, 0
      for right, slope in zip([*kinks, limit + unit], slopes):
        used += slope * max(0, min(b, right) - left)
        left = right
      return used

    capacity = memory(rng.randrange(unit, limit)) + rng.random()
    calls = []

    def compile_bytes(b, memory=memory, calls=calls):
      calls.append(b)
      return memory(b)

    start = rng.choice([16, 64, 256, 1024])
    found = plan.search_max_batch(compile_bytes, capacity, start=start, unit=unit, limit=limit)
    assert found["max_global_batch"] == _largest_that_fits(memory, capacity, unit, limit), seed
    assert len(calls) == len(set(calls)) <= 20, (seed, calls)
