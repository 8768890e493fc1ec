r"""MoCo v2 + MCL x2 on scikit-learn's 8x8 handwritten digits: self-supervised MCL on a CPU.

  mcl-train --config=moco_digits --workdir=/tmp/moco_digits

Trains without labels; the kNN monitor (mcl_jax/knn.py: k = 200, cosine, exp(s / 0.07)
votes, InstDisc) classifies the 360 test digits by their nearest training digits in each
member's pooled backbone features every 5 epochs and at the end. Digits show that the
pipeline learns, not MCL's benefit (docs/RESULTS.md). The views are the 'digits' recipe of
`mcl_jax.data.views` (`ssl.views = 'digits'`): the official MoCo v2 views crop 8x8
digits into shapes their keys cannot tell apart.

Recipe: two resnet32 (as `digits.py`) on the digits' native 8x8, MoCo v2 (MLP head, tau
0.2, cosine LR), the four MCL terms with weight 1 (docs/SPEC.md 2.3), shuffled batches of 64 (no
labels), a 256-key queue (less than a fifth of the 1,437 training digits, so a digit's own
stale keys rarely sit in the queue as negatives), key momentum 0.99 (with 0.999 a key
encoder would still be 0.999^440 = 64% its initial weights at the end), SGD 0.9 lr 0.015
(0.06 per 256 examples, scaled linearly to 64; lr 0.06 stayed at chance loss) wd 5e-4,
per-step cosine. `:smoke`: two steps of `tiny`.
"""

from mcl_jax.configs import common
from mcl_jax.configs import default


def get_config(arg=None):
  _, is_smoke = common.parse_arg(arg, ("",))
  c = default.get_config()
  c.trainer = "moco"
  c.model.arch = "resnet32"
  c.model.embed_dim = 128
  c.model.shared_stages = 0
  c.cohort.num_members = 2
  c.loss.regime = "moco"
  c.loss.tau = 0.2  # MoCo v2
  c.loss.kd_temperature = 3.0
  c.loss.vcl_weight = c.loss.icl_weight = 1.0
  c.loss.soft_vcl_weight = c.loss.soft_icl_weight = 1.0
  c.loss.logit_kd_weight = 0.0
  c.moco.mlp = True  # MoCo v2's MLP head
  c.moco.queue_size = 256
  c.moco.key_momentum = 0.99
  c.ssl.knn_every_epochs = 5
  c.ssl.views = "digits"  # v2's colour jitter, mild crops, no blur, no flip
  c.input.dataset = "digits"
  c.input.image_size = 8  # the digits' own resolution
  c.input.global_batch_size = 64
  c.input.samples_per_class = 0  # self-supervised: plain shuffled batches
  c.input.eval_batch_size = 360
  c.optim.lr = 0.015
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 5e-4
  c.schedule.kind = "cosine"
  c.schedule.epochs = 20
  c.schedule.per_epoch = False  # short runs: a smooth per-step cosine
  c.checkpoint.every_epochs = 5
  c.log_every_steps = 22  # one line per epoch (1,437 // 64 = 22 steps)
  return common.smoke(c, arch="tiny") if is_smoke else c
