"""CIFAR-100, hcgnet_a1: baseline and MCL (paper Table 3 / Table 1).

Launch (one variant per run; final-epoch top-1 is what to compare):
  mcl-train --config=cifar100_hcgnet_a1:baseline --workdir=WORKDIR   # published top-1 77.42%
  mcl-train --config=cifar100_hcgnet_a1:mcl_x2 --workdir=WORKDIR   # published top-1 78.62%
  mcl-train --config=cifar100_hcgnet_a1:mcl_x4 --workdir=WORKDIR   # published top-1 79.50%
  mcl-train --config=cifar100_hcgnet_a1:mcl_x4_logit --workdir=WORKDIR   # no published number
Smoke run on a CPU: --config=cifar100_hcgnet_a1:mcl_x2,smoke
Variants are described in mcl_jax/configs/cifar100_common.py.
"""

from mcl_jax.configs import cifar100_common


def get_config(arg=None):
  return cifar100_common.make("hcgnet_a1", arg)
