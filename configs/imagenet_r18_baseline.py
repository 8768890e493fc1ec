"""ImageNet, ResNet-18 baseline: two independent networks (every MCL weight 0). Published top-1: 69.76% (paper Tables 2 and 4).

  python -m mcl_jax.main --config=configs/imagenet_r18_baseline.py \
      --config.input.data_dir=DATA_DIR --workdir=gs://BUCKET/imagenet_r18_baseline
  python -m mcl_jax.main --config=configs/imagenet_r18_baseline.py:smoke --workdir=/tmp/imagenet_r18_baseline  # CPU
Recipe and smoke mode: configs/imagenet_common.py.
"""
from configs import imagenet_common


def get_config(arg=None):
  return imagenet_common.make('resnet18', 2, mcl=False, logit=False, arg=arg)
