"""CIFAR-100, hcgnet_a2: baseline and MCL (paper Table 3 / Table 1).

Launch (one variant per run; final-epoch top-1 is what to compare):
  mcl-train --config=cifar100_hcgnet_a2:baseline --workdir=WORKDIR   # published top-1 79.00%
  mcl-train --config=cifar100_hcgnet_a2:mcl_x2 --workdir=WORKDIR   # no published number
  mcl-train --config=cifar100_hcgnet_a2:mcl_x4 --workdir=WORKDIR   # no published number
  mcl-train --config=cifar100_hcgnet_a2:mcl_x4_logit --workdir=WORKDIR   # published top-1 82.47%
Smoke run on a CPU: --config=cifar100_hcgnet_a2:mcl_x2,smoke
Variants are described in mcl_jax/configs/cifar100_common.py.
"""

from mcl_jax.configs import cifar100_common


def get_config(arg=None):
  return cifar100_common.make("hcgnet_a2", arg)
