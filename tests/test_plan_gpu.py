"""`mcl-plan` for NVIDIA GPUs: a config's train step compiled by XLA's GPU compiler for
compile-only GPUs (`--topology=h100:1x1x8`), with no GPU present.

The compiler is JAX's CUDA plugin (`pip install "jax[cuda12]==0.10.2"`, about 5.5 GB of
CUDA wheels), which the main virtualenv does not hold: the tests that compile for GPUs
skip with that reason there, and run where the wheels are installed (with
JAX_PLATFORMS=cpu on a host without a GPU). The rest runs everywhere: the one-sentence
errors, the GPU descriptions of mcl_jax/gpu_specs/ against the chip table, the time
estimate's basis, and the FLOP count of a partitioned program (on the CPU devices).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import plan_checks
from plan_checks import assert_gradients_reduced_once
from plan_checks import shrunk
import pytest

from mcl_jax import plan
from mcl_jax.errors import ConfigError

# Without a GPU driver the CUDA plugin's start-up check fails and it does not register;
# compiling needs no GPU (plan sets this too, but only before JAX loads its plugins).
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def _cuda_installed() -> bool:
  try:
    return all(importlib.util.find_spec(name) is not None for name in plan.CUDA_MODULES)
  except ModuleNotFoundError:
    return False


CUDA = _cuda_installed()
needs_cuda = pytest.mark.skipif(
  not CUDA, reason="XLA's GPU compiler is not installed: pip install 'jax[cuda12]==0.10.2'"
)
pytestmark = pytest.mark.xdist_group("plan_gpu")
TOPOLOGY = "h100:1x1x8"
GPUS = 8


# ----------------------------------------------------------------------------- everywhere


def test_unknown_gpu_or_shape_is_one_sentence_listing_the_choices():
  for topology in ("v100:1x1x8", "h100:8", "h100:1x8", "a100", "h100:0x1x8"):
    with pytest.raises(ConfigError, match="Unknown --topology") as e:
      plan.chip_spec(topology)
    assert "h100, a100" in str(e.value) and "v4" in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
  spec = plan.chip_spec("H100:1x2x8")
  assert (spec.platform, spec.bf16_tflops, spec.hbm_gbps) == ("cuda", 989.5, 3350.0)
  assert plan.chip_spec("v5e:2x2").platform == "tpu"
  # float32 steps run on the TF32 Tensor Cores at XLA:GPU's default precision (half the
  # BF16 rate); TPUs keep the bf16 peak (default precision: bfloat16 passes).
  assert (spec.peak_tflops("float32"), spec.peak_tflops("bfloat16")) == (494.5, 989.5)
  assert plan.GPUS["a100"].peak_tflops("float32") == 156.0
  assert plan.chip_spec("v5e:2x2").peak_tflops("float32") == 197.0


def test_missing_cuda_wheels_are_one_sentence_naming_the_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    "find_spec",
    lambda name, *a: None if name in plan.CUDA_MODULES else real(name, *a),
  )
  with pytest.raises(ConfigError, match=r"pip install 'jax\[cuda12\]==0.10.2'") as e:
    plan.require_cuda_compiler()
  assert "\n" not in str(e.value)


@pytest.mark.skipif(CUDA, reason="the CUDA wheels are installed here")
def test_command_line_without_the_cuda_wheels_exits_2_with_one_sentence():
  run = subprocess.run(
    [sys.executable, "-m", "mcl_jax.plan", "--config=digits", f"--topology={TOPOLOGY}"],
    capture_output=True,
    text=True,
  )
  assert run.returncode == 2, run.stderr[-2000:]
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("error: GPU plans need XLA's GPU compiler"), last
  assert "pip install 'jax[cuda12]==0.10.2'" in last


def _fields(text: str) -> dict[str, str]:
  """The `key: value` fields of a protobuf text file (nested keys joined by dots), after
  checking that every line is a field, an opening or a closing brace, or a comment."""
  fields: dict[str, str] = {}
  path: list[str] = []
  for number, raw in enumerate(text.splitlines(), 1):
    line = raw.split("#")[0].strip()
    if not line:
      continue
    # One-line messages: `value { a: 1 b: 2 }`.
    inline = re.fullmatch(r"(\w+) \{ (.*) \}", line)
    if inline:
      for key, value in re.findall(r"(\w+): (\S+)", inline.group(2)):
        fields[".".join([*path, inline.group(1), key])] = value
      continue
    opening = re.fullmatch(r"(\w+) \{", line)
    field = re.fullmatch(r"(\w+): (\"[^\"]*\"|[\w.]+)", line)
    if opening:
      path.append(opening.group(1))
    elif line == "}":
      assert path, f"line {number}: unbalanced brace"
      path.pop()
    else:
      assert field, f"line {number}: not a protobuf text field: {raw!r}"
      fields[".".join([*path, field.group(1)])] = field.group(2)
  assert not path, "unclosed message"
  return fields


@pytest.mark.parametrize("name", sorted(plan.GPUS))
def test_gpu_descriptions_agree_with_the_chip_table_and_cite_their_sources(name):
  spec = plan.GPUS[name]
  text = plan.gpu_target_config(spec)
  for source in ("[DS]", "[WP]", "[PG]", "datasheet", "whitepaper", "Programming Guide"):
    assert source in text, f"{spec.target_config} does not cite {source}"
  fields = _fields(text)
  info = "gpu_device_info."
  # The same memory and bandwidth as the chip table that the plan's figures use.
  assert float(fields[info + "device_memory_size"]) == spec.hbm_bytes
  assert float(fields[info + "memory_bandwidth"]) == spec.hbm_gbps * 1e9
  # The Tensor Core rates given to XLA are the datasheet's dense peaks (within 1%):
  # SMs x Tensor Cores per SM x FMAs per clock x 2 x clock.
  rates = re.findall(
    r"key: (\d+)\s+value \{ clock_rate_ghz: ([\d.]+) units_per_core: (\d+) ops_per_clock: "
    r"(\d+) \}",
    text,
  )
  by_type = {int(k): (float(c), int(u), int(o)) for k, c, u, o in rates}
  # XLA's PrimitiveType BF16 = 16; F32 = 11, at the TF32 rate.
  for primitive, dtype in ((16, "bfloat16"), (11, "float32")):
    clock, units, ops = by_type[primitive]
    peak = int(fields[info + "core_count"]) * units * ops * 2 * clock * 1e9
    assert abs(peak / (spec.peak_tflops(dtype) * 1e12) - 1) < 0.01, (dtype, peak)
  assert fields["platform_name"] == '"CUDA"'
  assert fields[info + "name"] == fields["device_description_str"]


class _FakeCompiled:
  """What `analyse` reads of a compiled XLA:GPU program: no cost analysis."""

  class _Memory:
    argument_size_in_bytes, output_size_in_bytes, alias_size_in_bytes = 6 * 2**30, 2**30, 2**30
    temp_size_in_bytes, generated_code_size_in_bytes = 60 * 2**30, 0

  def memory_analysis(self):
    return self._Memory()

  def cost_analysis(self):
    return None

  def as_text(self):
    return (
      '%c = (bf16[8,64,56,56]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), custom_call_target="'
      '__cudnn$convForward"\n'
      "%ar = bf16[1024]{0} all-reduce-start(bf16[1024]{0} %g), replica_groups={}\n"
    )


def test_a_gpu_step_time_is_the_compute_bound_and_says_so():
  spec = plan.GPUS["h100"]
  result = plan.analyse(
    _FakeCompiled(),
    spec,
    num_chips=8,
    batch_size=256,
    compile_s=1.0,
    partitioned={"flops": 989.5e9, "bytes accessed": 3.35e12},
  )
  assert result["step_seconds"] == pytest.approx(1e-3)
  assert result["step_seconds_basis"].startswith("compute bound only")
  assert result["bytes_accessed_per_chip"] is None and result["roofline_memory_seconds"] is None
  assert result["unfused_memory_seconds"] == pytest.approx(1.0)
  assert result["flops_per_step"] == pytest.approx(8 * 989.5e9)
  assert "after SPMD partitioning" in result["flops_basis"]
  assert result["images_per_second"] == pytest.approx(256e3)
  assert result["custom_calls"] == {"__cudnn$convForward": 1}
  assert result["collectives"]["all-reduce"]["bytes"] == 2048
  hbm = result["hbm_per_chip"]
  assert hbm["total"] == 66 * 2**30 and hbm["fits"]  # 70.9 GB of 80 GB...
  assert not hbm["fits_default_preallocation"]  # ...but over JAX's default 75% of them
  text = plan.format_plan(
    {
      "config": "x",
      "topology": TOPOLOGY,
      "chips": 8,
      "chip": spec.kind,
      "platform": "cuda",
      "global_batch": 256,
      "dtype": "bfloat16",
      "hbm_gbps_per_chip": spec.hbm_gbps,
      "train": result,
    }
  )
  assert "XLA:GPU compiler estimates" in text and "compute bound only" in text
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION" in text and "unfused ops would move" in text


def test_partitioned_cost_counts_one_devices_work():
  """FLOPs of the per-device program after SPMD partitioning (what a GPU plan reports),
  here on the 8 CPU devices: a matmul split over 8 devices costs 1/8 of its FLOPs per
  device, and a shard_map body (already one device's work) its own FLOPs, not 1/8 of them.
  The lowered program's count would give the first, but 1/8 of the second."""
  devices = jax.devices("cpu")[:8]
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x = jax.ShapeDtypeStruct((8 * 64, 256), jnp.float32, sharding=split)
  w = jax.ShapeDtypeStruct((256, 128), jnp.float32, sharding=whole)

  def per_device_flops(fn) -> float:
    # A compile served from the persistent cache (the suite's) would dump nothing.
    with plan.no_persistent_cache(), tempfile.TemporaryDirectory() as dump:
      jax.jit(fn).lower(x, w).compile(
        compiler_options={**plan.PARTITIONED_DUMP, "xla_dump_to": dump}
      )
      return plan.partitioned_cost(dump)["flops"]

  matmul = 2 * 64 * 256 * 128  # one device's rows
  assert per_device_flops(lambda x, w: x @ w) == matmul

  def local(x, w):  # inside: [64, 256] rows of one device, then [256, 256] summed over all
    return jax.lax.psum(x.T @ x, "data") + 0 * w.sum()

  spec = jax.sharding.PartitionSpec
  mapped = jax.shard_map(local, mesh=mesh, in_specs=(spec("data"), spec()), out_specs=spec())
  flops = per_device_flops(lambda x, w: mapped(x, w))
  assert 2 * 64 * 256 * 256 <= flops < 1.1 * 2 * 64 * 256 * 256, flops


# ----------------------------------------------------------------------------- with the CUDA wheels


def compile_train(config, topology=TOPOLOGY):
  return plan_checks.compile_train(config, topology, GPUS, dtype=config.model.dtype)


@needs_cuda
def test_the_gpu_descriptions_make_eight_compile_only_gpus():
  for topology, kind in (
    ("h100:1x1x8", "NVIDIA H100 80GB HBM3"),
    ("a100:1x1x8", "NVIDIA A100-SXM4-80GB"),
  ):
    devices = plan.topology_devices(topology)
    assert len(devices) == GPUS and {d.device_kind for d in devices} == {kind}
    assert {d.platform for d in devices} == {"gpu"}
  assert len(plan.topology_devices("h100:1x2x8")) == 16  # two hosts of 8
  with pytest.raises(ConfigError, match="CUDA plugin cannot make"):
    plan._gpu_devices("h100:0x0x0", plan.GPUS["h100"])  # pylint: disable=protected-access


@needs_cuda
def test_a_cohort_step_compiles_for_h100s_into_cudnn_convolutions_and_one_gradient_all_reduce():
  planned, result, _ = compile_train(shrunk("cifar100_resnet32:mcl_x2,smoke", model__arch="tiny"))
  assert {d.device_kind for d in planned.mesh.devices.flat} == {"NVIDIA H100 80GB HBM3"}
  calls = result["custom_calls"]
  assert any(k.startswith("__cudnn$conv") and "Backward" in k for k in calls), calls
  assert any(k.startswith("__cudnn$conv") and "Forward" in k for k in calls), calls
  assert_gradients_reduced_once(planned, result)
  assert not result["float64"] and not result["host_callbacks"]
  hbm = result["hbm_per_chip"]
  assert hbm["fits"] and hbm["fits_default_preallocation"] and 0 < hbm["total"] < 2**30
  assert result["flops_per_chip"] > 0 and result["flops_per_step"] == 8 * result["flops_per_chip"]
  assert result["step_seconds_basis"].startswith("compute bound only")
  peak = plan.GPUS["h100"].peak_tflops(planned.config.model.dtype)
  assert result["step_seconds"] == pytest.approx(result["flops_per_chip"] / (peak * 1e12))


@needs_cuda
def test_a_bank_step_on_gpus_keeps_the_bank_sharded_or_replicated():
  for layout, rows_per_gpu in (("sharded", 1000 // GPUS), ("replicated", 1000)):
    config = shrunk(
      "imagenet_r18_x3:smoke",
      model__arch="tiny",
      model__shared_stages=1,
      input__synthetic_train_size=1000,
      input__global_batch_size=16,
      bank__layout=layout,
    )
    planned, result, compiled = compile_train(config)
    members, rows, dim = planned.state.bank.shape
    assert rows == 1000
    assert planned.state.bank.sharding.shard_shape((members, rows, dim))[1] == rows_per_gpu
    assert f"f32[{members},{rows_per_gpu},{dim}]" in compiled.as_text()
    assert_gradients_reduced_once(planned, result)
    assert result["hbm_per_chip"]["fits"] and result["flops_per_chip"] > 0


@needs_cuda
def test_command_line_plans_a100s_and_appends_json(tmp_path):
  out = tmp_path / "plans.jsonl"
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "mcl_jax.plan",
      "--config=cifar100_resnet32:mcl_x2,smoke",
      "--topology=a100:1x1x8",
      "--noeval",
      f"--json_out={out}",
      "--config.model.arch=tiny",
      "--config.input.image_size=16",
      "--batch=8",
    ],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert run.returncode == 0, run.stderr[-2000:]
  assert "XLA:GPU compiler estimates" in run.stdout and "custom calls: __cudnn$" in run.stdout
  result = json.loads(out.read_text())
  assert (result["platform"], result["chips"], result["chip"]) == (
    "cuda",
    GPUS,
    "NVIDIA A100 SXM4 80GB",
  )
  assert result["bf16_tflops_per_chip"] == 312.0 and "eval" not in result
  assert result["train"]["hbm_per_chip"]["fits"]
