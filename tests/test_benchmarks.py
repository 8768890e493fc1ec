"""The benchmark scripts: the GPU comparison runs end to end in its CPU mode, and the
PyTorch step it times computes what the JAX step computes."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
pytestmark = pytest.mark.xdist_group("benchmarks")


def test_the_torch_port_computes_the_jax_losses():
  torch = pytest.importorskip("torch")
  import torch_mcl

  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 16, 8))
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  labels = np.repeat(np.arange(8), 2)
  ours = losses.batch_mcl(
    jnp.asarray(z, jnp.float32), jnp.asarray(labels), tau=0.1, kd_temperature=3.0
  )
  theirs = torch_mcl.mcl_terms(
    [torch.tensor(x, dtype=torch.float64) for x in z], torch.tensor(labels)
  )
  for name, value in zip(("vcl", "icl", "soft_vcl", "soft_icl"), theirs):
    np.testing.assert_allclose(float(ours[name]), float(value), rtol=2e-5, err_msg=name)


def run_gpu_script_on_cpu(out, **env_vars) -> subprocess.CompletedProcess:
  """`benchmarks/gpu.sh --cpu` writing to `out`, on one CPU device (as a GPU machine has
  one GPU); fails the test unless it exits 0."""
  env = dict(os.environ, OUT=str(out), PY=sys.executable, JAX_PLATFORMS="cpu", **env_vars)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    ["bash", "benchmarks/gpu.sh", "--cpu"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def test_gpu_script_runs_end_to_end_in_cpu_mode(tmp_path):
  pytest.importorskip("torch")
  run_gpu_script_on_cpu(tmp_path, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  records = [json.loads(line) for line in open(tmp_path / "bench.jsonl")]
  assert {(r["arch"], r["members"], r["dtype"]) for r in records} >= {
    ("tiny", 1, "float32"),
    ("tiny", 2, "float32"),
    ("tiny", 2, "bfloat16"),
  }
  assert all(r["step_s_median"] > 0 for r in records)
  torch_record = json.loads(open(tmp_path / "torch.jsonl").readline())
  assert torch_record["framework"] == "torch" and torch_record["step_s_median"] > 0
  epoch = json.loads(open(tmp_path / "epoch.jsonl").readline())
  assert epoch["steps"] == 4 and epoch["seconds"] > 0
  summary = open(tmp_path / "summary.md").read()
  assert "| PyTorch code |" in summary and "s per 390-step epoch" in summary
  assert json.loads(open(tmp_path / "ceiling.json").read())["tflops"] > 0


def test_gpu_script_skips_what_its_budget_does_not_cover_and_still_summarises(tmp_path):
  proc = run_gpu_script_on_cpu(tmp_path, GPU_BUDGET_S="1")
  assert proc.stdout.count("skipped: budget of 1s spent") == 5
  assert "| arch | M | strategy |" in open(tmp_path / "summary.md").read()


def test_count_flops_fills_what_the_backend_left_out(tmp_path):
  setting = dict(
    arch="tiny",
    members=2,
    strategy="vmap",
    mcl=True,
    dtype="float32",
    batch=16,
    image_size=8,
    num_classes=10,
    shared_stages=0,
  )
  counted = {**setting, "model_flops": 5.0, "step_s_median": 0.5, "peak_tflops": 2.0}
  empty = {**counted, "model_flops": None, "mfu": None, "num_devices": 1}
  (tmp_path / "in.jsonl").write_text(json.dumps(counted) + "\n" + json.dumps(empty) + "\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [
      sys.executable,
      "benchmarks/count_flops.py",
      str(tmp_path / "in.jsonl"),
      str(tmp_path / "out.jsonl"),
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  kept, filled = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
  assert kept == counted  # a record with a count is copied unchanged
  from mcl_jax import bench

  assert filled["model_flops"] > 1e6 and filled["model_flops_basis"] == "host CPU count"
  assert filled["mfu"] == pytest.approx(filled["model_flops"] / 0.5 / 2e12)
  # The same count the benchmark makes of the unroll program on one host CPU device.
  import jax

  from mcl_jax import sharding as sharding_lib

  mesh = sharding_lib.make_mesh(jax.devices("cpu")[:1])
  direct = bench.model_flops(bench.Setting(**setting), mesh)
  assert filled["model_flops"] == pytest.approx(direct, rel=1e-3)
