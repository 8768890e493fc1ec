"""CIFAR-100, shufflenetv2_1x: baseline and MCL (paper Table 3 / Table 1).

Launch (one variant per run; final-epoch top-1 is what to compare):
  mcl-train --config=cifar100_shufflenetv2_1x:baseline --workdir=WORKDIR   # published top-1 70.93%
  mcl-train --config=cifar100_shufflenetv2_1x:mcl_x2 --workdir=WORKDIR   # published top-1 73.26%
  mcl-train --config=cifar100_shufflenetv2_1x:mcl_x4 --workdir=WORKDIR   # published top-1 75.18%
  # published top-1 77.02%:
  mcl-train --config=cifar100_shufflenetv2_1x:mcl_x4_logit --workdir=WORKDIR
Smoke run on a CPU: --config=cifar100_shufflenetv2_1x:mcl_x2,smoke
Variants are described in mcl_jax/configs/cifar100_common.py.
"""

from mcl_jax.configs import cifar100_common


def get_config(arg=None):
  return cifar100_common.make("shufflenetv2_1x", arg)
