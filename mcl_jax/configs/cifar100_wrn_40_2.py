"""CIFAR-100, wrn_40_2: baseline and MCL (paper Table 3 / Table 1).

Launch (one variant per run; final-epoch top-1 is what to compare):
  mcl-train --config=cifar100_wrn_40_2:baseline --workdir=WORKDIR   # published top-1 76.89%
  mcl-train --config=cifar100_wrn_40_2:mcl_x2 --workdir=WORKDIR   # published top-1 77.51%
  mcl-train --config=cifar100_wrn_40_2:mcl_x4 --workdir=WORKDIR   # published top-1 78.84%
  mcl-train --config=cifar100_wrn_40_2:mcl_x4_logit --workdir=WORKDIR   # published top-1 80.02%
Smoke run on a CPU: --config=cifar100_wrn_40_2:mcl_x2,smoke
Variants are described in mcl_jax/configs/cifar100_common.py.
"""

from mcl_jax.configs import cifar100_common


def get_config(arg=None):
  return cifar100_common.make("wrn_40_2", arg)
