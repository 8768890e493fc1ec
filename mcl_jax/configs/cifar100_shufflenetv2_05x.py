"""CIFAR-100, shufflenetv2_0.5x: baseline and MCL (paper Table 3 / Table 1).

Launch (one variant per run; final-epoch top-1 is what to compare):
  mcl-train --config=cifar100_shufflenetv2_05x:baseline --workdir=WORKDIR   # published top-1 67.39%
  mcl-train --config=cifar100_shufflenetv2_05x:mcl_x2 --workdir=WORKDIR   # published top-1 69.55%
  mcl-train --config=cifar100_shufflenetv2_05x:mcl_x4 --workdir=WORKDIR   # published top-1 70.92%
  # no published number:
  mcl-train --config=cifar100_shufflenetv2_05x:mcl_x4_logit --workdir=WORKDIR
Smoke run on a CPU: --config=cifar100_shufflenetv2_05x:mcl_x2,smoke
Variants are described in mcl_jax/configs/cifar100_common.py.
"""

from mcl_jax.configs import cifar100_common


def get_config(arg=None):
  return cifar100_common.make("shufflenetv2_0.5x", arg)
