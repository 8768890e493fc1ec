"""ImageNet, ResNet-18 baseline: two independent networks (every MCL weight 0).
Published top-1: 69.76% (paper Tables 2 and 4).

  mcl-train --config=imagenet_r18_baseline \
      --config.input.data_dir=DATA_DIR --workdir=gs://BUCKET/imagenet_r18_baseline
  mcl-train --config=imagenet_r18_baseline:smoke --workdir=/tmp/imagenet_r18_baseline  # CPU
Recipe and smoke mode: configs/imagenet_common.py.
"""

from mcl_jax.configs import imagenet_common


def get_config(arg=None):
  return imagenet_common.make("resnet18", 2, mcl=False, logit=False, arg=arg)
