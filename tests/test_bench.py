"""The benchmark CLI (mcl_jax.bench): end to end on tiny settings, and its bookkeeping."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from mcl_jax import bench
from mcl_jax import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the CLI as `python -m mcl_jax.bench` would, then reports whether TensorFlow was
# imported on the way (absl's app.run ends with SystemExit).
RUNNER = """
import runpy, sys
sys.argv = ["mcl_jax.bench"] + sys.argv[1:]
try:
  runpy.run_module("mcl_jax.bench", run_name="__main__", alter_sys=True)
except SystemExit as e:
  if e.code:
    raise
print("TENSORFLOW_IMPORTED=%s" % any(m.split(".")[0] == "tensorflow" for m in sys.modules))
"""


def test_cli_end_to_end_without_tensorflow(tmp_path):
  out = tmp_path / "bench.jsonl"
  env = dict(os.environ)
  # Two devices: the batch really is split over the mesh, as in the trainer. Fast compiles.
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  cmd = [
    sys.executable,
    "-c",
    RUNNER,
    "--arch=tiny",
    "--members=2",
    "--strategies=unroll",
    "--batch=16",
    "--image_size=8",
    "--steps=2",
    "--warmup=1",
    "--mcl=on",
    f"--json_out={out}",
  ]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "TENSORFLOW_IMPORTED=False" in proc.stdout
  assert bench.TABLE_HEADER in proc.stdout
  records = [json.loads(line) for line in out.read_text().splitlines()]
  stdout_records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert stdout_records == records
  assert [r["mcl"] for r in records] == [True]
  for r in records:
    assert set(r) == set(bench.RECORD_KEYS)
    assert (r["arch"], r["members"], r["strategy"], r["batch"]) == ("tiny", 2, "unroll", 16)
    assert r["num_devices"] == 2 and r["backend"] == "cpu" and r["steps"] == 2
    assert 0 < r["step_s_p10"] <= r["step_s_median"] <= r["step_s_p90"]
    assert r["member_images_per_s"] == pytest.approx(2 * 16 / r["step_s_median"])
    assert r["model_flops"] > 0 and r["compile_s"] > 0 and r["compiled_bytes"] > 0
    assert r["mfu"] is None and r["device_peak_bytes"] is None  # CPU: no peak, no stats
    assert r["loss"] == r["loss"]  # not NaN


def test_the_step_is_the_supervised_tasks_own():
  """bench builds the task `mcl-train` would build (config validated, loop.prepare,
  supervised.build_task) and feeds it the batches of the task's own source."""
  import jax

  from mcl_jax import sharding
  from mcl_jax import supervised

  mesh = sharding.make_mesh(jax.devices()[:1])
  s = bench.Setting("tiny", 2, "unroll", True, "float32", 16, 8, 10)
  task, state = bench.build(s, mesh, abstract=True)
  assert isinstance(task, supervised.SupervisedTask)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
  config = task.setup.config
  assert (config.input.dataset, config.cohort.num_members, config.model.arch) == (
    "synthetic",
    2,
    "tiny",
  )
  assert task.num_classes == 10 and config.input.samples_per_class == 2
  batches = bench.task_batches(task)
  assert len(batches) == 2 and set(batches[0]) == {"index"}  # gathered on device
  assert batches[0]["index"].shape == (16,)
  off = bench.make_config(dataclasses.replace(s, mcl=False))
  assert not any(off.loss[f"{t}_weight"] for t in ("vcl", "icl", "soft_vcl", "soft_icl"))


def test_class_aware_batches_fit_the_classes():
  assert bench.samples_per_class(128, 100) == 2  # 64 classes of 2
  assert bench.samples_per_class(256, 100) == 4  # 128 pairs > 100 classes: 64 of 4
  assert bench.samples_per_class(16, 10) == 2


def test_settings_deduplicate():
  todo = bench.settings(
    "resnet32", [1, 2], ["vmap", "auto", "unroll", "map"], "both", "float32", 128, 32, 100, 0, "cpu"
  )
  got = [(s.members, s.strategy, s.mcl, auto) for s, auto in todo]
  auto = models.resolve_strategy("auto", "cpu", "resnet32")
  assert got[0] == (1, auto, False, True)  # one M = 1 run: CE only, the auto strategy
  assert len(got) == 1 + 3 * 2
  assert {(m, st) for m, st, _, _ in got[1:]} == {(2, "vmap"), (2, "unroll"), (2, "map")}
  assert all(a == (st == auto) for m, st, _, a in got[1:])
  on_gpu = bench.settings(
    "resnet32", [2], ["auto", "unroll"], "on", "float32", 128, 32, 100, 0, "gpu"
  )
  assert [(s.strategy, a) for s, a in on_gpu] == [("vmap", True), ("unroll", False)]


def test_peak_lookup_prefers_the_most_specific_device_name():
  """'H100 PCIe' and 'TPU v5 lite' contain the names of faster parts ('H100', 'TPU v5'):
  the lookup must not stop at the shorter match."""
  h100 = bench.peak_tflops("NVIDIA H100 80GB HBM3", "gpu", "bfloat16")
  pcie = bench.peak_tflops("NVIDIA H100 PCIe", "gpu", "bfloat16")
  assert pcie[1] == "H100 PCIe bfloat16" and pcie[0] < h100[0]
  lite = bench.peak_tflops("TPU v5 lite", "tpu", "bfloat16")
  v5p = bench.peak_tflops("TPU v5", "tpu", "bfloat16")
  assert lite[1] == "TPU v5 lite bfloat16" and lite[0] < v5p[0]
  assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "gpu", "float32")[0] < h100[0]  # tf32


def test_no_peak_on_cpu():
  assert bench.peak_tflops("cpu", "cpu", "float32")[0] is None


def record(members, strategy, mcl, step, auto=True, cpu=None):
  return {
    "arch": "a",
    "dtype": "float32",
    "batch": 8,
    "image_size": 8,
    "members": members,
    "strategy": strategy,
    "mcl": mcl,
    "auto": auto,
    "step_s_median": step,
    "cpu_s_median": cpu,
  }


def test_ratios():
  records = [
    record(1, "unroll", False, 1.0, cpu=2.0),
    record(2, "unroll", False, 1.8, cpu=3.0),
    record(2, "unroll", True, 2.0),
    record(2, "map", False, 3.0, auto=False),
    record(2, "map", True, 3.3, auto=False),
  ]
  lines = bench.ratios(records)
  assert lines == [
    "cohort overhead a M=2 float32 unroll (CE only): 0.900 (host CPU time: 0.750)  (target <= 1.0)",
    "MCL overhead a M=2 float32 unroll: 1.111  (target <= 1.05)",
    "MCL overhead a M=2 float32 map: 1.100  (target <= 1.05)",
  ]


def test_model_flops_falls_back_to_the_host_cpu_when_the_backend_counts_nothing(monkeypatch):
  # XLA:GPU returned no count for the unoptimised program (H200, jax 0.11): the same
  # program is then counted on one host CPU device, and the count is the global step's.
  import jax

  from mcl_jax import sharding as sharding_lib

  s = bench.Setting("tiny", 2, "unroll", True, "float32", batch=16, image_size=8, num_classes=10)
  mesh = sharding_lib.make_mesh(jax.devices()[:2])
  direct = bench._lowered_flops(s, mesh)
  real, meshes = bench._lowered_flops, []

  def counts_nothing_on_the_mesh(setting, m):
    meshes.append(m.devices.size)
    return None if m.devices.size > 1 else real(setting, m)

  monkeypatch.setattr(bench, "_lowered_flops", counts_nothing_on_the_mesh)
  assert meshes == [] and direct > 0
  assert bench.model_flops(s, mesh) == pytest.approx(direct, rel=1e-3)
  assert meshes == [2, 1]
