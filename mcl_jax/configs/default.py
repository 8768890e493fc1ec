"""The full config schema with defaults: every experiment config starts from this.

Configs are data: this file imports only ml_collections. Every field that exists anywhere
is declared here, so `mcl_jax.config_lib.validate` can reject a misspelt field with one
sentence instead of letting it be silently ignored. The official code's flag each field
stands for is named in its comment (`main_cifar.py --flag`).
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.trainer = "supervised"  # supervised | moco | simclr | lincls
  c.seed = 0  # --manual_seed

  c.model = ml_collections.ConfigDict()
  c.model.arch = "resnet32"  # --arch
  c.model.num_classes = 0  # 0: take it from the dataset
  # Leading stages shared by all members (stage 0 = stem). The official code shares the
  # stem + first block group for M > 2 on CIFAR (2) and stem + layer1 + layer2 on ImageNet (3).
  c.model.shared_stages = 0
  c.model.embed_dim = 128  # --feat-dim: projection head output
  # The projection head: mlp (official: Dense-ReLU-Dense) | linear | none (MoCo has its own)
  c.model.head = "mlp"
  # none (official) | batchnorm: BatchNorm1d on the projection head's input (models/cohort.py)
  c.model.head_norm = "none"
  c.model.strategy = "auto"  # auto | vmap | unroll | map: how the M members execute
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  # BatchNorm statistics per group of this many consecutive images of the global batch, as
  # PyTorch computes them per GPU without SyncBN (the official ImageNet run's DataParallel);
  # groups of the per-device batch need no collective per BN layer. 0: the whole batch
  # (the official single-GPU CIFAR runs). Supervised trainer; MoCo: moco.bn_group_size.
  c.model.bn_group_size = 0

  c.cohort = ml_collections.ConfigDict()
  c.cohort.num_members = 2  # --number-net

  c.loss = ml_collections.ConfigDict()
  # batch (in-batch, CIFAR) | bank (memory bank, ImageNet) | moco | simclr (in-batch views)
  c.loss.regime = "batch"
  c.loss.vcl_weight = 0.1  # --alpha
  c.loss.icl_weight = 0.1  # --beta
  c.loss.soft_vcl_weight = 1.0  # --gamma
  c.loss.soft_icl_weight = 1.0  # --lam
  c.loss.tau = 0.1  # --tau: contrastive temperature
  c.loss.kd_temperature = 3.0  # --kd_T
  c.loss.logit_kd_weight = 0.0  # --logit-distill (1.0 when on, as the official code)
  c.loss.logit_kd_targets = "all"  # all | last: which members distil from the ensemble
  # Soft VCL / Soft ICL weights ramp linearly from 0 over this many epochs (0: the official
  # constant weights). The soft terms are minimised by collapsed embeddings (docs/RESULTS.md).
  c.loss.soft_warmup_epochs = 0.0
  # ICL / Soft ICL weights (the terms where a member learns from another) ramp linearly
  # from 0 over this many epochs, so the members first learn alone (0: constant weights).
  # Soft ICL gets both ramps. MoCo's ICL drove its collapse on Fashion-MNIST (docs/RESULTS.md).
  c.loss.icl_warmup_epochs = 0.0
  # CO2 (Wei et al. 2021, MoCo only): consistency of the query's and the positive key's
  # similarity distributions over the queue (losses.co2). 0: off.
  c.loss.co2_weight = 0.0
  c.loss.co2_temperature = 0.04
  c.loss.co2_cross = False  # also member a's queries against member b's keys and queue

  c.bank = ml_collections.ConfigDict()
  c.bank.num_positives = 1  # --pos_k
  c.bank.num_negatives = 8192  # --neg_k
  c.bank.momentum = 0.5  # --nce_m
  # Candidates (1 + P + K) gathered from the sharded bank at a time: the transient buffer of
  # rows is [M, B, gather_chunk, d] per device instead of [M, B, 1 + P + K, d]. 0: all.
  c.bank.gather_chunk = 0
  # Where the bank lives (memory_bank.LAYOUTS): "sharded", split along N (1 / D of it per
  # device; every device reads all the batch's candidates), or "replicated", a copy per
  # device (each reads only its own examples' candidates). docs/IMAGENET.md compares them.
  c.bank.layout = "sharded"
  # The bank's storage dtype (memory_bank.DTYPES). "bfloat16" halves its memory and the
  # bytes its gathers and update move; rows are still mixed and normalised in float32 and
  # every similarity is a float32 dot. The official bank is float32 (docs/SPEC.md 7).
  c.bank.dtype = "float32"

  c.moco = ml_collections.ConfigDict()
  # The official --mlp flag is a no-op, so its published "v2" runs had the linear head.
  c.moco.mlp = False  # --mlp done for real: Dense(F, F)-ReLU-Dense(F, d) instead of Dense(F, d)
  c.moco.queue_size = 65536  # --moco-k
  c.moco.key_momentum = 0.999  # --moco-m
  # Shuffle-BN (official moco/builder.py: DDP without SyncBN, so BN is per GPU in both
  # encoders, and the key encoder's input is shuffled across GPUs, `_batch_shuffle_ddp`).
  # False: BN over the global batch in both encoders (docs/MOCO.md).
  c.moco.shuffle_bn = True
  # Images per BN group (the per-GPU batch): 32 = the official 256 over 8 GPUs. 0: one
  # group per device. At least the global batch: one group (global BN, nothing shuffled).
  c.moco.bn_group_size = 32
  # What ICL contrasts member a's queries with (losses.moco_mcl): "queue", member b's
  # positive key and b's queue (the paper's); "batch", b's keys of the current batch (the
  # same image's key positive, the others' negatives, no queue).
  c.moco.icl_keys = "queue"

  # Self-supervised trainers (moco, simclr): the two views and the kNN monitor.
  c.ssl = ml_collections.ConfigDict()
  # Two-view augmentation: v1 | v2 (--aug-plus) | digits | fashion_mnist (milder, small images)
  c.ssl.views = "v1"
  c.ssl.knn_every_epochs = 0  # 0: off; else kNN accuracy on the eval split as a progress signal

  c.input = ml_collections.ConfigDict()
  # digits | fashion_mnist | cifar10 | cifar100 | imagenet2012 | image_folder | synthetic
  c.input.dataset = "cifar100"
  c.input.data_dir = ""  # tfds data_dir, the root of an image folder, or the IDX files' folder
  # In-memory datasets: training examples held out as a validation split (stratified, the
  # same for every seed) for choices; the test split is only for reported results.
  c.input.validation_size = 0
  c.input.train_subset = 0  # >0: a stratified subset of the remaining training examples
  # In-memory datasets: keep only these class ids (relabelled 0..n-1 in this order), e.g.
  # train on some classes and hold the others out for few-shot evaluation. (): all.
  c.input.classes = ()
  # In-memory datasets: every image turned by a fixed multiple of 90 degrees and labelled
  # 4 x class + turn, a 4x-many-class task from the same images (data.pipeline).
  c.input.rotation_classes = False
  c.input.global_batch_size = 128  # --batch-size (summed over all devices and hosts)
  c.input.samples_per_class = 2  # class-aware batches (m per class); 0: plain shuffled batches
  c.input.image_size = 32
  c.input.eval_batch_size = 256
  c.input.synthetic_train_size = 512  # synthetic source only
  c.input.synthetic_eval_size = 128  # synthetic source only
  c.input.synthetic_num_classes = 10  # synthetic source only
  c.input.download = True  # CIFAR: let tfds download when data_dir has no copy

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 0.1  # --init-lr
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 5e-4  # --weight-decay (applied to every parameter, as torch SGD)

  c.schedule = ml_collections.ConfigDict()
  c.schedule.kind = "cosine"  # cosine | step   (--lr-type cosine | multistep)
  c.schedule.epochs = 300  # --epochs
  c.schedule.boundaries = (150, 225)  # --milestones (epochs), step schedule only
  c.schedule.decay_factor = 0.1
  # The official code sets the LR once per epoch; True keeps that, False updates every step.
  c.schedule.per_epoch = True
  # Linear warm-up of the LR from 0 over this many epochs (fractions allowed), per step,
  # multiplying the schedule above. The official recipes have none (0).
  c.schedule.warmup_epochs = 0.0
  c.schedule.num_train_steps = 0  # >0 stops early (smoke runs); 0 means schedule.epochs

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_epochs = 1
  c.checkpoint.keep = 2
  # A workdir to start from when this one has no checkpoint yet (e.g. continue a run under
  # a new name). Given as this very workdir, it resumes even though fields that change the
  # state's meaning differ from the checkpoint's (config_lib.STATE_FIELDS).
  c.resume_from = ""

  c.log_every_steps = 50
  c.eval_every_epochs = 1

  c.lincls = ml_collections.ConfigDict()
  c.lincls.pretrained = ""  # an export directory (python -m mcl_jax.export --out=...)
  return c
