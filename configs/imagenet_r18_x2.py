"""ImageNet, ResNet-18, MCL x2. Published top-1: 70.32% (paper Tables 2 and 4).

  python -m mcl_jax.main --config=configs/imagenet_r18_x2.py \
      --config.input.data_dir=DATA_DIR --workdir=gs://BUCKET/imagenet_r18_x2
  python -m mcl_jax.main --config=configs/imagenet_r18_x2.py:smoke --workdir=/tmp/imagenet_r18_x2  # CPU
Recipe and smoke mode: configs/imagenet_common.py.
"""
from configs import imagenet_common


def get_config(arg=None):
  return imagenet_common.make('resnet18', 2, mcl=True, logit=False, arg=arg)
