"""The Fashion-MNIST reproduction suite: the paper's comparisons at small scale.

  mcl-reproduce --suite=fashion_mnist --rows=baseline,mcl_x2 --seeds=0,1,2 --workdir=runs/fm

Each row is a variant of mcl_jax/configs/fashion_mnist.py (the recipes) trained over seeds;
`table` groups rows into the tables of docs/RESULTS.md, whose committed runs are in
results/fashion_mnist/.
"""

from mcl_jax.suites import Row

CONFIG = "fashion_mnist"

# Few-shot evaluation (mcl_jax/fewshot.py) holds classes out of the pre-training.
TRAIN_CLASSES = (0, 1, 2, 3, 4)  # T-shirt/top, Trouser, Pullover, Dress, Coat
HELD_OUT_CLASSES = (5, 6, 7, 8, 9)  # Sandal, Shirt, Sneaker, Bag, Ankle boot

TABLES = {
  "main": "Table 3 at small scale: two independent networks vs MCL x2",
  "collapse": "The collapse (docs/RESULTS.md): MCL x2 with the official constant soft-term "
  "weights, no ramp",
  "demo": "make demo: the main comparison shortened to 4 epochs",
  "ablation": "Table 6 at small scale: loss terms of MCL x4 (shared trunk) switched on alone "
  "and in the paper's combinations",
  "cohort": "Table 7 at small scale: cohort size M (shared trunk for M > 2)",
  "logit": "Table 1 at small scale: MCL x4 + logit KD to the ensemble (last member)",
  "ssl": "Table 5 at small scale and beyond it: self-supervised on classes 0-4 (MoCo v2 "
  "alone vs + MCL x2, + CO2; the in-batch SimCLR regime alone vs + MCL x2), judged "
  "by a linear probe and kNN on classes 0-4 and few-shot episodes on the held-out "
  "classes 5-9",
  "causes": "What causes the collapse: MCL x2 without the ramp for 600 steps (1 seed), one "
  "change per row; see the embedding-cosine curves in docs/RESULTS.md",
  "why": "Why no gain? Hypotheses of docs/RESULTS.md, judged on the validation split: many "
  "classes per batch (40 rotation classes, 32 classes x 2 per batch as CIFAR-100), "
  "a longer run, stronger contrastive weights",
}
ROWS = (
  [
    Row("baseline", "baseline", "main", label="baseline (2 independent)"),
    Row("mcl_x2", "mcl_x2", "main", label="MCL x2"),
    Row(
      "mcl_x2_official",
      "mcl_x2",
      "collapse",
      overrides={"loss.soft_warmup_epochs": 0.0},
      label="MCL x2, constant soft weights (official)",
    ),
    Row("x4_none", "x4_", "ablation", label="none (4 independent branches)"),
  ]
  + [
    Row(f"x4_{terms}", f"x4_{terms}", "ablation", label=terms)
    for terms in ("vcl", "icl", "soft_vcl", "soft_icl", "vcl+soft_vcl", "icl+soft_icl", "vcl+icl")
  ]
  + [
    Row("x4_all", "mcl_x4", "ablation", label="all four (MCL x4)"),
    Row("m2", "mcl_x2", "cohort", label="M = 2"),
    Row("m3", "m3", "cohort", label="M = 3"),
    Row("m4", "m4", "cohort", label="M = 4"),
    Row("m5", "m5", "cohort", label="M = 5"),
    Row("mcl_x4", "mcl_x4", "logit", label="MCL x4"),
    Row("mcl_x4_logit", "mcl_x4_logit", "logit", label="MCL x4 + logit KD"),
  ]
  + [
    Row(
      f"held_{variant}",
      variant,
      "ssl",
      label=label,
      overrides={"input.classes": TRAIN_CLASSES},
      fewshot=HELD_OUT_CLASSES,
    )
    for variant, label in (
      ("mocov2", "MoCo v2 (1 network)"),
      ("mocov2_mcl_x2", "MoCo v2 + MCL x2 (ICL weight 0.1)"),
      ("mocov2_mcl_x2_co2", "MoCo v2 + MCL x2 (ICL weight 0.1) + CO2"),
      ("simclr", "SimCLR (1 network)"),
      ("simclr_mcl_x2", "SimCLR + MCL x2"),
    )
  ]
  # The official ICL weight (1), which collapsed every MoCo member here
  # (results/fashion_mnist/moco_causes); the MoCo rows above train ICL at 0.1.
  + [
    Row(
      f"held_{variant}_icl1",
      variant,
      "ssl",
      label=f"{label}, official ICL weight 1",
      overrides={"input.classes": TRAIN_CLASSES, "loss.icl_weight": 1.0},
      fewshot=HELD_OUT_CLASSES,
    )
    for variant, label in (
      ("mocov2_mcl_x2", "MoCo v2 + MCL x2"),
      ("mocov2_mcl_x2_co2", "MoCo v2 + MCL x2 + CO2"),
    )
  ]
  + [
    Row(
      "held_mocov2_mcl_x2_half_lr",
      "mocov2_mcl_x2",
      "ssl",
      label="MoCo v2 + MCL x2, official ICL weight 1, lr 0.03 (half: ICL doubles each "
      "member's gradient)",
      overrides={"input.classes": TRAIN_CLASSES, "loss.icl_weight": 1.0, "optim.lr": 0.03},
      fewshot=HELD_OUT_CLASSES,
    ),
  ]
  + [
    Row(
      f"cause_{name}",
      "mcl_x2",
      "causes",
      label=label,
      overrides={"loss.soft_warmup_epochs": 0.0, "schedule.num_train_steps": 600, **extra},
    )
    for name, label, extra in (
      ("official", "official recipe (constant soft weights)", {}),
      ("lr_warmup", "+ 1 epoch of linear LR warm-up", {"schedule.warmup_epochs": 1.0}),
      ("head_bn", "+ BatchNorm on the head's input", {"model.head_norm": "batchnorm"}),
      ("no_wd", "+ no weight decay", {"optim.weight_decay": 0.0}),
      (
        "no_soft",
        "soft terms off (VCL + ICL only)",
        {"loss.soft_vcl_weight": 0.0, "loss.soft_icl_weight": 0.0},
      ),
      (
        "soft_only",
        "soft terms only (VCL, ICL off)",
        {"loss.vcl_weight": 0.0, "loss.icl_weight": 0.0},
      ),
      ("ramp", "soft terms ramped in over epoch 1 (the remedy)", {"loss.soft_warmup_epochs": 1.0}),
    )
  ]
  + [
    Row(
      f"rot40_{variant}",
      variant,
      "why",
      label=f"{label}, 40 rotation classes, 32 x 2 per batch",
      overrides={"input.rotation_classes": True, "input.samples_per_class": 2},
    )
    for variant, label in (("baseline", "baseline"), ("mcl_x2", "MCL x2"))
  ]
  + [
    Row(
      f"long_{variant}",
      variant,
      "why",
      label=f"{label}, 32 epochs",
      overrides={"schedule.epochs": 32},
    )
    for variant, label in (("baseline", "baseline"), ("mcl_x2", "MCL x2"))
  ]
  + [
    Row(
      "mcl_x2_w1",
      "mcl_x2",
      "why",
      label="MCL x2, VCL and ICL weight 1 (10x)",
      overrides={"loss.vcl_weight": 1.0, "loss.icl_weight": 1.0},
    ),
  ]
  + [
    Row(
      "demo_baseline",
      "baseline",
      "demo",
      overrides={"schedule.epochs": 4},
      label="baseline (2 independent)",
    ),
    Row("demo_mcl_x2", "mcl_x2", "demo", overrides={"schedule.epochs": 4}, label="MCL x2"),
  ]
)
