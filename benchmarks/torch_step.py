r"""Time the PyTorch MCL training step: the official code when it is there, else our port.

  python benchmarks/torch_step.py --members=2,4 --batch=128 --image_size=32 \
      [--official=.official/winycg_MCL] [--amp] [--channels_last] [--json_out=FILE]

With `--official=DIR` holding the official repository (`models/`, `losses/`; never
committed here, see docs/PERFORMANCE.md), the step is exactly `main_cifar.py`'s:
`models.resnet32(num_classes=100, number_net=M)` (two separate networks for M = 2, the
shared-trunk `ResNet_b` otherwise), `Sup_MCL_Loss` with its heads, CE of every member plus
0.1 VCL + 1 Soft VCL + 0.1 ICL + 1 Soft ICL, torch SGD (0.9, Nesterov, wd 5e-4). Without it,
`benchmarks/torch_mcl.py` (our port of the same step, independent members only) is timed.
`--amp` adds torch.autocast(bfloat16 on CPU, float16 + GradScaler on CUDA) and
`--channels_last` the NHWC memory format: what a user would do to make the official code
fast. One JSON line per setting (`--json_out`), the same keys as `mcl_jax.bench` where
they mean the same thing (framework='torch').
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types

import numpy as np

import _common  # benchmarks/_common.py (this folder is on sys.path when run as a script)

HERE = os.path.dirname(os.path.abspath(__file__))


def build(members: int, official: str | None, device: str, channels_last: bool):
  """(module with parameters, forward(x, y) -> loss)."""
  import torch
  import torch.nn.functional as F

  if official:
    sys.path.insert(0, os.path.abspath(official))
    torch.Tensor.cuda = (
      (lambda self, *a, **k: self.to(device)) if device != "cuda" else torch.Tensor.cuda
    )
    from losses.cifar_sup_mcl_loss import Sup_MCL_Loss
    import models  # the official models/

    net = models.resnet32(num_classes=100, number_net=members)
    args = types.SimpleNamespace(
      number_net=members, feat_dim=128, kd_T=3.0, tau=0.1, rep_dim=[64] * members
    )
    criterion = Sup_MCL_Loss(args)
    module = torch.nn.ModuleDict({"net": net, "embed": criterion.embed_list}).to(device)

    def forward(x, y):
      logits, embeddings = net(x)
      loss = sum(F.cross_entropy(logit, y) for logit in logits)
      vcl, soft_vcl, icl, soft_icl = criterion(list(embeddings), y)
      return loss + 0.1 * vcl + soft_vcl + 0.1 * icl + soft_icl
  else:
    sys.path.insert(0, HERE)
    import torch_mcl

    cohort = torch_mcl.Cohort(members, (5, 5, 5), 100).to(device)
    module = cohort

    def forward(x, y):
      logits, z = cohort(x)
      loss = sum(F.cross_entropy(logit, y) for logit in logits)
      vcl, icl, soft_vcl, soft_icl = torch_mcl.mcl_terms(z, y)
      return loss + 0.1 * vcl + 0.1 * icl + soft_vcl + soft_icl

  if channels_last:
    module = module.to(memory_format=torch.channels_last)
  return module, forward


def measure(
  members: int,
  batch: int,
  image_size: int,
  *,
  official: str | None,
  amp: bool,
  channels_last: bool,
  steps: int,
  warmup: int,
) -> dict:
  import torch

  device = "cuda" if torch.cuda.is_available() else "cpu"
  # main_cifar.py sets cudnn.benchmark (per-shape algorithm search); so does this timing.
  torch.backends.cudnn.benchmark = True
  torch.manual_seed(0)
  module, forward = build(members, official, device, channels_last)
  opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
  scaler = torch.amp.GradScaler("cuda") if amp and device == "cuda" else None
  amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16
  x = torch.randn(batch, 3, image_size, image_size, device=device)
  if channels_last:
    x = x.to(memory_format=torch.channels_last)
  y = (torch.arange(batch, device=device) // 2) % 100  # class pairs, as the official sampler

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, dtype=amp_dtype, enabled=amp):
      loss = forward(x, y)
    if scaler is not None:
      scaler.scale(loss).backward()
      scaler.step(opt)
      scaler.update()
    else:
      loss.backward()
      opt.step()
    return loss

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  for _ in range(warmup):
    step()
  sync()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - t)
  median = float(np.median(times))
  return {
    "framework": "torch",
    "code": "official" if official else "port",
    "arch": "resnet32",
    "members": members,
    "batch": batch,
    "image_size": image_size,
    "dtype": ("float16" if device == "cuda" else "bfloat16") if amp else "float32",
    "channels_last": channels_last,
    "device": device,
    "device_kind": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    "torch_threads": torch.get_num_threads(),
    "step_s_median": median,
    "step_s_p10": float(np.percentile(times, 10)),
    "step_s_p90": float(np.percentile(times, 90)),
    "steps": steps,
    "member_images_per_s": members * batch / median,
    "loss": float(loss),
    "torch_version": torch.__version__,
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--members", default="2,4")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--official", default=None, help="folder of the official repository")
  parser.add_argument("--amp", action="store_true")
  parser.add_argument("--channels_last", action="store_true")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--json_out", default=None)
  args = parser.parse_args(argv)
  official = args.official if args.official and os.path.isdir(args.official) else None
  if args.official and not official:
    print(f"# {args.official} not found: timing the port (benchmarks/torch_mcl.py)")
  for m in (int(v) for v in args.members.split(",")):
    record = measure(
      m,
      args.batch,
      args.image_size,
      official=official,
      amp=args.amp,
      channels_last=args.channels_last,
      steps=args.steps,
      warmup=args.warmup,
    )
    print(
      f"torch {record['code']:<8} M={m} B={args.batch} {args.image_size}px "
      f"{record['dtype']:<8} channels_last={args.channels_last} "
      f"{1e3 * record['step_s_median']:.1f} ms/step "
      f"{record['member_images_per_s']:.0f} member-img/s",
      flush=True,
    )
    _common.append_json_line(args.json_out, record)


if __name__ == "__main__":
  main()
