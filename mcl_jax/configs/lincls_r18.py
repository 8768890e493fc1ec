r"""Linear probe of an exported ResNet-18 member on ImageNet (docs/SPEC.md 4; official
main_lincls.py).

  python -m mcl_jax.export --workdir=runs/moco_r18_x2 --member=0 --out=runs/moco_r18_x2/member0
  mcl-train --config=lincls_r18 --workdir=runs/moco_r18_x2_lincls \
      --config.lincls.pretrained=runs/moco_r18_x2/member0 --config.input.data_dir=DATA_DIR

Published top-1 (paper Table 5, ResNet-18): MoCo 47.45 -> MCL x2 48.04; MoCo v2 52.30 ->
MCL x2 52.76. Recipe: the exported backbone frozen with BN in eval mode, a fresh fc
(normal(0, 0.01), bias 0) over the 1000 classes, SGD 0.9 lr 30, x0.1 at epochs 60 and 80,
wd 0, 100 epochs, batch 256, random-resized crop 224 + flip (eval: resize 256, centre
crop 224). The architecture comes from the export, not from this config.

`:smoke` runs a few steps on 16x16 synthetic data; pass the export of a smoke MoCo run
(`configs/moco_r18_x2.py:smoke`) as --config.lincls.pretrained.
"""

from mcl_jax.configs import common
from mcl_jax.configs import default


def get_config(arg=None):
  _, is_smoke = common.parse_arg(arg, ("",))
  c = default.get_config()
  c.trainer = "lincls"
  c.model.arch = "resnet18"  # informational: the export's arch is what runs
  c.cohort.num_members = 1
  c.loss.vcl_weight = c.loss.icl_weight = 0.0
  c.loss.soft_vcl_weight = c.loss.soft_icl_weight = c.loss.logit_kd_weight = 0.0
  c.lincls.pretrained = ""  # --pretrained: an export directory (python -m mcl_jax.export)
  c.input.dataset = "imagenet2012"
  c.input.global_batch_size = 256  # --batch-size
  c.input.samples_per_class = 0
  c.input.image_size = 224
  c.input.eval_batch_size = 256
  c.optim.lr = 30.0  # --lr
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 0.0  # --wd
  c.schedule.kind = "step"
  c.schedule.boundaries = (60, 80)  # --schedule
  c.schedule.epochs = 100  # --epochs
  c.schedule.per_epoch = True
  c.checkpoint.every_epochs = 1
  c.log_every_steps = 100
  c.eval_every_epochs = 1
  return common.smoke(c, arch="tiny", image_size=16) if is_smoke else c
