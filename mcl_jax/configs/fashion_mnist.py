r"""MCL on Fashion-MNIST: the paper's comparisons at a scale a 2-core CPU trains in minutes.

  mcl-train --config=fashion_mnist:mcl_x2 --workdir=/tmp/fm_mcl_x2      # one run
  mcl-reproduce --suite=fashion_mnist --seeds=0,1,2 --workdir=runs/fm   # the tables
  (python -m mcl_jax.main / python -m mcl_jax.reproduce without an installed package)

The reproduction suite's rows (these variants with overrides, grouped into tables) are in
mcl_jax/suites/fashion_mnist.py.

Data: `apt-get install dataset-fashion-mnist` (or TFDS `fashion_mnist`; mcl_jax/data/
fashion_mnist.py). 5,000 training images are held out as a validation split (500 per
class, the same for every run), every choice is made on it, and the 10,000 test images
give the reported numbers. Results, commands and wall times: docs/RESULTS.md.

Variants (the argument before an optional ',smoke'):
  baseline                 two independent networks (every MCL weight 0)
  mcl_x2                   MCL with M = 2 (two separate networks, as the official code)
  mcl_x4                   M = 4 with the official shared trunk (stem + first stage)
  mcl_x4_logit             mcl_x4 + logit KD to the ensemble, last member (official, M > 2)
  x4_<terms>               Table 6 at M = 4: only the named terms on, joined by '+', from
                           vcl, icl, soft_vcl, soft_icl (e.g. x4_vcl, x4_icl+soft_icl;
                           x4_ alone: every term off)
  m3, m4, m5               Table 7: MCL with M members (shared trunk for M > 2); m2 = mcl_x2
  mocov2, mocov2_mcl_x2    Table 5: self-supervised MoCo v2, one network vs MCL x2 (kNN
                           monitor; the runner adds the linear probe on an exported member)
  mocov2_mcl_x2_co2        mocov2_mcl_x2 + the CO2 consistency term (loss.co2_weight)
  simclr, simclr_mcl_x2    the in-batch self-supervised regime (trainer 'simclr'), one
                           network vs MCL x2
  probe                    the linear probe of an exported member (set lincls.pretrained)

Recipe (supervised): resnet32 (the paper's smallest network) on the 28x28 images averaged
to 14x14, a stratified 5,000-image training subset (500 per class, as CIFAR-100 has),
batch 64 = 8 classes x 8 (10 classes cannot fill the official 64 classes x 2), SGD 0.9
Nesterov lr 0.1 with a per-step cosine, wd 5e-4, 16 epochs (1,248 steps), the official
loss weights (0.1, 0.1, 1, 1), tau 0.1, T 3. One change from the official CIFAR recipe:
the soft terms' weights ramp in linearly over the first epoch (`loss.soft_warmup_epochs =
1`; `--config.loss.soft_warmup_epochs=0` restores the official constant weights). The soft
terms are minimised by collapsed embeddings, and with their full weight from step 0 they
collapse them for about 200 steps, during which MCL is effectively off (docs/RESULTS.md,
"The collapse"). Sized so that the main comparison (baseline vs mcl_x2, 3 seeds) trains in
about an hour on two CPU cores (`--workers=2`).
"""

from mcl_jax.configs import common
from mcl_jax.configs import default

TERMS = {
  "vcl": "vcl_weight",
  "icl": "icl_weight",
  "soft_vcl": "soft_vcl_weight",
  "soft_icl": "soft_icl_weight",
}
WEIGHTS = {"vcl": 0.1, "icl": 0.1, "soft_vcl": 1.0, "soft_icl": 1.0}  # docs/SPEC.md 2.5
SUPERVISED = ("baseline", "mcl_x2", "mcl_x4", "mcl_x4_logit", "m3", "m4", "m5")
SELF_SUPERVISED = ("mocov2", "mocov2_mcl_x2", "mocov2_mcl_x2_co2", "simclr", "simclr_mcl_x2")


def _known(variant: str) -> bool:
  terms = set(variant[3:].split("+")) - {""}
  return variant in SUPERVISED + SELF_SUPERVISED + ("probe",) or (
    variant.startswith("x4_") and terms <= set(TERMS)
  )


def data(c):
  c.input.dataset = "fashion_mnist"
  c.input.data_dir = ""  # the Debian folder, else TFDS (mcl_jax/data/fashion_mnist.py)
  c.input.image_size = 14  # 28x28 averaged 2x2: 4x fewer pixels, same content
  c.input.validation_size = 5000
  c.input.train_subset = 5000
  c.input.eval_batch_size = 1000
  return c


def supervised(c, variant):
  c.model.arch = "resnet32"
  c.input.global_batch_size = 64
  c.input.samples_per_class = 8  # 8 classes x 8 per batch
  c.optim.lr = 0.1
  c.optim.weight_decay = 5e-4
  c.schedule.kind = "cosine"
  c.schedule.epochs = 16
  c.schedule.per_epoch = False  # a smooth per-step cosine for short runs
  c.loss.soft_warmup_epochs = 1.0  # the collapse remedy (module docstring)
  c.loss.regime = "batch"
  c.loss.tau = 0.1
  c.loss.kd_temperature = 3.0
  members = {"baseline": 2, "mcl_x2": 2, "m3": 3, "m4": 4, "m5": 5}.get(variant, 4)
  c.cohort.num_members = members
  c.model.shared_stages = 0 if members == 2 else 2  # official: shared stem + stage 1, M > 2
  on = set(TERMS)
  if variant == "baseline":
    on = set()
  elif variant.startswith("x4_"):
    on = set(variant[3:].split("+")) - {""}  # 'x4_': every term off
  for term, field in TERMS.items():
    c.loss[field] = WEIGHTS[term] if term in on else 0.0
  if variant == "mcl_x4_logit":
    c.loss.logit_kd_weight = 1.0
    c.loss.logit_kd_targets = "last"  # official main_cifar.py for M > 2
  c.checkpoint.every_epochs = 4
  c.eval_every_epochs = 0  # only the final state (the validation and test splits)
  c.log_every_steps = 26  # 1/3 epoch (78 steps per epoch)
  return c


def self_supervised(c, variant):
  """MoCo v2 (MLP head, tau 0.2, cosine LR) or SimCLR (NT-Xent, tau 0.5) on the same images,
  the mild views of `data/views.py` for small grey images; the four MCL terms when M = 2,
  the soft ones ramped in over the first epoch. Weights: the official MoCo-MCL ones (1) for
  SimCLR; for MoCo, ICL at 0.1 (the supervised recipe's ICL weight): at weight 1 it
  collapsed every MoCo member here (results/fashion_mnist/moco_causes, docs/RESULTS.md);
  `--config.loss.icl_weight=1` restores the official weight."""
  simclr = variant.startswith("simclr")
  c.trainer = c.loss.regime = "simclr" if simclr else "moco"
  c.model.arch = "resnet32"
  c.model.embed_dim = 128
  members = 2 if "mcl_x2" in variant else 1
  c.cohort.num_members = members
  c.loss.tau = 0.5 if simclr else 0.2  # SimCLR's CIFAR temperature; MoCo v2's
  c.loss.kd_temperature = 3.0
  c.loss.vcl_weight = 1.0  # one network: MoCo's InfoNCE / SimCLR's NT-Xent
  mcl = 1.0 if members > 1 else 0.0
  c.loss.icl_weight = c.loss.soft_vcl_weight = c.loss.soft_icl_weight = mcl
  if not simclr:
    c.loss.icl_weight = 0.1 * mcl  # the collapse remedy (docstring)
  c.loss.soft_warmup_epochs = 1.0  # as the supervised recipe
  if variant.endswith("_co2"):
    c.loss.co2_weight = 10.0  # the CO2 paper's MoCo weight and temperature
    c.loss.co2_temperature = 0.04
  c.moco.mlp = True
  c.moco.queue_size = 2048  # 0.4 of the 5,000 training images
  c.moco.key_momentum = 0.99
  c.ssl.views = "fashion_mnist"
  c.ssl.knn_every_epochs = 0  # only the final state
  c.input.global_batch_size = 128
  c.input.samples_per_class = 0  # no labels: plain shuffled batches
  c.optim.lr = 0.06  # MoCo v2's 0.03 per 256, scaled x2 for a short run
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 5e-4
  c.schedule.kind = "cosine"
  c.schedule.epochs = 10  # 390 steps: 15-45 min per run with its probes on a shared 2-core CPU
  c.schedule.per_epoch = False
  c.checkpoint.every_epochs = 5
  c.log_every_steps = 13  # 1/3 epoch (39 steps per epoch)
  return c


def probe(c):
  """Linear probe of a frozen exported member (as main_lincls.py, shortened)."""
  c.trainer = "lincls"
  c.input.global_batch_size = 256
  c.input.samples_per_class = 0
  c.optim.lr = 1.0
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 0.0
  c.schedule.kind = "cosine"
  c.schedule.epochs = 10
  c.schedule.per_epoch = False
  c.checkpoint.every_epochs = 10
  c.eval_every_epochs = 0
  c.log_every_steps = 19
  return c


def get_config(arg=None):
  variant, is_smoke = common.parse_arg(arg, _known, "mcl_x2")
  c = data(default.get_config())
  if variant in SELF_SUPERVISED:
    c = self_supervised(c, variant)
  elif variant == "probe":
    c = probe(c)
  else:
    c = supervised(c, variant)
  return common.smoke(c, arch="tiny") if is_smoke else c
