"""CIFAR-100 cohort size (paper Table 7): resnet32, MCL with M = 2..6 members.

Published top-1: M=2 72.96, M=3 73.74, M=4 74.04, M=5 74.10, M=6 73.98 (%).
  mcl-train --config=cifar100_cohort_size:3 --workdir=WORKDIR
M = 2 is two separate networks; M > 2 shares the stem + first stage, as the official code.
Append ',smoke' for a CPU smoke run (e.g. `:5,smoke`).
"""

from mcl_jax.configs import cifar100_common
from mcl_jax.configs import common


def get_config(arg=None):
  size, is_smoke = common.parse_arg(arg, lambda v: v.isdigit() and 2 <= int(v) <= 8, "2")
  c = cifar100_common.base("resnet32")
  c.cohort.num_members = int(size)
  c.model.shared_stages = 0 if c.cohort.num_members == 2 else 2
  return common.smoke(c) if is_smoke else c
