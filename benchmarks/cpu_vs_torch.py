r"""The JAX step against the PyTorch step on the same CPU, side by side, and where the gap is.

  python benchmarks/cpu_vs_torch.py [--arch_blocks=5] [--members=2] [--batch=128] \
      [--image_size=32] [--rounds=2] [--steps=3]

Alternates PyTorch (benchmarks/torch_step.py, our port of the official step; oneDNN) and
JAX (`mcl_jax.bench`, the trainer's jitted step; XLA:CPU) `--rounds` times in ONE process
so both see the same machine load, and prints the median step times and their ratio.
Then times the three convolutions of one layer of each resnet32 stage in both frameworks
(forward, gradient with respect to the input, gradient with respect to the weights):
the measured breakdown in docs/PERFORMANCE.md, "The CPU gap", comes from here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

# One layer per resnet32 stage at B = 128, 32x32 input: (spatial, in, out, stride).
CONV_SHAPES = ((32, 16, 16, 1), (16, 32, 32, 1), (8, 64, 64, 1))


def _median_time(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def conv_breakdown(batch: int, repeats: int = 5) -> list[dict]:
  """ms of fwd / d-input / d-weight of a 3x3 conv in JAX (NHWC) and PyTorch (NCHW and
  channels_last) for each CONV_SHAPES entry."""
  return [_conv_row(batch, *shape, repeats=repeats) for shape in CONV_SHAPES]


def _conv_row(batch: int, size: int, cin: int, cout: int, stride: int, *, repeats: int) -> dict:
  """One CONV_SHAPES entry of `conv_breakdown`."""
  import jax
  import jax.numpy as jnp

  x = jnp.asarray(np.random.randn(batch, size, size, cin), jnp.float32)
  w = jnp.asarray(np.random.randn(3, 3, cin, cout), jnp.float32)

  def conv(x, w):
    return jax.lax.conv_general_dilated(
      x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  fwd = jax.jit(conv)
  dx = jax.jit(jax.grad(lambda x, w: conv(x, w).sum(), argnums=0))
  dw = jax.jit(jax.grad(lambda x, w: conv(x, w).sum(), argnums=1))
  row = {"shape": f"{batch}x{size}x{size}x{cin}->{cout}"}
  for name, f in (("fwd", fwd), ("dx", dx), ("dw", dw)):
    row[f"jax_{name}"] = 1e3 * _median_time(lambda f=f: f(x, w).block_until_ready(), repeats)
  for layout in ("nchw", "channels_last"):
    row.update(_torch_conv_times(batch, size, cin, cout, stride, layout, repeats=repeats))
  return row


def _torch_conv_times(
  batch: int, size: int, cin: int, cout: int, stride: int, layout: str, *, repeats: int
) -> dict:
  import torch
  import torch.nn.functional as F

  xt = torch.randn(batch, cin, size, size)
  if layout == "channels_last":
    xt = xt.to(memory_format=torch.channels_last)
  xt.requires_grad_(True)
  wt = torch.randn(cout, cin, 3, 3, requires_grad=True)

  def fwd_t():
    with torch.no_grad():
      F.conv2d(xt, wt, stride=stride, padding=1)

  def dx_t():
    y = F.conv2d(xt, wt.detach(), stride=stride, padding=1)
    torch.autograd.grad(y.sum(), xt)

  def dw_t():
    y = F.conv2d(xt.detach(), wt, stride=stride, padding=1)
    torch.autograd.grad(y.sum(), wt)

  return {
    f"torch_{layout}_{name}": 1e3 * _median_time(f, repeats)
    for name, f in (("fwd", fwd_t), ("dx", dx_t), ("dw", dw_t))
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--members", type=int, default=2)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--skip_breakdown", action="store_true")
  args = parser.parse_args(argv)

  import jax
  import torch

  from mcl_jax import bench
  from mcl_jax import sharding as sharding_lib
  import torch_step

  mesh = sharding_lib.make_mesh(jax.devices()[:1])
  setting = bench.Setting(
    "resnet32", args.members, "unroll", True, "float32", args.batch, args.image_size, 100
  )
  print(
    f"# {os.cpu_count()} CPUs, load {os.getloadavg()}; torch {torch.__version__} "
    f"({torch.get_num_threads()} threads), jax {jax.__version__}",
    flush=True,
  )
  jax_times, torch_times = [], []
  for r in range(args.rounds):
    t = torch_step.measure(
      args.members,
      args.batch,
      args.image_size,
      official=None,
      amp=False,
      channels_last=False,
      steps=args.steps,
      warmup=1,
    )
    torch_times.append(t["step_s_median"])
    j = bench.measure(setting, auto=True, steps=args.steps, warmup=1, mesh=mesh)
    jax_times.append(j["step_s_median"])
    print(
      f"round {r}: PyTorch {1e3 * torch_times[-1]:.0f} ms/step, JAX {1e3 * jax_times[-1]:.0f} "
      f"ms/step (compile {j['compile_s']:.1f} s)",
      flush=True,
    )
  ratio = np.median(jax_times) / np.median(torch_times)
  print(
    f"resnet32 x{args.members} MCL, B={args.batch}, {args.image_size}px, float32: JAX "
    f"{1e3 * np.median(jax_times):.0f} ms / PyTorch {1e3 * np.median(torch_times):.0f} "
    f"ms per step = {ratio:.2f}x",
    flush=True,
  )
  if args.skip_breakdown:
    return
  print("\n3x3 convolution, ms (median of 5): JAX NHWC | PyTorch NCHW | PyTorch channels_last")
  for row in conv_breakdown(args.batch):
    print(
      f"{row['shape']:<20} "
      + "  ".join(
        f"{op}: {row[f'jax_{op}']:.1f} | {row[f'torch_nchw_{op}']:.1f} | "
        f"{row[f'torch_channels_last_{op}']:.1f}"
        for op in ("fwd", "dx", "dw")
      ),
      flush=True,
    )


if __name__ == "__main__":
  main()
