r"""MoCo v2 + MCL x2, ResNet-18, ImageNet (SPEC 2.3, 4; paper Table 5).

  python -m mcl_jax.main --config=configs/mocov2_r18_x2.py --workdir=runs/mocov2_r18_x2 \
      --config.input.data_dir=DATA_DIR
  python -m mcl_jax.export --workdir=runs/mocov2_r18_x2 --member=0 --out=runs/mocov2_r18_x2/member0
  python -m mcl_jax.main --config=configs/lincls_r18.py --workdir=runs/mocov2_r18_x2_lincls \
      --config.lincls.pretrained=runs/mocov2_r18_x2/member0 --config.input.data_dir=DATA_DIR

Published linear-probe top-1 (ImageNet, ResNet-18): MoCo v2 52.30 -> MCL x2 52.76
(`mocov2_r18_baseline.py` is the single-network MoCo v2). As `moco_r18_x2.py` but MoCo v2:
the MLP head Dense(512, 512)-ReLU-Dense(512, 128) (built for real: the official `--mlp` is
a silent no-op, see mcl_jax/moco.py), tau 0.2, cosine LR, and the v2 augmentation (colour
jitter 0.4/0.4/0.4/0.1 p=0.8, grayscale p=0.2, Gaussian blur sigma [0.1, 2] p=0.5, flip).

`:smoke` runs a few steps of the `tiny` arch on 16x16 synthetic data with a 64-key queue.
"""
from configs import moco_r18_x2


def get_config(arg=None):
  return moco_r18_x2.make(version=2, num_members=2, arg=arg)
