"""ImageNet, ResNet-18, MCL x4 (shared stem + layer1 + layer2).
Published top-1: 70.77% (paper Tables 2 and 4).

  mcl-train --config=imagenet_r18_x4 \
      --config.input.data_dir=DATA_DIR --workdir=gs://BUCKET/imagenet_r18_x4
  mcl-train --config=imagenet_r18_x4:smoke --workdir=/tmp/imagenet_r18_x4  # CPU
Recipe and smoke mode: configs/imagenet_common.py.
"""

from mcl_jax.configs import imagenet_common


def get_config(arg=None):
  return imagenet_common.make("resnet18", 4, mcl=True, logit=False, arg=arg)
