"""ImageNet, ResNet-34, MCL x2. Published top-1: 74.13% (paper Tables 2 and 4).

  python -m mcl_jax.main --config=configs/imagenet_r34_x2.py \
      --config.input.data_dir=DATA_DIR --workdir=gs://BUCKET/imagenet_r34_x2
  python -m mcl_jax.main --config=configs/imagenet_r34_x2.py:smoke --workdir=/tmp/imagenet_r34_x2  # CPU
Recipe and smoke mode: configs/imagenet_common.py.
"""
from configs import imagenet_common


def get_config(arg=None):
  return imagenet_common.make('resnet34', 2, mcl=True, logit=False, arg=arg)
