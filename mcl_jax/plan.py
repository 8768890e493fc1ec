r"""`mcl-plan`: compile a config's real train step for a TPU slice or NVIDIA GPUs, from a CPU
host.

  mcl-plan --config=imagenet_r18_x3 --topology=v4:2x2x4 [--batch=N] [--json_out=F]
  mcl-plan --config=cifar100_resnet32:mcl_x4 --topology=v5e:2x2 --max_batch
  mcl-plan --config=imagenet_r18_x3 --topology=h100:1x1x8    (one 8-GPU H100 SXM node)
  mcl-plan --all --topology=v5e:2x2 --json_out=plans.jsonl     (every shipped config)

XLA's TPU compiler (libtpu, `pip install "jax[tpu]==0.10.2"`) runs on any CPU host:
`jax.experimental.topologies` gives compile-only TPU devices, and a program lowered for a
mesh over them compiles into what the slice would run. XLA's GPU compiler does the same
for NVIDIA GPUs (JAX's CUDA plugin, `pip install "jax[cuda12]==0.10.2"`, no GPU needed):
`--topology=GPU:PARTITIONSxHOSTSxGPUS` (h100, a100; e.g. h100:1x1x8, GPUs per host last)
makes compile-only devices from XLA's description of that GPU (a
`stream_executor.GpuTargetConfigProto`, mcl_jax/gpu_specs/, written from NVIDIA's
datasheets). Without a GPU driver the plugin's start-up check fails, so the plan sets
JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 (JAX_PLATFORMS=cpu also skips it, and keeps JAX from
trying a GPU backend). The plan compiles the step exactly
as `fit` would: the regime's own task (`regimes.get(config.trainer)`) is built from a
`loop.Setup` by `loop.prepare`, so the step function, its shardings and its donation are
the task's (`sharding.compile_step`), not a copy. Nothing is read or allocated: the data
source knows only shapes (a zero-page in-memory training set, or a streaming ImageNet
source that holds no files; the memory bank's rows are the dataset's known size), the
state is `jax.eval_shape` of the task's init, and every array the task would put on the
devices becomes a `jax.ShapeDtypeStruct` with that sharding (compile-only devices hold no
data).

Per step it reports, from the compiled program: per-chip HBM (arguments, temporaries,
outputs, generated code; against the chip's capacity), the FLOPs, an estimated step time
(the compiler's own `optimal_seconds` where it is a positive number, else a roofline bound
max(FLOPs / peak, bytes / HBM bandwidth) per chip; the label says which), images/s and MFU
at that estimate, the collectives with their counts and result bytes, whether anything is
float64 or a host callback, and the compile time. These are the compiler's estimates for
a program it never ran, not measurements.

On GPUs (one JAX device, one "chip", per GPU) XLA gives no cost analysis of the compiled
program: the FLOPs are XLA's cost analysis of the per-GPU program after SPMD partitioning
and before optimisation (`partitioned_cost`), there are no bytes accessed of the compiled
program, so the step time is the compute bound FLOPs / peak alone (a lower bound; the
label says so), and the bytes the unfused program would move are reported beside it. A
compile-only GPU plan cannot know which kernels cuDNN's autotuning picks at run time (nor
their scratch memory), the kernels' times, NCCL's bandwidth, or the input pipeline's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import tempfile
import time
from typing import Any

import numpy as np

from mcl_jax import errors
from mcl_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """One accelerator chip's published figures (per chip, not per TensorCore)."""

  kind: str
  bf16_tflops: float
  hbm_bytes: float
  hbm_gbps: float  # GB/s (10^9 bytes)
  source: str
  megacore: bool = False  # one JAX device per chip (both TensorCores): v4, v5p
  devices_per_chip: int = 1  # v3: one device per TensorCore, two per chip
  # GPUs: the file of mcl_jax/gpu_specs/ that describes the GPU to XLA's GPU compiler (a
  # stream_executor.GpuTargetConfigProto in text format); None for TPUs.
  target_config: str | None = None
  # GPUs: the dense TF32 Tensor Core rate, at which XLA:GPU runs float32 convolutions and
  # dots of default precision. None (TPUs): the bf16 rate, as their default precision
  # multiplies float32 operands in bfloat16 passes.
  tf32_tflops: float | None = None

  @property
  def platform(self) -> str:
    return "tpu" if self.target_config is None else "cuda"

  def peak_tflops(self, dtype: str) -> float:
    """The peak of a step that computes in `dtype` (config.model.dtype)."""
    if dtype == "float32" and self.tf32_tflops is not None:
      return self.tf32_tflops
    return self.bf16_tflops


GiB, GB = 2**30, 10**9
# Google Cloud's TPU documentation, the "System architecture" table of each generation's
# page (docs.cloud.google.com/tpu/docs/<v>): "TPU v4" (275 TFLOPs bf16, HBM2 32 GiB at
# 1200 GBps), "TPU v5e" (197 TFLOPs bf16, 16 GB at 819 GBps), "TPU v6e" (918 TFLOPs bf16,
# 32 GB at 1638 GBps), "TPU v5p" (459 TFLOPs bf16, 95 GB at 2765 GBps), "TPU v3" (123
# TFLOPs bf16 and 32 GiB per chip, two TensorCores, 900 GBps).
CHIPS = {
  "v3": ChipSpec(
    "TPU v3", 123.0, 32 * GiB, 900.0, "cloud.google.com/tpu/docs/v3", devices_per_chip=2
  ),
  "v4": ChipSpec("TPU v4", 275.0, 32 * GiB, 1200.0, "cloud.google.com/tpu/docs/v4", megacore=True),
  "v5e": ChipSpec("TPU v5e", 197.0, 16 * GB, 819.0, "cloud.google.com/tpu/docs/v5e"),
  "v5p": ChipSpec(
    "TPU v5p", 459.0, 95 * GB, 2765.0, "cloud.google.com/tpu/docs/v5p", megacore=True
  ),
  "v6e": ChipSpec("TPU v6e", 918.0, 32 * GB, 1638.0, "cloud.google.com/tpu/docs/v6e"),
}
EXAMPLES = "v4:2x2x4, v5e:2x2, v5e:4x4, v5p:2x2x1, v6e:2x2, v3:4x4"
INSTALL = "pip install 'jax[tpu]==0.10.2'"
# NVIDIA's datasheets (dense figures: the H100 datasheet gives Tensor Core rates "with
# sparsity", twice the dense ones, in a footnote): "NVIDIA H100 Tensor Core GPU" datasheet,
# column H100 SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity (989.5 dense), TF32 Tensor
# Core 989 TFLOPS with sparsity (494.5 dense), GPU memory 80 GB, 3.35 TB/s; "NVIDIA A100
# Tensor Core GPU" datasheet, column A100 80GB SXM: BF16 Tensor Core 312 TFLOPS (624 with
# sparsity), TF32 Tensor Core 156 TFLOPS (312 with sparsity), 80 GB HBM2e, 2,039 GB/s. The
# figures XLA's compiler is given (SMs, clocks, shared memory, L2) are in the spec files of
# mcl_jax/gpu_specs/, each with its source.
GPUS = {
  "h100": ChipSpec(
    "NVIDIA H100 SXM5 80GB",
    989.5,
    80 * GB,
    3350.0,
    "nvidia.com/en-us/data-center/h100 (H100 SXM datasheet)",
    target_config="h100_sxm.txtpb",
    tf32_tflops=494.5,
  ),
  "a100": ChipSpec(
    "NVIDIA A100 SXM4 80GB",
    312.0,
    80 * GB,
    2039.0,
    "nvidia.com/en-us/data-center/a100 (A100 80GB SXM datasheet)",
    target_config="a100_sxm_80.txtpb",
    tf32_tflops=156.0,
  ),
}
GPU_EXAMPLES = "h100:1x1x8, a100:1x1x8"
GPU_INSTALL = "pip install 'jax[cuda12]==0.10.2'"
GPU_SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")
# The pip packages of JAX's CUDA 12 plugin: the XLA:GPU compiler (jax-cuda12-pjrt) and its
# kernels' Python side (jax-cuda12-plugin); `jax[cuda12]` installs both.
CUDA_MODULES = ("jax_plugins.xla_cuda12", "jax_cuda12_plugin")
# JAX's GPU client preallocates this fraction of a GPU's memory by default
# (XLA_PYTHON_CLIENT_MEM_FRACTION); a step that needs more must raise it.
GPU_DEFAULT_MEM_FRACTION = 0.75
# Training-set sizes of the datasets whose files a plan never reads.
IMAGENET_TRAIN, IMAGENET_CLASSES = 1_281_167, 1000
CIFAR = {"cifar10": (50_000, 10_000, 10), "cifar100": (50_000, 10_000, 100)}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}


# ----------------------------------------------------------------------------- devices


def require_libtpu() -> None:
  """ConfigError (one sentence) when XLA's TPU compiler is not installed."""
  import importlib.util

  if importlib.util.find_spec("libtpu") is None:
    raise ConfigError(
      f"TPU plans need XLA's TPU compiler, which is not installed; run "
      f"{INSTALL} (about 700 MB, no TPU needed)."
    )


def require_cuda_compiler() -> None:
  """ConfigError (one sentence) when XLA's GPU compiler (JAX's CUDA plugin) is not installed."""
  import importlib.util

  def found(name: str) -> bool:
    try:
      return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package (jax_plugins) is absent
      return False

  if not all(found(name) for name in CUDA_MODULES):
    raise ConfigError(
      f"GPU plans need XLA's GPU compiler (JAX's CUDA plugin), which is not installed; run "
      f"{GPU_INSTALL} (about 5.5 GB of CUDA wheels, no GPU needed)."
    )


def chip_spec(topology: str) -> ChipSpec:
  """The chip of `topology`: GENERATION:SHAPE for a TPU slice, GPU:PxHxG for NVIDIA GPUs."""
  name, _, shape = topology.partition(":")
  spec = CHIPS.get(name.lower()) or GPUS.get(name.lower())
  if (
    spec is None
    or not shape
    or (spec.platform == "cuda" and not re.fullmatch(r"[1-9]\d*x[1-9]\d*x[1-9]\d*", shape))
  ):
    raise ConfigError(
      f"Unknown --topology={topology!r}; name a TPU slice as GENERATION:SHAPE with "
      f"GENERATION one of {', '.join(CHIPS)}, e.g. {EXAMPLES}; or NVIDIA GPUs as "
      f"GPU:PARTITIONSxHOSTSxGPUS with GPU one of {', '.join(GPUS)}, e.g. {GPU_EXAMPLES}."
    )
  return spec


def gpu_target_config(spec: ChipSpec) -> str:
  """The text of the GPU's description for XLA (a file of mcl_jax/gpu_specs/)."""
  path = os.path.join(GPU_SPECS, str(spec.target_config))
  try:
    with open(path) as f:
      return f.read()
  except OSError as e:
    raise ConfigError(
      f"XLA's description of the {spec.kind} cannot be read ({e.strerror}: {path})."
    ) from None


@functools.cache
def topology_devices(topology: str) -> tuple[Any, ...]:
  """The compile-only devices of a TPU slice (one per chip on v4/v5p: megacore) or of
  NVIDIA GPUs (one per GPU)."""
  spec = chip_spec(topology)
  if spec.platform == "cuda":
    return _gpu_devices(topology, spec)
  require_libtpu()
  # Another process on this host that touched libtpu holds its lock file; compiling
  # needs no exclusive TPU, so a second loader is harmless here.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  kwargs = {"chip_config_name": "megacore"} if spec.megacore else {}
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs)
  except Exception as e:  # libtpu's own message: keep its first line
    raise ConfigError(
      f"libtpu does not know --topology={topology!r} ({_first_line(e)}); try one of {EXAMPLES}."
    ) from None
  return tuple(desc.devices)


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return (text.splitlines()[0] if text else type(e).__name__)[:160]


def _gpu_devices(topology: str, spec: ChipSpec) -> tuple[Any, ...]:
  """Compile-only GPUs made by JAX's CUDA plugin from `spec`'s description of the GPU;
  the shape is PARTITIONSxHOSTSxGPUS (GPUs per host)."""
  require_cuda_compiler()
  config_text = gpu_target_config(spec)
  # Without a GPU driver the plugin's start-up check of the CUDA libraries fails and the
  # plugin is not registered; compiling needs neither. (JAX_PLATFORMS=cpu skips the check
  # too.) Read when JAX first loads its plugins, so it helps only if nothing did before.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  from jax.experimental import topologies

  name, _, shape = topology.partition(":")
  try:
    desc = topologies.get_topology_desc(
      topology_name=name.lower(), platform="cuda", target_config=config_text, topology=shape
    )
  except NotImplementedError:  # the plugin failed to start in this process
    raise ConfigError(
      "JAX's CUDA plugin did not start in this process (its check of the CUDA libraries "
      "needs a GPU driver); set JAX_PLATFORMS=cpu before JAX starts to plan for GPUs on a "
      "host without one."
    ) from None
  except Exception as e:  # the plugin's own message: keep its first line
    raise ConfigError(
      f"JAX's CUDA plugin cannot make --topology={topology!r} ({_first_line(e)}); try one "
      f"of {GPU_EXAMPLES}."
    ) from None
  return tuple(desc.devices)


# ----------------------------------------------------------------------------- shapes only


def _shape_only_source(
  input_fields: Any, *, two_view_crop_scale: tuple[float, float] | None = None
) -> Any:
  """A data source with the real one's shapes, preprocessing and sizes, and no data.

  ImageNet: a streaming source that holds no files (1,281,167 training examples, 1000
  classes), two crops per image when `two_view_crop_scale` is given, as the real one.
  CIFAR: an in-memory `Dataset` of zero pages (the OS maps them lazily; only shapes reach
  the compiler). The small datasets (digits, Fashion-MNIST, synthetic) are read for real.
  The signature is `data.make_source`'s, which it stands in for.
  """
  from mcl_jax.data import pipeline
  from mcl_jax.data import sources

  name = input_fields.dataset
  if name in sources.STREAMING:
    from mcl_jax.data import imagenet

    class ShapeOnlyImageNet(imagenet._StreamingSource):  # pylint: disable=protected-access
      """ImageNet's metadata without its files: what a compile needs."""

      num_classes, output_dtype = IMAGENET_CLASSES, "uint8"

      def __init__(self, image_size: int):
        self.image_size = int(image_size)
        self._set_views(two_view_crop_scale)

      @property
      def num_train(self) -> int:
        return IMAGENET_TRAIN

      @property
      def train_labels(self) -> np.ndarray:
        return (np.arange(IMAGENET_TRAIN) % IMAGENET_CLASSES).astype(np.int32)

    return ShapeOnlyImageNet(input_fields.image_size)
  if name in CIFAR:
    from mcl_jax.data import augment as augment_lib

    num_train, num_eval, num_classes = CIFAR[name]
    images = lambda n: np.zeros((n, 32, 32, 3), np.uint8)
    labels = lambda n: (np.arange(n) % num_classes).astype(np.int32)
    dataset = pipeline.Dataset(
      name,
      images(num_train),
      labels(num_train),
      images(num_eval),
      labels(num_eval),
      num_classes=num_classes,
      mean=augment_lib.CIFAR_MEAN,
      std=augment_lib.CIFAR_STD,
      augment=augment_lib.AugmentSpec(crop_padding=4, flip=True),
    )
    if input_fields.validation_size or input_fields.train_subset:
      dataset = pipeline.hold_out_validation(
        dataset, input_fields.validation_size, input_fields.train_subset
      )
    return dataset
  return sources.make_source(input_fields, two_view_crop_scale=two_view_crop_scale)


def _abstract_put(x: Any, device: Any = None, *args: Any, **kwargs: Any) -> Any:
  """`jax.device_put` for compile-only devices: the shape, dtype and sharding only."""
  import jax

  del args, kwargs

  def struct(value: Any) -> jax.ShapeDtypeStruct:
    value = value if hasattr(value, "dtype") else np.asarray(value)
    return jax.ShapeDtypeStruct(np.shape(value), value.dtype, sharding=device)

  return jax.tree.map(struct, x)


@contextlib.contextmanager
def _shape_only_world(config: Any) -> Iterator[None]:
  """While a task is built: sources know only shapes, device puts make ShapeDtypeStructs,
  and a probe's export is the architecture's abstract variables (no files read)."""
  import jax

  from mcl_jax import data
  from mcl_jax import export

  real = (jax.device_put, data.make_source, export.load_exported)

  def load_exported(path: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    del path
    from mcl_jax import models

    source = _shape_only_source(config.input)
    arch, classes = config.model.arch, source.num_classes
    variables = jax.eval_shape(
      lambda: models.create(arch, classes).init(
        jax.random.PRNGKey(0), jax.numpy.zeros((1, *source.image_shape)), False
      )
    )
    info = {
      "arch": arch,
      "num_classes": classes,
      "preprocessing": {
        "image_shape": list(source.image_shape),
        "mean": list(np.asarray(source.mean, float)),
        "std": list(np.asarray(source.std, float)),
      },
    }
    return models.create(arch, classes), dict(variables), info

  jax.device_put, data.make_source, export.load_exported = (
    _abstract_put,
    _shape_only_source,
    load_exported,
  )
  try:
    yield
  finally:
    jax.device_put, data.make_source, export.load_exported = real


@dataclasses.dataclass
class Planned:
  """A task built over compile-only devices, with abstract inputs for its steps."""

  config: Any
  topology: str
  mesh: Any
  task: Any
  state: Any  # ShapeDtypeStructs carrying the task's state shardings
  batch: dict[str, Any]
  eval_args: tuple[Any, ...]
  eval_fn: Any


def build(config: Any, topology: str) -> Planned:
  """The config's task for `topology`'s devices, and abstract (state, batch) for its step.

  Raises ConfigError for an unknown topology, a missing libtpu, or a config that cannot
  run there (e.g. a batch that does not split over the chips).
  """
  import jax

  from mcl_jax import config_lib
  from mcl_jax import loop
  from mcl_jax import models
  from mcl_jax import regimes
  from mcl_jax import sharding as sharding_lib

  devices = topology_devices(topology)
  mesh = sharding_lib.make_mesh(list(devices))
  config = config.copy_and_resolve_references()
  # 'auto' as the target chip would resolve it, not as this host's backend would.
  config.model.strategy = models.resolve_strategy(
    config.model.strategy, devices[0].platform, config.model.arch
  )
  if not config.lincls.pretrained:
    # A probe's export is replaced by config.model.arch's abstract variables (other regimes
    # do not read the field).
    config.lincls.pretrained = "<shape-only export of config.model.arch>"
  config_lib.validate(config, num_devices=mesh.size)
  with _shape_only_world(config):
    setup = loop.prepare(config, "", mesh)
    task = regimes.get(config.trainer).build_task(setup)
    abstract = task.abstract_state()
  state = jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, task.shardings
  )
  source, batch_size = setup.source, setup.global_batch
  split = sharding_lib.batch_sharded(mesh)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=split)
  batch = {k: spec(v.shape, v.dtype) for k, v in source.abstract_train_batch(batch_size).items()}
  eval_size = setup.eval_batch_size()
  eval_batch = {
    "image": spec((eval_size, *source.image_shape), np.uint8),
    "label": spec((eval_size,), np.int32),
    "mask": spec((eval_size,), np.float32),
  }
  eval_fn, eval_args = task.compiled_eval_step, task.eval_step_inputs(state, eval_batch)
  return Planned(config, topology, mesh, task, state, batch, eval_args, eval_fn)


# ----------------------------------------------------------------------------- analysis


_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")


def array_bytes(shape_text: str) -> int:
  """Bytes of every array type in an HLO shape (a tuple counts each element)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """{op: {'count', 'bytes', 'max_bytes', 'elements'}} of the program's collectives.

  Per chip, from each op's result (an async start's tuple holds operand and result: its
  largest element is taken; `-done` halves are not counted again). `elements` counts
  array elements, whatever their dtype (a bfloat16 step reduces bfloat16 gradients).
  """
  found: dict[str, dict[str, int]] = {}
  for line in hlo.splitlines():
    match = _OP.search(line)
    if not match:
      continue
    shape, op, is_start = match.groups()
    arrays = [
      (DTYPE_BYTES[d], math.prod(int(x) for x in dims.split(",") if x))
      for d, dims in _ARRAY.findall(shape)
    ] or [(0, 0)]
    if is_start or (shape.startswith("(") and op != "all-reduce"):
      arrays = [max(arrays)]
    size = sum(b * n for b, n in arrays)
    entry = found.setdefault(op, {"count": 0, "bytes": 0, "max_bytes": 0, "elements": 0})
    entry["count"] += 1
    entry["bytes"] += size
    entry["max_bytes"] = max(entry["max_bytes"], size)
    entry["elements"] += sum(n for _, n in arrays)
  return found


def host_callbacks(hlo: str) -> list[str]:
  """Custom calls back into Python (jax.debug.print, pure_callback, io_callback)."""
  return sorted(set(re.findall(r'custom_call_target="([^"]*callback[^"]*)"', hlo)))


# Compiler options that make XLA dump the module right after its SPMD partitioning pass:
# one device's program, before the backend's optimisations (XLA:GPU and XLA:CPU alike).
PARTITIONED_DUMP = {"xla_dump_hlo_as_text": True, "xla_dump_hlo_pass_re": "^spmd-partitioning$"}


def partitioned_cost(dump_dir: str) -> dict[str, float]:
  """XLA's cost analysis ({'flops', 'bytes accessed', ...}) of the per-device program after
  SPMD partitioning, read from a compile's dump (`PARTITIONED_DUMP`); {} if absent.

  For a backend (XLA:GPU) that gives no cost analysis of its compiled program. Per device,
  unlike the lowered program's (the whole mesh's work, except inside shard_map, whose body
  is already one device's), and before fusion: convolutions and dots are counted as XLA
  counts them (2 per multiply-add), and 'bytes accessed' counts every unfused op's
  operands and result, far more than a fused program moves. The analysis is XLA:CPU's
  (`hlo_module_cost_analysis` of JAX's internals; the FLOPs of an op do not depend on the
  backend)."""
  import glob

  import jax
  from jax._src.lib import _jax  # pylint: disable=protected-access
  from jax._src.lib import hlo as hlo_lib  # pylint: disable=protected-access

  files = sorted(glob.glob(os.path.join(dump_dir, "*.after_spmd-partitioning.*.txt")))
  if not files:
    return {}
  with open(files[0]) as f:
    module = hlo_lib.hlo_module_from_text(f.read())
  cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
  return {k: float(v) for k, v in dict(cost).items()}


def analyse(
  compiled: Any,
  spec: ChipSpec,
  *,
  num_chips: int,
  batch_size: int,
  compile_s: float,
  partitioned: dict[str, float] | None = None,
  dtype: str = "bfloat16",
) -> dict[str, Any]:
  """The plan of one compiled step (module docstring), per chip. `partitioned`: the
  `partitioned_cost` of the step, for a compiled program without a cost analysis (GPU);
  `dtype`: the step's compute dtype, which picks the peak (`ChipSpec.peak_tflops`)."""
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = compiled.as_text()
  # Per JAX device; v3 devices are TensorCores (half a chip), so scale to the chip.
  per_chip = spec.devices_per_chip
  arguments = memory.argument_size_in_bytes * per_chip
  outputs = memory.output_size_in_bytes * per_chip
  aliased = memory.alias_size_in_bytes * per_chip
  temporaries = memory.temp_size_in_bytes * per_chip
  code = memory.generated_code_size_in_bytes * per_chip
  total = arguments + outputs - aliased + temporaries + code
  unfused_bytes = None
  if "flops" in cost or partitioned is None:
    flops_basis = "XLA cost analysis of the compiled program"
    flops = float(cost.get("flops", 0.0)) * per_chip
    bytes_accessed: float | None = float(cost.get("bytes accessed", 0.0)) * per_chip
  else:  # XLA:GPU: no cost analysis of the compiled program, no bytes it accesses
    flops_basis = (
      "XLA cost analysis of the per-device program after SPMD partitioning, before "
      "optimisation (the compiled program has none)"
      if "flops" in partitioned
      else "none: XLA dumped no partitioned program to count"
    )
    flops = partitioned.get("flops", 0.0) * per_chip
    bytes_accessed = None
    unfused_bytes = partitioned.get("bytes accessed", 0.0) * per_chip
  peak = spec.peak_tflops(dtype) * 1e12
  compute_s = flops / peak
  memory_s = None if bytes_accessed is None else bytes_accessed / (spec.hbm_gbps * 1e9)
  roofline_s = max(compute_s, memory_s or 0.0)
  optimal = cost.get("optimal_seconds")
  if optimal is not None and math.isfinite(optimal) and optimal > 0:
    step_s, basis = float(optimal), "compiler optimal_seconds"
  elif memory_s is None:
    # No bytes accessed: only the compute side of the roofline, a lower bound on the time
    # (so images/s is an upper bound, and MFU 100% by construction).
    step_s, basis = compute_s, "compute bound only: FLOPs/peak (no bytes accessed on GPU)"
  else:
    # The compiler's FLOPs over the peak, or its bytes accessed (every op's operands and
    # result, as the cost analysis counts them) over the HBM bandwidth, whichever is longer.
    step_s, basis = (
      roofline_s,
      (
        "roofline (compiler estimate invalid): "
        + ("FLOPs/peak" if compute_s >= memory_s else "bytes accessed/HBM bandwidth")
      ),
    )
  hbm: dict[str, Any] = {
    "arguments": arguments,
    "outputs": outputs,
    "aliased": aliased,
    "temporaries": temporaries,
    "code": code,
    "total": total,
    "capacity": spec.hbm_bytes,
    "fits": total <= spec.hbm_bytes,
    "margin": spec.hbm_bytes - total,
  }
  result: dict[str, Any] = {
    "hbm_per_chip": hbm,
    "flops_per_chip": flops,
    "flops_per_step": flops * num_chips,
    "flops_basis": flops_basis,
    "bytes_accessed_per_chip": bytes_accessed,
    "compiler_optimal_seconds": None if optimal is None else float(optimal),
    "roofline_seconds": roofline_s,
    "roofline_compute_seconds": compute_s,
    "roofline_memory_seconds": memory_s,
    "step_seconds": step_s,
    "step_seconds_basis": basis,
    "images_per_second": batch_size / step_s if step_s > 0 else None,
    "mfu": flops / step_s / peak if step_s > 0 else None,
    "collectives": collectives(hlo),
    "float64": bool(re.search(r"\bf64\[", hlo)),
    "host_callbacks": host_callbacks(hlo),
    # XLA's cost analysis counts a loop's body once, not once per iteration (a chunked
    # bank gather, the `map` cohort strategy): FLOPs and bytes then undercount.
    "while_loops": len(re.findall(r"\bwhile\(", hlo)),
    "compile_seconds": compile_s,
  }
  if spec.platform == "cuda":
    # What the unfused program's ops would move (an overestimate of a fused program's
    # traffic), at the HBM bandwidth: beside the compute bound, not used for the estimate.
    result["unfused_bytes_accessed_per_chip"] = unfused_bytes
    result["unfused_memory_seconds"] = (
      None if unfused_bytes is None else unfused_bytes / (spec.hbm_gbps * 1e9)
    )
    result["custom_calls"] = custom_calls(hlo)
    hbm["fits_default_preallocation"] = total <= GPU_DEFAULT_MEM_FRACTION * spec.hbm_bytes
  return result


def custom_calls(hlo: str) -> dict[str, int]:
  """{target: count} of the compiled program's custom calls (on GPU: cuDNN convolutions,
  cuBLAS GEMMs, ...)."""
  found: dict[str, int] = {}
  for target in re.findall(r'custom_call_target="([^"]*)"', hlo):
    found[target] = found.get(target, 0) + 1
  return dict(sorted(found.items()))


@contextlib.contextmanager
def no_persistent_cache() -> Iterator[None]:
  """A compile-only TPU executable cannot be loaded back from JAX's persistent compilation
  cache (there is no TPU client to load it into), so plans neither write nor read it; a
  GPU plan must compile for real too, as the compile dumps what `partitioned_cost` counts.

  JAX decides once per process whether the cache is used: reset that decision on the way
  in and out, so the process's other compiles keep the cache."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  if not jax.config.values.get("jax_compilation_cache_dir"):
    yield  # no persistent cache configured: nothing to keep out
    return
  enabled = jax.config.values.get("jax_enable_compilation_cache", True)
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def compile_and_analyse(
  fn: Any,
  args: tuple[Any, ...],
  spec: ChipSpec,
  *,
  num_chips: int,
  batch_size: int,
  dtype: str = "bfloat16",
) -> tuple[dict[str, Any], Any]:
  """Lowers and compiles the jitted `fn` on abstract `args`; (`analyse`'s plan, the
  compiled program)."""
  start = time.perf_counter()
  with no_persistent_cache(), tempfile.TemporaryDirectory(prefix="mcl_plan_") as dump:
    # XLA:GPU gives no cost analysis of the compiled program: count the FLOPs on the
    # partitioned program that the compile dumps (`partitioned_cost`).
    options = None if spec.platform == "tpu" else {**PARTITIONED_DUMP, "xla_dump_to": dump}
    compiled = fn.lower(*args).compile(compiler_options=options)
    compile_s = time.perf_counter() - start
    partitioned = None if options is None else partitioned_cost(dump)
  result = analyse(
    compiled,
    spec,
    num_chips=num_chips,
    batch_size=batch_size,
    compile_s=compile_s,
    partitioned=partitioned,
    dtype=dtype,
  )
  return result, compiled


def plan(config: Any, topology: str, *, with_eval: bool = True) -> dict[str, Any]:
  """The plan (a JSON-able dict) of `config`'s train step (and eval step) on `topology`."""
  import jax

  spec = chip_spec(topology)
  planned = build(config, topology)
  chips = planned.mesh.size // spec.devices_per_chip
  batch_size = planned.config.input.global_batch_size
  dtype = planned.config.model.dtype
  # The task's jitted step (`sharding.compile_step`: its shardings and donation), the very
  # object `train_step` calls; lowered here instead of called.
  train_plan, _ = compile_and_analyse(
    planned.task.compiled_train_step,
    (planned.state, planned.batch, planned.task.consts),
    spec,
    num_chips=chips,
    batch_size=batch_size,
    dtype=dtype,
  )
  result = {
    "config": config_name(planned.config),
    "topology": topology,
    "chip": spec.kind,
    "platform": spec.platform,
    "chips": chips,
    "devices": planned.mesh.size,
    "trainer": planned.config.trainer,
    "arch": planned.config.model.arch,
    "members": planned.config.cohort.num_members,
    "dtype": planned.config.model.dtype,
    "strategy": planned.config.model.strategy,  # `auto` resolved for the target chip
    "global_batch": batch_size,
    "steps_per_epoch": planned.task.setup.steps_per_epoch,
    "chip_source": spec.source,
    "bf16_tflops_per_chip": spec.bf16_tflops,
    # The peak of the step's dtype that the time estimate and MFU use (`peak_tflops`).
    "peak_tflops_per_chip": spec.peak_tflops(dtype),
    "hbm_gbps_per_chip": spec.hbm_gbps,
    "jax": jax.__version__,
    "optimizations": (
      "most disabled (jax_disable_most_optimizations)" if optimizations_disabled() else "full"
    ),
    "note": "compiler estimates for a program that never ran, not measurements",
    "train": train_plan,
  }
  bank = getattr(planned.state, "bank", None)
  if bank is not None:
    # Split over the chips (bank.layout "sharded") or a whole copy on each ("replicated").
    per_device = math.prod(bank.sharding.shard_shape(bank.shape)) * bank.dtype.itemsize
    result["bank"] = {
      "shape": list(bank.shape),
      "layout": planned.config.bank.layout,
      "total_bytes": bank.size * bank.dtype.itemsize,
      "per_chip_bytes": per_device * spec.devices_per_chip,
    }
  if with_eval and planned.eval_fn is not None:
    eval_size = planned.task.setup.eval_batch_size()
    result["eval"], _ = compile_and_analyse(
      planned.eval_fn,
      planned.eval_args,
      spec,
      num_chips=chips,
      batch_size=eval_size,
      dtype=dtype,
    )
  return result


def optimizations_disabled() -> bool:
  """Whether `jax_disable_most_optimizations` is on (the test suite's setting): fine for
  structure checks, not for a plan's memory and time figures."""
  import jax

  return bool(jax.config.values.get("jax_disable_most_optimizations", False))


def config_name(config: Any) -> str:
  return f"{config.model.arch} x{config.cohort.num_members} ({config.trainer})"


def max_batch(
  config: Any,
  topology: str,
  *,
  limit: int = 1 << 16,
  report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
  """The largest global batch (a multiple of the chips and of samples_per_class, at most
  `limit`) whose train step fits in HBM, with the compiles it took; `report` gets one line
  per compile (minutes each at real size)."""
  spec = chip_spec(topology)
  devices = len(topology_devices(topology))
  unit = math.lcm(devices, config.input.samples_per_class or 1)
  analysed: dict[int, dict[str, Any]] = {}  # the train step's plan at each batch compiled

  def bytes_per_chip(batch: int) -> int | None:
    """Per-chip HBM of the train step at `batch`; None when the config cannot run it."""
    trial = config.copy_and_resolve_references()
    trial.input.global_batch_size = batch
    try:
      planned = build(trial, topology)
    except ConfigError as e:  # e.g. more classes per class-aware batch than the dataset has
      if report:
        report(f"  max_batch: global batch {batch}: not run by this config ({e})")
      return None
    result, _ = compile_and_analyse(
      planned.task.compiled_train_step,
      (planned.state, planned.batch, planned.task.consts),
      spec,
      num_chips=devices // spec.devices_per_chip,
      batch_size=batch,
    )
    analysed[batch] = result
    hbm = result["hbm_per_chip"]
    if report:
      report(
        f"  max_batch: global batch {batch}: {_gib(hbm['total'])} per chip, "
        + ("fits" if hbm["fits"] else "does not fit")
        + f" (compiled in {result['compile_seconds']:.0f} s)"
      )
    return int(hbm["total"])

  start = max(unit, min(limit, config.input.global_batch_size) // unit * unit)
  found = search_max_batch(bytes_per_chip, int(spec.hbm_bytes), start=start, unit=unit, limit=limit)
  largest = found["max_global_batch"]
  return {
    "max_global_batch": largest,
    "tried": {str(k): v for k, v in sorted(found["bytes_per_chip"].items())},
    "train_at_max": analysed.get(largest),  # HBM, step estimate, MFU at the largest batch
  }


def search_max_batch(
  bytes_per_chip: Callable[[int], int | None], capacity: int, *, start: int, unit: int, limit: int
) -> dict[str, Any]:
  """The largest multiple of `unit` in [unit, limit] with bytes_per_chip(batch) <= capacity
  (0 when none), calling bytes_per_chip (a compile: minutes at real size) as few times as it
  can. A step's memory is a fixed part (parameters, optimiser state, a bank) plus a part
  proportional to the batch (activations), so while every batch tried fits, the line
  through the two largest predicts where memory meets the capacity; once one does not fit,
  the line through the two ends of the bracket does (regula falsi), and the next unit up
  from a fitting batch confirms the boundary: about four compiles for a straight line,
  where doubling and bisection need ten or more. A step that does not halve the bracket
  is followed by a bisection, so a curved or stepped memory costs at most about twice the
  compiles of bisection. The answer is exact whatever the curve, as long as memory grows
  with the batch: every step keeps a fitting `low` and a non-fitting `high`, compiles
  strictly between them, and ends when they are one unit apart.
  """
  memory: dict[int, int | None] = {}
  if unit > limit:
    return {"max_global_batch": 0, "bytes_per_chip": memory}

  def measure(batch: int) -> int | None:
    if batch not in memory:
      memory[batch] = bytes_per_chip(batch)
    return memory[batch]

  def fits(batch: int) -> bool:
    used = measure(batch)
    return used is not None and used <= capacity

  high = (limit // unit + 1) * unit  # not known to fit; compiled once `high in memory`
  batch = start
  while not fits(batch):  # halve down to a batch that fits
    high = batch
    if batch == unit:
      return {"max_global_batch": 0, "bytes_per_chip": memory}
    batch = max(unit, batch // 2 // unit * unit)
  low = batch
  halved = True  # the last step at least halved a compiled bracket
  while high - low > unit:
    width, bracketed = high - low, high in memory
    m_low, m_high = memory[low], memory.get(high)
    assert m_low is not None  # low fits
    guess: float
    if bracketed:  # regula falsi between the ends, or bisection after a poor step
      if halved and m_high is not None and m_high > m_low:
        guess = low + (capacity - m_low) * (high - low) / (m_high - m_low)
      else:
        guess = (low + high) / 2
    else:  # everything tried fits: extrapolate from the two largest, or double
      below = sorted(b for b in memory if b < low)
      m_below = memory[below[-1]] if below else None
      if m_below is not None and m_low > m_below:
        guess = low + (capacity - m_low) * (low - below[-1]) / (m_low - m_below)
      else:
        guess = 2 * low
    batch = min(max(int(guess) // unit * unit, low + unit), high - unit)
    low, high = (batch, high) if fits(batch) else (low, batch)
    halved = not bracketed or 2 * (high - low) <= width
  return {"max_global_batch": low, "bytes_per_chip": memory}


# ----------------------------------------------------------------------------- output


def _gib(x: float) -> str:
  return f"{x / GiB:.2f} GiB"


def markdown_table(plans: list[dict[str, Any]]) -> str:
  """One markdown row per plan (train step) of `plans` (`--json_out` lines), failures too:
  what `--table_from` prints for a committed `--all` run."""
  header = (
    "| config | network | topology | batch, dtype | HBM per chip (of capacity) | TFLOP/step "
    "| est. step (basis) | images/s, MFU | all-reduce / all-gather | loops | compile |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
  )
  rows = [header]
  for result in plans:
    name = result.get("config_name", result.get("config", "?"))
    if "error" in result:
      rows.append(f"| {name} | FAILED: {result['error']} |" + " |" * 9)
      continue
    train = result["train"]
    hbm = train["hbm_per_chip"]
    collectives = train["collectives"]
    basis = "compiler" if train["step_seconds_basis"].startswith("compiler") else "roofline"
    reduces, gathers = (
      collectives.get(k, {}).get("count", 0) for k in ("all-reduce", "all-gather")
    )
    rows.append(
      f"| {name} | {result['config']} | {result['topology']} | "
      f"{result['global_batch']}, {result['dtype']} | "
      f"{hbm['total'] / GiB:.2f} of {hbm['capacity'] / GiB:.1f} GiB"
      f"{'' if hbm['fits'] else ' (does not fit)'} | {train['flops_per_step'] / 1e12:.3g} | "
      f"{train['step_seconds'] * 1e3:.2f} ms ({basis}) | "
      f"{train['images_per_second']:,.0f}, {train['mfu']:.1%} | "
      f"{reduces} / {gathers} | "
      f"{train['while_loops'] or ''}{' (undercounted)' if train['while_loops'] else ''} | "
      f"{train['compile_seconds']:.0f} s |"
    )
  return "\n".join(rows)


def format_plan(result: dict[str, Any]) -> str:
  """The plan as a short table."""
  gpu = result.get("platform") == "cuda"
  lines = [
    f"{result['config']} on {result['topology']} ({result['chips']} x "
    f"{result['chip']}), global batch {result['global_batch']}, {result['dtype']}"
    + (
      f" (peak {result['peak_tflops_per_chip']:g} TFLOP/s per chip)"
      if "peak_tflops_per_chip" in result
      else ""
    ),
    f"  (XLA:{'GPU' if gpu else 'TPU'} compiler estimates for a program that never ran, "
    "not measurements)",
  ]
  for name in ("train", "eval"):
    step = result.get(name)
    if step is None:
      continue
    hbm = step["hbm_per_chip"]
    lines.append(
      f"  {name:5s} HBM/chip: args {_gib(hbm['arguments'])}, temps "
      f"{_gib(hbm['temporaries'])}, outputs {_gib(hbm['outputs'])}, total "
      f"{_gib(hbm['total'])} of {_gib(hbm['capacity'])}: "
      + ("fits" if hbm["fits"] else "DOES NOT FIT")
      + f" (margin {_gib(hbm['margin'])})"
      + (
        ""
        if hbm.get("fits_default_preallocation", True)
        else f"; over JAX's default {GPU_DEFAULT_MEM_FRACTION:.0%} preallocation: raise "
        "XLA_PYTHON_CLIENT_MEM_FRACTION"
      )
    )
    mfu = f", MFU {100 * step['mfu']:.1f}%" if step["mfu"] is not None else ""
    ips = f", {step['images_per_second']:,.0f} images/s" if step["images_per_second"] else ""
    at_least = ""
    if step["step_seconds_basis"].startswith("compute bound only") and ips:
      # A lower bound on the time: images/s at most, MFU 100% by construction.
      at_least, mfu, ips = ">= ", "", f", at most {step['images_per_second']:,.0f} images/s"
    lines.append(
      f"        {step['flops_per_step'] / 1e12:.3f} TFLOP/step; est. step {at_least}"
      f"{1e3 * step['step_seconds']:.2f} ms [{step['step_seconds_basis']}]{ips}"
      f"{mfu}; compiled in {step['compile_seconds']:.0f} s"
    )
    ops = (
      ", ".join(
        f"{op} x{c['count']} ({c['bytes'] / 2**20:.1f} MiB)"
        for op, c in sorted(step["collectives"].items())
      )
      or "none"
    )
    if step.get("unfused_memory_seconds") is not None:
      lines.append(
        f"        unfused ops would move {_gib(step['unfused_bytes_accessed_per_chip'])}/GPU: "
        f"{1e3 * step['unfused_memory_seconds']:.2f} ms at {result['hbm_gbps_per_chip']:,.0f} "
        "GB/s (before fusion: an overestimate of the traffic)"
      )
    lines.append(f"        collectives: {ops}")
    if step.get("custom_calls"):
      calls = ", ".join(f"{k} x{n}" for k, n in step["custom_calls"].items())
      lines.append(f"        custom calls: {calls}")
    if step.get("while_loops"):
      lines.append(
        f"        NOTE: {step['while_loops']} loop(s) in the program; the cost analysis counts "
        "a loop's body once, so FLOPs, bytes and the step estimate undercount"
      )
    if step["float64"] or step["host_callbacks"]:
      lines.append(
        f"        WARNING: float64 {step['float64']}, host callbacks {step['host_callbacks']}"
      )
  if "bank" in result:
    lines.append(
      f"  bank {result['bank']['shape']} ({result['bank']['layout']}): "
      f"{_gib(result['bank']['total_bytes'])}, {_gib(result['bank']['per_chip_bytes'])} per chip"
    )
  if "max_batch" in result:
    largest, at_max = result["max_batch"]["max_global_batch"], result["max_batch"]["train_at_max"]
    line = f"  largest global batch that fits: {largest}"
    if at_max and at_max["images_per_second"]:
      mfu = f", MFU {100 * at_max['mfu']:.1f}%" if at_max["mfu"] is not None else ""
      line += (
        f" ({_gib(at_max['hbm_per_chip']['total'])} per chip; est. step "
        f"{1e3 * at_max['step_seconds']:.2f} ms [{at_max['step_seconds_basis']}], "
        f"{at_max['images_per_second']:,.0f} images/s{mfu})"
      )
    lines.append(line)
  return "\n".join(lines)


def load_config(value: str) -> Any:
  """A package config by `NAME[:ARG]` (or a config file), as `--config` names it."""
  import importlib.util

  from mcl_jax import config_lib

  path, _, arg = config_lib.resolve_config_path(value).partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"--config={value} names no config of mcl_jax/configs/ and no file.")
  spec = importlib.util.spec_from_file_location(f"_plan_config_{abs(hash(path))}", path)
  if spec is None or spec.loader is None:
    raise ConfigError(f"--config={value}: {path} cannot be loaded as a Python module.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


# ----------------------------------------------------------------------------- command


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
    "config", None, "An experiment config: NAME[:ARG].", lock_config=True
  )
  flags.DEFINE_string(
    "topology",
    "v4:2x2x4",
    f"A TPU slice ({EXAMPLES}) or NVIDIA GPUs as GPU:PARTITIONSxHOSTSxGPUS ({GPU_EXAMPLES}).",
  )
  flags.DEFINE_integer("batch", None, "Global batch (default: the config's).")
  flags.DEFINE_string("json_out", None, "Append the plan as one JSON line to this file.")
  flags.DEFINE_bool(
    "max_batch", False, "Also find the largest global batch that fits (a few compiles)."
  )
  flags.DEFINE_bool("eval", True, "Also compile the eval (or kNN feature) step.")
  flags.DEFINE_bool("all", False, "Plan every shipped config (config_lib.experiment_names).")
  flags.DEFINE_string(
    "table_from",
    None,
    "Print the plans of a --json_out file as one markdown table; compile nothing.",
  )
  flags.DEFINE_list(
    "names", [], "Plan these shipped configs (NAME[:ARG], comma-separated) as --all does."
  )


def plan_configs(
  configs: list[tuple[str | None, Any]],
  topology: str,
  *,
  batch: int | None = None,
  with_eval: bool = True,
  with_max_batch: bool = False,
  json_out: str | None = None,
) -> list[dict[str, Any]]:
  """Plans each (name, config) on `topology`, prints each plan and appends it to `json_out`.

  A named config (one of --all or --names) that cannot be planned is reported and skipped,
  so one failure does not lose the others' plans: a ConfigError is printed, any other error
  (a compile failure) is printed and written to `json_out` as {"config_name", "error"}.
  An unnamed config (--config) raises instead. Returns the plans written.
  """

  def append(record: dict[str, Any]) -> None:
    if json_out:
      with open(json_out, "a") as f:
        f.write(json.dumps(record) + "\n")

  plans = []
  for index, (name, config) in enumerate(configs, 1):
    if name is not None:
      print(f"[{index}/{len(configs)}] planning {name} on {topology}", flush=True)
    config = config.copy_and_resolve_references()
    if batch:
      config.input.global_batch_size = batch
    try:
      result = plan(config, topology, with_eval=with_eval)
      if with_max_batch:
        result["max_batch"] = max_batch(
          config, topology, report=lambda line: print(line, flush=True)
        )
    except ConfigError as e:
      if name is None:
        raise
      print(f"{name}: not planned: {e}", flush=True)
      continue
    except Exception as e:  # noqa: BLE001 - one config's compile failure must not end --all
      if name is None:
        raise
      failure = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
      print(f"{name}: FAILED to compile: {failure}", flush=True)
      append({"config_name": name, "topology": topology, "error": failure})
      continue
    if name is not None:
      result["config_name"] = name
    print(format_plan(result), flush=True)
    append(result)
    plans.append(result)
  return plans


def main(argv: list[str]) -> None:
  from absl import flags

  from mcl_jax import config_lib

  FLAGS = flags.FLAGS
  if len(argv) > 1:
    errors.exit_with(f"unexpected arguments {' '.join(argv[1:])}; pass options as --flag=value.")
  configs: list[tuple[str | None, Any]]
  if FLAGS.table_from:
    try:
      with open(FLAGS.table_from) as f:
        print(markdown_table([json.loads(line) for line in f if line.strip()]))
    except (OSError, ValueError, KeyError) as e:
      errors.exit_with(f"--table_from={FLAGS.table_from}: not a file of mcl-plan JSON lines ({e}).")
    return
  try:
    if FLAGS.all or FLAGS.names:
      names = FLAGS.names or config_lib.experiment_names()
      configs = [(name, load_config(name)) for name in names]
    elif FLAGS.config is None:
      errors.exit_with("pass --config=NAME[:ARG] (or --all, or --names=A,B).")
    else:
      configs = [(None, FLAGS.config)]
    chip_spec(FLAGS.topology)
    topology_devices(FLAGS.topology)
    plan_configs(
      configs,
      FLAGS.topology,
      batch=FLAGS.batch,
      with_eval=FLAGS.eval,
      with_max_batch=FLAGS.max_batch,
      json_out=FLAGS.json_out,
    )
  except ConfigError as e:
    errors.exit_with(str(e))


def run_cli() -> None:
  """The `mcl-plan` command."""
  from absl import app

  from mcl_jax import main as main_lib

  _define_flags()
  app.run(main, flags_parser=main_lib._parse_flags)  # pylint: disable=protected-access


if __name__ == "__main__":
  run_cli()
