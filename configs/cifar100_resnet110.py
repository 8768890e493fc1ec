"""CIFAR-100, resnet110: baseline and MCL (paper Table 3 / Table 1).

Launch (one variant per run; final-epoch top-1 is what to compare):
  python -m mcl_jax.main --config=configs/cifar100_resnet110.py:baseline --workdir=WORKDIR   # published top-1 75.29%
  python -m mcl_jax.main --config=configs/cifar100_resnet110.py:mcl_x2 --workdir=WORKDIR   # published top-1 77.12%
  python -m mcl_jax.main --config=configs/cifar100_resnet110.py:mcl_x4 --workdir=WORKDIR   # published top-1 78.82%
  python -m mcl_jax.main --config=configs/cifar100_resnet110.py:mcl_x4_logit --workdir=WORKDIR   # no published number
Smoke run on a CPU: --config=configs/cifar100_resnet110.py:mcl_x2,smoke
Variants are described in configs/cifar100_common.py.
"""
from configs import cifar100_common


def get_config(arg=None):
  return cifar100_common.make('resnet110', arg)
