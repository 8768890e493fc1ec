r"""MoCo v2 + MCL x2, ResNet-18, ImageNet (docs/SPEC.md 2.3, 4; paper Table 5).

  mcl-train --config=mocov2_r18_x2 --workdir=runs/mocov2_r18_x2 \
      --config.input.data_dir=DATA_DIR
  python -m mcl_jax.export --workdir=runs/mocov2_r18_x2 --member=0 --out=runs/mocov2_r18_x2/member0
  mcl-train --config=lincls_r18 --workdir=runs/mocov2_r18_x2_lincls \
      --config.lincls.pretrained=runs/mocov2_r18_x2/member0 --config.input.data_dir=DATA_DIR

Published linear-probe top-1 (ImageNet, ResNet-18): MoCo v2 52.30 -> MCL x2 52.76
(`mocov2_r18_baseline.py` is the single-network MoCo v2). As `moco_r18_x2.py` but MoCo v2:
tau 0.2, cosine LR (`schedule.kind`, the official `--cos`), the v2 augmentation
(`ssl.views = 'v2'`, `--aug-plus`: colour jitter 0.4/0.4/0.4/0.1 p=0.8, grayscale p=0.2,
Gaussian blur sigma [0.1, 2] p=0.5, flip) and the MLP head Dense(512, 512)-ReLU-Dense(512,
128) (`moco.mlp = True`).

Which run this is. The official `--mlp` switch is a silent no-op (it sets an attribute
named `encoder_q_0.fc` instead of replacing `fc`; mcl_jax/moco.py), so the run behind the
published 52.30 / 52.76 trained v2 augmentation + cosine LR + the LINEAR head. To reproduce
that run, pass `--config.moco.mlp=False`; as written, this config trains MoCo v2 as its
authors define it, with the real MLP head.

`:smoke` runs a few steps of the `tiny` arch on 16x16 synthetic data with a 64-key queue.
"""

from mcl_jax.configs import moco_r18_x2


def get_config(arg=None):
  return moco_r18_x2.make(version=2, num_members=2, arg=arg)
