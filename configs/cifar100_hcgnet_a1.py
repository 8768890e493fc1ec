"""CIFAR-100, hcgnet_a1: baseline and MCL (paper Table 3 / Table 1).

Launch (one variant per run; final-epoch top-1 is what to compare):
  python -m mcl_jax.main --config=configs/cifar100_hcgnet_a1.py:baseline --workdir=WORKDIR   # published top-1 77.42%
  python -m mcl_jax.main --config=configs/cifar100_hcgnet_a1.py:mcl_x2 --workdir=WORKDIR   # published top-1 78.62%
  python -m mcl_jax.main --config=configs/cifar100_hcgnet_a1.py:mcl_x4 --workdir=WORKDIR   # published top-1 79.50%
  python -m mcl_jax.main --config=configs/cifar100_hcgnet_a1.py:mcl_x4_logit --workdir=WORKDIR   # no published number
Smoke run on a CPU: --config=configs/cifar100_hcgnet_a1.py:mcl_x2,smoke
Variants are described in configs/cifar100_common.py.
"""
from configs import cifar100_common


def get_config(arg=None):
  return cifar100_common.make('hcgnet_a1', arg)
