r"""Benchmark of the real train step: `python -m mcl_jax.bench`.

Times the supervised task's own compiled step (`supervised.SupervisedTask`, built from a
config by `loop.prepare` and `supervised.build_task` as `mcl-train` builds it: the step,
its state shardings, the donated state, the source's on-device gather and augmentation)
on the task's own batches. The config is mcl_jax/configs/default.py with the measured
setting's fields on the synthetic in-memory dataset: one batch of random uint8 images,
class-aware (2 samples per class, docs/SPEC.md 4; more per class when the batch has more
pairs than there are classes), so every row of the in-batch contrastive loss has a
positive. Every architecture gets the in-memory path's preprocessing (gather by index, crop
and flip, normalise, all on device; a streamed ImageNet batch arrives cropped on the host).
No dataset on disk, and no TensorFlow: nothing on this module's import path imports it
(tests/test_bench.py checks).

  python -m mcl_jax.bench --arch=resnet32 --members=1,2,4 --strategies=vmap,unroll,map \
      --batch=128 --mcl=both --json_out=bench.jsonl

Per configuration (arch, members M, strategy, MCL on/off, dtype) it reports:
  compile_s      trace + lower + XLA compile of the step
  step_s_*       median, p10, p90 of `--steps` timed steps after `--warmup` steps, each
                 one ended by block_until_ready on the new state and the metrics
  member_images_per_s   M * B / median step time
  model_flops    FLOPs of one step, from XLA's cost analysis of the step lowered with the
                 `unroll` strategy before optimisation. Strategy-independent on purpose:
                 XLA's analysis counts a while loop's body once, so the compiled `map`
                 step would report about 1/M of its real work (`xla_flops` is that raw
                 number of the compiled executable, for reference).
  mfu            model_flops / step time / (peak TFLOP/s x devices); omitted when the peak
                 is unknown (CPU). The peak comes from --peak_tflops or PEAK_TFLOPS below.
  device_peak_bytes   the device's peak_bytes_in_use (None where the backend reports no
                 memory stats, e.g. CPU). A process high-water mark: run with --isolate for
                 a per-configuration figure. compiled_bytes (arguments + outputs + temps
                 - aliased, from XLA's memory analysis) is per configuration everywhere.
  cpu_s_median   median host CPU time (all threads of this process) per timed step. On a
                 shared CPU host the wall time grows with other people's load; the CPU
                 time much less, so compare CPU-only figures in both.
  loadavg        os.getloadavg() before and after the configuration (shared machines).

The four MCL terms are on (`--mcl=on`, the default weights of mcl_jax/configs/default.py) or off
(`off`: cross-entropy only, every MCL weight 0, so `supervised.total_loss` skips them), or both.
With one member the MCL terms do not exist, so M = 1 runs once (CE only) and once only,
whatever strategies are asked for: every strategy runs the same single network.

The summary after the table gives the two ratios the README states:
  cohort overhead = step(M, auto strategy, CE only) / (M * step(1))     target <= 1.0
  MCL overhead    = step(M, strategy, MCL on) / step(M, strategy, CE only)   target <= 1.05
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import dataclasses
import gc
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

from absl import app
from absl import flags
import numpy as np

if TYPE_CHECKING:  # Imported where used: the CLI's flags and `--help` need no JAX.
  from jax.sharding import Mesh
  import ml_collections

  from mcl_jax import supervised

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command's flags, defined when it runs (importing this module defines none)."""
  flags.DEFINE_string("arch", "resnet32", "Backbone (a docs/SPEC.md name, or 'tiny' for tests).")
  flags.DEFINE_list("members", ["1", "2", "4"], "Cohort sizes M to measure.")
  flags.DEFINE_list(
    "strategies",
    ["vmap", "unroll", "map"],
    "Cohort strategies: vmap, unroll, map, auto (auto: what "
    "mcl_jax.models.resolve_strategy picks on this backend).",
  )
  flags.DEFINE_integer("batch", 128, "Global batch size B (every member sees the same B images).")
  flags.DEFINE_integer("image_size", 32, "Square input size.")
  flags.DEFINE_integer(
    "num_classes", 0, "0: 100 for CIFAR archs, 1000 for ImageNet ResNets, 10 for tiny."
  )
  flags.DEFINE_integer("shared_stages", 0, "model.shared_stages (0: fully independent members).")
  flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16"],
    "Compute dtype (params, optimizer state, BN stats stay float32).",
  )
  flags.DEFINE_enum(
    "mcl", "on", ["on", "off", "both"], "The four MCL terms on, off (cross-entropy only), or both."
  )
  flags.DEFINE_integer("steps", 10, "Timed steps per configuration.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  flags.DEFINE_float(
    "peak_tflops",
    None,
    "Peak TFLOP/s of one device for MFU (default: "
    "PEAK_TFLOPS by device kind and dtype; none on CPU).",
  )
  flags.DEFINE_string("json_out", None, "Append one JSON line per configuration to this file.")
  flags.DEFINE_bool(
    "isolate",
    False,
    "Run every configuration in a fresh process (a clean "
    "device_peak_bytes per configuration; costs a start-up per configuration).",
  )
  flags.DEFINE_integer("seed", 0, "Seed of params and synthetic data.")


# Dense (no sparsity) peak TFLOP/s of one device, from the vendors' data sheets. Matched as
# a substring of jax.Device.device_kind, first match wins (so "H100 PCIe" precedes "H100").
# float32 on GPUs: XLA runs float32 convolutions and matmuls on the tensor cores (TF32) at
# JAX's default matmul precision, so the TF32 rate is the peak; with
# jax_default_matmul_precision='highest' it is the plain FP32 rate. On TPUs float32 at the
# default precision is one bf16 pass, so the bf16 rate.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
  ("H100 PCIe", {"bfloat16": 756.0, "tf32": 378.0, "float32": 51.0}),
  ("H100", {"bfloat16": 989.0, "tf32": 495.0, "float32": 67.0}),  # SXM
  ("H200", {"bfloat16": 989.0, "tf32": 495.0, "float32": 67.0}),
  ("A100", {"bfloat16": 312.0, "tf32": 156.0, "float32": 19.5}),
  ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
  ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),  # v5e
  ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),  # v5p
  ("TPU v6 lite", {"bfloat16": 918.0, "float32": 918.0}),  # v6e
)

# ImageNet backbones: 1000 classes by default (the others: CIFAR-100's 100).
IMAGENET_ARCHS = ("resnet18", "resnet34", "resnet50")

RECORD_KEYS = (
  "arch",
  "members",
  "strategy",
  "auto",
  "mcl",
  "dtype",
  "batch",
  "image_size",
  "num_classes",
  "shared_stages",
  "backend",
  "device_kind",
  "num_devices",
  "compile_s",
  "step_s_median",
  "step_s_p10",
  "step_s_p90",
  "cpu_s_median",
  "steps",
  "warmup",
  "member_images_per_s",
  "model_flops",
  "xla_flops",
  "achieved_tflops",
  "peak_tflops",
  "peak_basis",
  "mfu",
  "device_peak_bytes",
  "compiled_bytes",
  "loss",
  "loadavg_before",
  "loadavg_after",
  "jax_version",
)


@dataclasses.dataclass(frozen=True)
class Setting:
  """One measured configuration."""

  arch: str
  members: int
  strategy: str  # concrete: vmap | unroll | map
  mcl: bool
  dtype: str
  batch: int
  image_size: int
  num_classes: int
  shared_stages: int = 0


def default_num_classes(arch: str) -> int:
  if arch == "tiny":
    return 10
  return 1000 if arch in IMAGENET_ARCHS else 100


def peak_tflops(device_kind: str, platform: str, dtype: str) -> tuple[float | None, str]:
  """(peak TFLOP/s of one device, what it is) for the step's dtype; (None, why) if unknown."""
  import jax

  for key, peaks in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      basis = dtype
      if dtype == "float32" and platform == "gpu":
        precision = jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]
        precise = precision in ("highest", "float32")
        basis = "float32" if precise else "tf32"
      return peaks[basis], f"{key} {basis}"
  return None, f"unknown device {device_kind!r}: pass --peak_tflops"


def settings(
  arch: str,
  members: Iterable[int],
  strategies: Sequence[str],
  mcl: str,
  dtype: str,
  batch: int,
  image_size: int,
  num_classes: int,
  shared_stages: int,
  backend: str,
) -> list[tuple[Setting, bool]]:
  """(setting, picked by auto) for every requested combination, duplicates removed."""
  from mcl_jax import models

  auto = models.resolve_strategy("auto", backend, arch)
  concrete = []
  for s in strategies:
    c = models.resolve_strategy(s, backend, arch)
    if c not in concrete:
      concrete.append(c)
  mcl_values = {"on": [True], "off": [False], "both": [False, True]}[mcl]
  single = auto if auto in concrete else concrete[0]  # M = 1: every strategy is one network.
  out = []
  for m in members:
    for strategy in [single] if m == 1 else concrete:
      for on in [False] if m == 1 else mcl_values:
        out.append(
          (
            Setting(arch, m, strategy, on, dtype, batch, image_size, num_classes, shared_stages),
            m == 1 or strategy == auto,
          )
        )
  return out


def samples_per_class(batch: int, num_classes: int) -> int:
  """m of the class-aware batches: 2 (docs/SPEC.md 4), or the smallest divisor of the batch
  that needs no more than `num_classes` classes per batch."""
  m = 2
  while batch % m or batch // m > num_classes:
    m += 1
  return m


def make_config(s: Setting, seed: int = 0) -> ml_collections.ConfigDict:
  """mcl_jax/configs/default.py with the setting's fields, on a synthetic in-memory dataset
  of one class-aware batch (`samples_per_class`); the in-batch (CIFAR) loss regime."""
  from mcl_jax.configs import default

  c = default.get_config()
  c.seed = seed
  c.model.arch, c.model.num_classes = s.arch, s.num_classes
  c.model.strategy, c.model.dtype = s.strategy, s.dtype
  c.model.shared_stages = s.shared_stages
  c.cohort.num_members = s.members
  per_class = samples_per_class(s.batch, s.num_classes)
  c.input.dataset = "synthetic"
  c.input.global_batch_size, c.input.image_size = s.batch, s.image_size
  c.input.samples_per_class = per_class
  # One batch per epoch, every class `per_class` times: the class-aware sampler draws the
  # same B images in a new order, with new augmentations, every step.
  c.input.synthetic_train_size = s.batch
  c.input.synthetic_num_classes = s.batch // per_class
  c.input.synthetic_eval_size = 1  # never evaluated
  c.loss.regime = "batch"
  if not s.mcl:
    c.loss.vcl_weight = c.loss.icl_weight = 0.0
    c.loss.soft_vcl_weight = c.loss.soft_icl_weight = 0.0
  return c


# Nothing is written there: `loop.Setup` carries a workdir, and the config check wants one
# that could be written.
WORKDIR = os.path.join(tempfile.gettempdir(), "mcl_bench")


def build(
  s: Setting, mesh: Mesh, seed: int = 0, *, abstract: bool = False
) -> tuple[supervised.SupervisedTask, Any]:
  """(the supervised task, its state) for the setting, built as `mcl_jax.jobs.build` builds
  a job: the config validated, `loop.prepare`, the regime's `build_task`, `init_state()`.

  abstract: the state as shapes only (`task.abstract_state()`: enough to lower the step);
  only the task's constants (the one-batch training set) are put on the devices.
  """
  from mcl_jax import config_lib
  from mcl_jax import loop
  from mcl_jax import supervised

  if s.batch % 2 or s.batch % mesh.size:
    raise ValueError(
      f"--batch={s.batch} must be even (class pairs) and divisible by the {mesh.size} devices."
    )
  config = make_config(s, seed)
  config_lib.validate(config, num_devices=mesh.size, workdir=WORKDIR)
  task = supervised.build_task(loop.prepare(config, WORKDIR, mesh))
  return task, task.abstract_state() if abstract else task.init_state()


def task_batches(task: supervised.SupervisedTask, count: int = 2) -> list[dict[str, Any]]:
  """The task's first `count` global training batches, from its own source, on the devices
  (in memory: the examples' indices; the step gathers and augments the images)."""
  from mcl_jax import sharding as sharding_lib

  setup = task.setup
  return [
    sharding_lib.global_batch(local, setup.mesh)
    for _, local in itertools.islice(setup.batches(0), count)
  ]


def _flops(cost: Any) -> float | None:
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per computation.
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def model_flops(s: Setting, mesh: Mesh) -> float | None:
  """FLOPs of one step, counted on the `unroll` program before XLA's optimisations.

  Where the mesh's backend gives no count (XLA:GPU's analysis of the unoptimised program
  came back empty on an H200, jax 0.11), the same program is counted on the host's CPU
  backend on one device: the count is of the whole global step either way."""
  import jax

  from mcl_jax import sharding as sharding_lib

  flops = _lowered_flops(s, mesh)
  if flops is not None:
    return flops
  try:
    host_mesh = sharding_lib.make_mesh(jax.devices("cpu")[:1])
  except RuntimeError:  # JAX_PLATFORMS left the CPU backend out: no count, no MFU
    return None
  if list(mesh.devices.flat) == list(host_mesh.devices.flat):
    return None
  return _lowered_flops(s, host_mesh)


def _lowered_flops(s: Setting, mesh: Mesh) -> float | None:
  task, state = build(dataclasses.replace(s, strategy="unroll"), mesh, abstract=True)
  batch = task.setup.source.abstract_train_batch(s.batch)
  try:
    return _flops(task.compiled_train_step.lower(state, batch, task.consts).cost_analysis())
  except Exception:  # noqa: BLE001 -- a backend without HLO cost analysis: no MFU.
    return None


def _compiled_bytes(compiled: Any) -> int | None:
  try:
    m = compiled.memory_analysis()
    return int(
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      - m.alias_size_in_bytes
    )
  except Exception:  # noqa: BLE001 -- not every backend reports it.
    return None


def _device_peak_bytes() -> int | None:
  import jax

  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def measure(
  s: Setting,
  *,
  auto: bool,
  steps: int,
  warmup: int,
  mesh: Mesh,
  peak: float | None = None,
  seed: int = 0,
) -> dict[str, Any]:
  """Compiles and times one setting; returns its record (RECORD_KEYS)."""
  import jax

  load_before = os.getloadavg()
  flops = model_flops(s, mesh)
  task, state = build(s, mesh, seed)
  batches, consts = task_batches(task), task.consts
  t0 = time.perf_counter()
  # The task's jitted step compiled ahead of time: the executable `task.train_step` runs.
  compiled = task.compiled_train_step.lower(state, batches[0], consts).compile()
  compile_s = time.perf_counter() - t0
  xla_flops = _flops(compiled.cost_analysis())
  metrics = None
  for i in range(warmup):
    state, metrics = compiled(state, batches[i % len(batches)], consts)
  jax.block_until_ready((state, metrics))
  times, cpu_times = [], []
  for i in range(steps):
    t, c = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, batches[i % len(batches)], consts)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
    cpu_times.append(time.process_time() - c)
  loss = float(metrics["loss"]) if metrics is not None else None
  device = jax.devices()[0]
  platform = device.platform
  if peak is None:
    peak, basis = peak_tflops(device.device_kind, platform, s.dtype)
  else:
    basis = "--peak_tflops"
  median = float(np.median(times))
  achieved = flops / median / 1e12 if flops else None
  record = {
    **dataclasses.asdict(s),
    "auto": auto,
    "backend": platform,
    "device_kind": device.device_kind,
    "num_devices": mesh.size,
    "compile_s": compile_s,
    "step_s_median": median,
    "step_s_p10": float(np.percentile(times, 10)),
    "step_s_p90": float(np.percentile(times, 90)),
    "cpu_s_median": float(np.median(cpu_times)),
    "steps": steps,
    "warmup": warmup,
    "member_images_per_s": s.members * s.batch / median,
    "model_flops": flops,
    "xla_flops": xla_flops,
    "achieved_tflops": achieved,
    "peak_tflops": peak,
    "peak_basis": basis,
    "mfu": achieved / (peak * mesh.size) if achieved and peak else None,
    "device_peak_bytes": _device_peak_bytes(),
    "compiled_bytes": _compiled_bytes(compiled),
    "loss": loss,
    "loadavg_before": load_before,
    "loadavg_after": os.getloadavg(),
    "jax_version": jax.__version__,
  }
  del state, metrics, compiled, task, batches, consts
  gc.collect()
  return record


# ----------------------------------------------------------------------------- reporting


def _ms(x: float | None) -> str:
  return "-" if x is None else f"{1e3 * x:.1f}"


def _bytes(x: int | None) -> str:
  return "-" if x is None else f"{x / 2**20:.0f} MiB"


def format_row(r: dict[str, Any]) -> str:
  strategy = r["strategy"] + (" (auto)" if r["auto"] and r["members"] > 1 else "")
  mcl = "on" if r["mcl"] else "off"
  gflop = "-" if r["model_flops"] is None else f"{r['model_flops'] / 1e9:.1f}"
  mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
  return (
    f"{r['arch']:<9} {r['members']:>2} {strategy:<14} {mcl:<4} {r['dtype']:<8} "
    f"{r['batch']:>4} {r['image_size']:>4} {r['compile_s']:>8.1f} "
    f"{_ms(r['step_s_median']):>9} {_ms(r['step_s_p10']):>8} {_ms(r['step_s_p90']):>8} "
    f"{_ms(r.get('cpu_s_median')):>8} {r['member_images_per_s']:>9.1f} {gflop:>9} {mfu:>6} "
    f"{_bytes(r['device_peak_bytes']):>9} {_bytes(r['compiled_bytes']):>9}"
  )


TABLE_HEADER = (
  f"{'arch':<9} {'M':>2} {'strategy':<14} {'mcl':<4} {'dtype':<8} {'B':>4} "
  f"{'img':>4} {'compile_s':>8} {'median_ms':>9} {'p10_ms':>8} {'p90_ms':>8} "
  f"{'cpu_ms':>8} {'mem-img/s':>9} {'GFLOP':>9} {'MFU':>6} {'dev_peak':>9} "
  f"{'compiled':>9}"
)


def _ratio_text(num: dict[str, Any], den: dict[str, Any], factor: int = 1) -> str:
  text = f"{num['step_s_median'] / (factor * den['step_s_median']):.3f}"
  if num.get("cpu_s_median") and den.get("cpu_s_median"):
    text += f" (host CPU time: {num['cpu_s_median'] / (factor * den['cpu_s_median']):.3f})"
  return text


def ratios(records: Sequence[dict[str, Any]]) -> list[str]:
  """The README's two ratios, from whichever records allow them.

  cohort overhead: the auto strategy's M-member step (CE only where measured, else MCL on)
  over M one-member steps; MCL overhead: MCL on over CE only, same M and strategy.
  """
  key = lambda r: (r["arch"], r["dtype"], r["batch"], r["image_size"])  # noqa: E731
  singles = {key(r): r for r in records if r["members"] == 1}
  lines = []
  for r in records:
    if r["members"] == 1 or not r["auto"] or key(r) not in singles:
      continue
    ce_only_measured = any(
      not o["mcl"] and o["members"] == r["members"] and o["auto"] and key(o) == key(r)
      for o in records
    )
    if r["mcl"] and ce_only_measured:
      continue
    what = "MCL on" if r["mcl"] else "CE only"
    lines.append(
      f"cohort overhead {r['arch']} M={r['members']} {r['dtype']} {r['strategy']} ({what}): "
      f"{_ratio_text(r, singles[key(r)], r['members'])}  (target <= 1.0)"
    )
  for r in records:
    if r["members"] > 1 and r["mcl"]:
      base = [
        o
        for o in records
        if not o["mcl"]
        and o["members"] == r["members"]
        and o["strategy"] == r["strategy"]
        and key(o) == key(r)
      ]
      if base:
        lines.append(
          f"MCL overhead {r['arch']} M={r['members']} {r['dtype']} {r['strategy']}: "
          f"{_ratio_text(r, base[0])}  (target <= 1.05)"
        )
  return lines


# ----------------------------------------------------------------------------- CLI


def _run_isolated(s: Setting, auto: bool) -> dict[str, Any]:
  """One setting in a fresh process (same flags, that setting only)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "record.jsonl")
    cmd = [
      sys.executable,
      "-m",
      "mcl_jax.bench",
      f"--arch={s.arch}",
      f"--members={s.members}",
      f"--strategies={s.strategy}",
      f"--batch={s.batch}",
      f"--image_size={s.image_size}",
      f"--num_classes={s.num_classes}",
      f"--shared_stages={s.shared_stages}",
      f"--dtype={s.dtype}",
      f"--mcl={'on' if s.mcl else 'off'}",
      f"--steps={FLAGS.steps}",
      f"--warmup={FLAGS.warmup}",
      f"--seed={FLAGS.seed}",
      f"--json_out={out}",
      "--noisolate",
    ]
    if FLAGS.peak_tflops is not None:
      cmd.append(f"--peak_tflops={FLAGS.peak_tflops}")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
      record = json.loads(f.readline())
  record["auto"] = auto  # The child saw one strategy; auto is relative to the whole request.
  return record


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {' '.join(argv[1:])}; use --flag=value.")
  import jax

  from mcl_jax import sharding as sharding_lib

  members = [int(m) for m in FLAGS.members]
  if any(m < 1 for m in members):
    raise app.UsageError("--members must be positive integers, e.g. 1,2,4.")
  num_classes = FLAGS.num_classes or default_num_classes(FLAGS.arch)
  todo = settings(
    FLAGS.arch,
    members,
    FLAGS.strategies,
    FLAGS.mcl,
    FLAGS.dtype,
    FLAGS.batch,
    FLAGS.image_size,
    num_classes,
    FLAGS.shared_stages,
    jax.default_backend(),
  )
  mesh = sharding_lib.make_mesh()
  print(
    f"# jax {jax.__version__}, {jax.default_backend()}: {mesh.size} x "
    f"{jax.devices()[0].device_kind}; load average {os.getloadavg()}",
    flush=True,
  )
  print(TABLE_HEADER, flush=True)
  records = []
  for s, auto in todo:
    if FLAGS.isolate:
      record = _run_isolated(s, auto)
    else:
      record = measure(
        s,
        auto=auto,
        steps=FLAGS.steps,
        warmup=FLAGS.warmup,
        mesh=mesh,
        peak=FLAGS.peak_tflops,
        seed=FLAGS.seed,
      )
    records.append(record)
    print(format_row(record), flush=True)
    if FLAGS.json_out:
      with open(FLAGS.json_out, "a") as f:
        f.write(json.dumps(record) + "\n")
  print()
  for record in records:
    print(json.dumps(record))
  print()
  for line in ratios(records):
    print(line)


def run_cli() -> None:
  """The `mcl-bench` command."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run_cli()
