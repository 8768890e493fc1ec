"""ImageNet, ResNet-18, MCL x2. Published top-1: 70.32% (paper Tables 2 and 4).

  mcl-train --config=imagenet_r18_x2 \
      --config.input.data_dir=DATA_DIR --workdir=gs://BUCKET/imagenet_r18_x2
  mcl-train --config=imagenet_r18_x2:smoke --workdir=/tmp/imagenet_r18_x2  # CPU
Recipe and smoke mode: configs/imagenet_common.py.
"""

from mcl_jax.configs import imagenet_common


def get_config(arg=None):
  return imagenet_common.make("resnet18", 2, mcl=True, logit=False, arg=arg)
