"""The embedded demo: MCL on scikit-learn's handwritten digits (real data, no download).

  mcl-train --config=digits:mcl_x2 --workdir=/tmp/digits_mcl
  mcl-train --config=digits:baseline --workdir=/tmp/digits_base
  make demo      # both, then a side-by-side table (python -m mcl_jax.demo)

1,437 training / 360 test images of 10 classes, 8x8 grey levels shown at 16x16. The digits
have only 10
classes, so class-aware batches hold 8 classes x 8 samples (the paper's CIFAR batches hold
64 classes x 2); the loss is the same. Append ',smoke' for a few steps only.
"""

from mcl_jax.configs import cifar100_common
from mcl_jax.configs import common
from mcl_jax.configs import default

VARIANTS = ("baseline", "mcl_x2")


def get_config(arg=None):
  variant, is_smoke = common.parse_arg(arg, VARIANTS, "mcl_x2")
  c = default.get_config()
  c.model.arch = "resnet32"
  c.input.dataset = "digits"
  c.input.image_size = 16  # the 8x8 digits upsampled 2x (pixel repeat)
  c.input.global_batch_size = 64
  c.input.samples_per_class = 8
  c.input.eval_batch_size = 360
  c.optim.lr = 0.1
  c.optim.weight_decay = 5e-4
  c.schedule.kind = "cosine"
  c.schedule.epochs = 15
  c.schedule.per_epoch = False  # short runs: a smooth per-step cosine
  c.checkpoint.every_epochs = 5
  c.log_every_steps = 20
  c.eval_every_epochs = 5
  c = cifar100_common.set_variant(c, variant)
  return common.smoke(c) if is_smoke else c
