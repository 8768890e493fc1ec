"""CIFAR-100, resnet32: baseline and MCL (paper Table 3 / Table 1).

Launch (one variant per run; final-epoch top-1 is what to compare):
  mcl-train --config=cifar100_resnet32:baseline --workdir=WORKDIR   # published top-1 70.91%
  mcl-train --config=cifar100_resnet32:mcl_x2 --workdir=WORKDIR   # published top-1 72.96%
  mcl-train --config=cifar100_resnet32:mcl_x4 --workdir=WORKDIR   # published top-1 74.04%
  mcl-train --config=cifar100_resnet32:mcl_x4_logit --workdir=WORKDIR   # no published number
Smoke run on a CPU: --config=cifar100_resnet32:mcl_x2,smoke
Variants are described in mcl_jax/configs/cifar100_common.py.
"""

from mcl_jax.configs import cifar100_common


def get_config(arg=None):
  return cifar100_common.make("resnet32", arg)
