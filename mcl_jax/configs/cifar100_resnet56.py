"""CIFAR-100, resnet56: baseline and MCL (paper Table 3 / Table 1).

Launch (one variant per run; final-epoch top-1 is what to compare):
  mcl-train --config=cifar100_resnet56:baseline --workdir=WORKDIR   # published top-1 73.15%
  mcl-train --config=cifar100_resnet56:mcl_x2 --workdir=WORKDIR   # published top-1 74.48%
  mcl-train --config=cifar100_resnet56:mcl_x4 --workdir=WORKDIR   # published top-1 75.74%
  mcl-train --config=cifar100_resnet56:mcl_x4_logit --workdir=WORKDIR   # no published number
Smoke run on a CPU: --config=cifar100_resnet56:mcl_x2,smoke
Variants are described in mcl_jax/configs/cifar100_common.py.
"""

from mcl_jax.configs import cifar100_common


def get_config(arg=None):
  return cifar100_common.make("resnet56", arg)
