#!/usr/bin/env bash
# One-change-per-run MoCo v2 + MCL x2 study, 117 steps (3 of the recipe's 10 epochs; the LR
# schedule stays the 10-epoch one), seed 0, classes 0-4.
cd "$(dirname "$0")/../../.."
OUT=results/fashion_mnist/moco_causes
mkdir -p $OUT
# These runs predate ICL weight 0.1 as the recipe's MoCo default: they train the official 1.
common="--config=fashion_mnist:mocov2_mcl_x2 --config.loss.icl_weight=1.0 --config.input.classes=(0,1,2,3,4) --config.schedule.num_train_steps=117 --config.seed=0"
run() {
  name=$1; shift
  [ -f $OUT/$name/run.txt ] && return
  rm -rf /tmp/causes/wd_$name; mkdir -p $OUT/$name
  start=$(date +%s)
  .venv/bin/mcl-train $common --workdir=/tmp/causes/wd_$name "$@" > $OUT/$name/log.txt 2>&1
  echo "rc=$? wall_s=$(( $(date +%s) - start )) flags: $*" > $OUT/$name/run.txt
  cp /tmp/causes/wd_$name/events.out.tfevents.* $OUT/$name/ 2>/dev/null
}
run global_bn --config.moco.shuffle_bn=False
run shuffle_bn
run global_bn_soft_off --config.moco.shuffle_bn=False --config.loss.soft_vcl_weight=0.0 --config.loss.soft_icl_weight=0.0
run global_bn_icl_off --config.moco.shuffle_bn=False --config.loss.icl_weight=0.0 --config.loss.soft_icl_weight=0.0
run global_bn_official_like --config.moco.shuffle_bn=False --config.moco.mlp=False --config.loss.tau=0.07 --config.moco.queue_size=256 --config.moco.key_momentum=0.999 --config.optim.weight_decay=0.0001
run global_bn_no_ramp --config.moco.shuffle_bn=False --config.loss.soft_warmup_epochs=0.0
# The issue's two untried ICL variants (default shuffle-BN, as the ICL weight rows):
# ICL and soft ICL ramped in over the run's 3 epochs (full weight only at its end) and over
# its first epoch (then two epochs at full weight); ICL against the other member's keys of
# the current batch instead of its key and queue.
run icl_ramp --config.loss.icl_warmup_epochs=3
run icl_batch_keys --config.moco.icl_keys=batch
run icl_ramp_1 --config.loss.icl_warmup_epochs=1
# MoCo v2 with one network (its own config, not the MCL one):
name=mocov2_alone_global_bn; mkdir -p $OUT/$name
.venv/bin/mcl-train --config=fashion_mnist:mocov2 --config.input.classes="(0,1,2,3,4)" \
  --config.schedule.num_train_steps=117 --config.seed=0 --config.moco.shuffle_bn=False \
  --workdir=/tmp/causes/wd_$name > $OUT/$name/log.txt 2>&1
