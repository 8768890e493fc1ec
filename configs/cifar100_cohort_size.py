"""CIFAR-100 cohort size (paper Table 7): resnet32, MCL with M = 2..6 members.

Published top-1: M=2 72.96, M=3 73.74, M=4 74.04, M=5 74.10, M=6 73.98 (%).
  python -m mcl_jax.main --config=configs/cifar100_cohort_size.py:3 --workdir=WORKDIR
M = 2 is two separate networks; M > 2 shares the stem + first stage, as the official code.
Append ',smoke' for a CPU smoke run (e.g. `:5,smoke`).
"""
from configs import cifar100_common


def get_config(arg=None):
  parts = [p for p in (arg or "2").split(",") if p]
  is_smoke = "smoke" in parts
  sizes = [p for p in parts if p != "smoke"] or ["2"]
  if len(sizes) != 1 or not sizes[0].isdigit() or not 2 <= int(sizes[0]) <= 8:
    raise ValueError(f"config argument {arg!r}: expected a cohort size 2..8, optionally ',smoke'.")
  c = cifar100_common.base("resnet32")
  c.cohort.num_members = int(sizes[0])
  c.model.shared_stages = 0 if c.cohort.num_members == 2 else 2
  return cifar100_common.smoke(c) if is_smoke else c
