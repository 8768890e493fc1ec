r"""MoCo v2, one ResNet-18, ImageNet: the baseline of `mocov2_r18_x2.py` (paper Table 5).

  mcl-train --config=mocov2_r18_baseline --workdir=runs/mocov2_r18 \
      --config.input.data_dir=DATA_DIR
  python -m mcl_jax.export --workdir=runs/mocov2_r18 --member=0 --out=runs/mocov2_r18/member0
  mcl-train --config=lincls_r18 --workdir=runs/mocov2_r18_lincls \
      --config.lincls.pretrained=runs/mocov2_r18/member0 --config.input.data_dir=DATA_DIR

Published linear-probe top-1 (ImageNet, ResNet-18): MoCo v2 52.30 (MCL x2: 52.76). A single
network (num_members = 1): the MCL terms are off and VCL, which for one network is MoCo's
own InfoNCE loss CE(logits_aa, 0), stays on with weight 1. Otherwise `mocov2_r18_x2.py`.

`:smoke` runs a few steps of the `tiny` arch on 16x16 synthetic data with a 64-key queue.
"""

from mcl_jax.configs import moco_r18_x2


def get_config(arg=None):
  return moco_r18_x2.make(version=2, num_members=1, arg=arg)
