r"""MoCo (v1) + MCL x2, ResNet-18, ImageNet (docs/SPEC.md 2.3, 4; paper Table 5).

  mcl-train --config=moco_r18_x2 --workdir=runs/moco_r18_x2 \
      --config.input.data_dir=DATA_DIR
  python -m mcl_jax.export --workdir=runs/moco_r18_x2 --member=0 --out=runs/moco_r18_x2/member0
  mcl-train --config=lincls_r18 --workdir=runs/moco_r18_x2_lincls \
      --config.lincls.pretrained=runs/moco_r18_x2/member0 --config.input.data_dir=DATA_DIR

Published linear-probe top-1 (ImageNet, ResNet-18): MoCo 47.45 -> MCL x2 48.04
(`moco_r18_baseline.py` is the single-network MoCo). Recipe (official main_moco_mcl.py):
two independent ResNet-18s (fc -> 128-d, the MoCo v1 head), K = 65536, key momentum 0.999,
tau 0.07, T 3, the four MCL terms with weight 1, batch 256, SGD 0.9 lr 0.03 x0.1 at
epochs 120 and 160, wd 1e-4, 200 epochs, MoCo v1 augmentation, shuffle-BN over groups of
32 images (the official per-GPU batch; mcl_jax/moco.py). DATA_DIR holds the tfds
`imagenet2012` build (see mcl_jax/data/imagenet.py), or use
--config.input.dataset=image_folder with the folder.

`:smoke` runs a few steps of the `tiny` arch on 16x16 synthetic data with a 64-key queue.

This file also holds `make(version, num_members, arg)` for the other MoCo configs.
"""

from mcl_jax.configs import common
from mcl_jax.configs import default

PUBLISHED = {(1, 1): 47.45, (1, 2): 48.04, (2, 1): 52.30, (2, 2): 52.76}


def make(version: int, num_members: int, arg=None):
  """MoCo v`version` with a cohort of `num_members` (1: the plain MoCo baseline)."""
  _, is_smoke = common.parse_arg(arg, ("",))
  c = default.get_config()
  c.trainer = "moco"
  c.model.arch = "resnet18"
  c.model.embed_dim = 128  # --moco-dim
  c.model.shared_stages = 0  # the official M = 2 cohort: two independent networks
  c.cohort.num_members = num_members  # --number-net
  c.loss.regime = "moco"
  c.loss.tau = 0.07 if version == 1 else 0.2  # --moco-t
  c.loss.kd_temperature = 3.0  # KLDiv(T=3) in moco/builder_mcl.py
  c.loss.vcl_weight = 1.0  # for M = 1 this is plain MoCo's InfoNCE
  mcl = 1.0 if num_members > 1 else 0.0
  c.loss.icl_weight = c.loss.soft_vcl_weight = c.loss.soft_icl_weight = mcl
  c.loss.logit_kd_weight = 0.0
  # --mlp (real here: a no-op in the official script), --aug-plus; --cos is schedule.kind.
  c.moco.mlp = version == 2
  c.ssl.views = f"v{version}"
  c.moco.queue_size = 65536  # --moco-k
  c.moco.key_momentum = 0.999  # --moco-m
  # The kNN monitor runs once, on the final state (a forward pass over the 1.28M training
  # images, replayed un-augmented); the published figure is the linear probe's.
  c.ssl.knn_every_epochs = 0
  c.input.dataset = "imagenet2012"
  c.input.global_batch_size = 256  # --batch-size
  c.input.samples_per_class = 0  # plain shuffled batches
  c.input.image_size = 224
  c.input.eval_batch_size = 256
  c.optim.lr = 0.03  # --lr
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 1e-4  # --wd
  c.schedule.kind = "step" if version == 1 else "cosine"  # --cos for v2
  c.schedule.boundaries = (120, 160)  # --schedule
  c.schedule.epochs = 200  # --epochs
  c.schedule.per_epoch = True  # adjust_learning_rate once per epoch
  c.checkpoint.every_epochs = 1
  c.log_every_steps = 100
  return common.smoke(c, arch="tiny", image_size=16) if is_smoke else c


def get_config(arg=None):
  return make(version=1, num_members=2, arg=arg)
