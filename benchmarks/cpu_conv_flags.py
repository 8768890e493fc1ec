r"""Do XLA:CPU's library-fusion flags, or another formulation of the weight gradient, close
the convolution gap? One 3x3 convolution (the resnet32 layer where the gap is largest),
timed under each flag setting; then its weight gradient written two other ways.

  python benchmarks/cpu_conv_flags.py [--rounds=2] [--batch=128]

Each setting runs in its own process (XLA_FLAGS is read once per process), rounds
alternate the settings so that all of them see the same machine load; a setting this
jaxlib rejects is reported as such. The flags are those jaxlib 0.10's XLA names:
oneDNN custom calls and fusions, XNNPACK fusions and graph fusion, YNNPACK fusions
(whose types include convolutions). The formulations: im2col (patches, then one matmul)
and nine shifted matmuls, each checked against XLA's own gradient. docs/PERFORMANCE.md,
"The CPU gap", cites the output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

SETTINGS = (
  ("default", ""),
  ("onednn custom call", "--xla_cpu_experimental_onednn_custom_call=true"),
  (
    "onednn fusion dot,eltwise,reduce",
    "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
  ),
  ("xnn fusion dot,eltwise,reduce", "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce"),
  (
    "xnn graph fusion greedy",
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
  ),
  (
    "ynn fusion individual_convolution",
    "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
  ),
  (
    "ynn fusion individual_convolution,dot,eltwise",
    "--xla_cpu_experimental_ynn_fusion_type=individual_convolution,dot,eltwise",
  ),
)

CHILD = r"""
import json, sys, time
import numpy as np, jax, jax.numpy as jnp
batch, size, cin, cout = map(int, sys.argv[1:5])
x = jnp.asarray(np.random.randn(batch, size, size, cin), jnp.float32)
w = jnp.asarray(np.random.randn(3, 3, cin, cout), jnp.float32)
conv = lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
fns = {"fwd": jax.jit(conv), "dx": jax.jit(jax.grad(lambda x, w: conv(x, w).sum(), 0)),
       "dw": jax.jit(jax.grad(lambda x, w: conv(x, w).sum(), 1))}
out = {}
for name, f in fns.items():
  f(x, w).block_until_ready()
  times = []
  for _ in range(5):
    t = time.perf_counter(); f(x, w).block_until_ready(); times.append(time.perf_counter() - t)
  out[name] = 1e3 * float(np.median(times))
print(json.dumps(out))
"""


def run_setting(flags: str, shape: tuple[int, int, int, int]) -> dict | str:
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", CHILD, *map(str, shape)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  if proc.returncode:
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return f"rejected or failed: {last[:160]}"
  return json.loads(proc.stdout.strip().splitlines()[-1])


FORMULATIONS = r"""
import time, numpy as np, jax, jax.numpy as jnp
def median_ms(f, *args):
  f(*args).block_until_ready(); times = []
  for _ in range(5):
    t = time.perf_counter(); f(*args).block_until_ready(); times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))
dn = ("NHWC", "HWIO", "NHWC")
for b, s, ci, co in ((128, 32, 16, 16), (128, 16, 32, 32), (128, 8, 64, 64)):
  x = jnp.asarray(np.random.randn(b, s, s, ci), jnp.float32)
  w = jnp.asarray(np.random.randn(3, 3, ci, co), jnp.float32)
  dy = jnp.asarray(np.random.randn(b, s, s, co), jnp.float32)
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                   dimension_numbers=dn)
  xla = jax.jit(lambda x, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
  def im2col(x, dy):  # patches are ordered (channel, kh, kw)
    p = jax.lax.conv_general_dilated_patches(x, (3, 3), (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=dn)
    return jnp.einsum("bhwk,bhwo->ko", p, dy).reshape(ci, 3, 3, co).transpose(1, 2, 0, 3)
  def shifted(x, dy):
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.stack([jnp.stack([jnp.einsum("bhwc,bhwo->co", xp[:, i:i + s, j:j + s], dy)
                                 for j in range(3)]) for i in range(3)])
  ref = np.asarray(xla(x, dy))
  for f in (im2col, shifted):
    np.testing.assert_allclose(np.asarray(jax.jit(f)(x, dy)), ref, rtol=2e-3, atol=2e-2)
  print(f"| {b}x{s}x{s}x{ci}->{co} | {median_ms(xla, x, dy):.1f} | "
        f"{median_ms(jax.jit(im2col), x, dy):.1f} | {median_ms(jax.jit(shifted), x, dy):.1f} |",
        flush=True)
"""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--batch", type=int, default=128)
  args = parser.parse_args()
  shape = (args.batch, 32, 16, 16)
  print(
    f"# 3x3 conv {args.batch}x32x32x16 -> 16, ms (median of 5) per round; load {os.getloadavg()}",
    flush=True,
  )
  results: dict[str, list] = {name: [] for name, _ in SETTINGS}
  for r in range(args.rounds):
    for name, flags in SETTINGS:
      result = run_setting(flags, shape)
      results[name].append(result)
      shown = (
        result if isinstance(result, str) else "  ".join(f"{k} {v:7.1f}" for k, v in result.items())
      )
      print(f"round {r} {name:48s} {shown}", flush=True)
  print("\n| setting | fwd ms | d-input ms | d-weight ms |\n|---|---|---|---|")
  for name, runs in results.items():
    good = [x for x in runs if isinstance(x, dict)]
    if not good:
      print(f"| {name} | {runs[0]} | | |")
      continue
    cells = [f"{np.median([g[k] for g in good]):.1f}" for k in ("fwd", "dx", "dw")]
    print(f"| {name} | " + " | ".join(cells) + " |")
  print(
    "\nThe weight gradient written other ways, ms (median of 5), default flags:\n"
    "| conv | XLA's gradient | im2col + matmul | 9 shifted matmuls |\n|---|---|---|---|",
    flush=True,
  )
  subprocess.run(
    [sys.executable, "-c", FORMULATIONS], check=True, env=dict(os.environ, JAX_PLATFORMS="cpu")
  )
  print(f"# load after {os.getloadavg()}")


if __name__ == "__main__":
  main()
