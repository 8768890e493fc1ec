#!/usr/bin/env bash
# Train mcl_jax on a Cloud TPU VM pod slice: create the VMs, copy the repo, install,
# run on every worker at once (one process per host; JAX finds the pod itself), delete.
#
# Usage, from a machine with gcloud logged in (any directory):
#   PROJECT=my-project ZONE=us-central2-b NAME=mcl-v4-32 ACCELERATOR=v4-32 \
#   CONFIG=cifar100_resnet32:mcl_x4 WORKDIR=gs://my-bucket/mcl/resnet32_x4 \
#     launch/tpu_pod.sh
# which is the steps `create copy install run`. One step or several at a time:
#   launch/tpu_pod.sh run                                   # e.g. again, after a preemption
#   launch/tpu_pod.sh run -- --config.optim.lr=0.05         # flags after -- go to mcl_jax.main
#   launch/tpu_pod.sh delete
#   DRY_RUN=1 launch/tpu_pod.sh all                         # print every command, run none
#
# Steps: create | copy | clone | install | run | delete | all (= create copy install run).
# Settings (environment variables):
#   NAME         TPU VM name                          (default mcl-jax-pod)
#   ZONE         zone with quota for ACCELERATOR      (default us-central2-b)
#   PROJECT      GCP project; empty: gcloud's default
#   ACCELERATOR  slice type                           (default v4-32: 4 hosts x 4 chips)
#   VERSION      TPU VM image                         (default tpu-ubuntu2204-base)
#   CONFIG       <experiment>[:arg]                     (required by `run`)
#   WORKDIR      gs://bucket/path: every host writes checkpoints and logs there, so it
#                must be shared storage (required by `run`)
#   SOURCE       copy: this working tree (tracked + untracked, not ignored) via scp;
#                git: `git clone REPO_URL` at GIT_REF on every worker  (default copy)
#   REPO_URL, GIT_REF   for SOURCE=git (GIT_REF default main)
#   REMOTE_DIR   repo folder on the workers           (default mcl_jax, under $HOME)
#   REMOTE_PYTHON  Python >= 3.11 on the workers      (default python3.11: the image's
#                python3 is 3.10, so `install` adds python3.11 from Ubuntu's archive)
#   JAX_VERSION  (default 0.10.2, as requirements.txt)
#   DETACH=1     `run` starts the trainer with nohup and returns (log: ~/mcl_jax_run.log on
#                each worker), so a dropped ssh connection does not kill a long run
#   DELETE_AFTER=1  `all` ends with `delete`
#   DRY_RUN=1    print the commands instead of running them
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
# shellcheck source=launch/lib.sh
source "$SCRIPT_DIR/lib.sh"

NAME="${NAME:-mcl-jax-pod}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-}"
WORKDIR="${WORKDIR:-}"
SOURCE="${SOURCE:-copy}"
REPO_URL="${REPO_URL:-}"
GIT_REF="${GIT_REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-mcl_jax}"
REMOTE_PYTHON="${REMOTE_PYTHON:-python3.11}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
DETACH="${DETACH:-0}"
DELETE_AFTER="${DELETE_AFTER:-0}"
# shellcheck disable=SC2088  # The remote shell expands this ~, not this one.
REMOTE_VENV='~/mcl_venv'

steps=()
extra_args=()
while (($#)); do
  case "$1" in
    --) shift; extra_args=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d; s/^# \{0,1\}//; p;}' "$0"; exit 0 ;;
    create|copy|clone|install|run|delete) steps+=("$1"); shift ;;
    all) steps+=(create "$([[ "$SOURCE" == git ]] && echo clone || echo copy)" install run)
         [[ "$DELETE_AFTER" == 1 ]] && steps+=(delete)
         shift ;;
    *) die "unknown step '$1'; steps are create, copy, clone, install, run, delete, all." ;;
  esac
done
if ((${#steps[@]} == 0)); then
  steps=(create "$([[ "$SOURCE" == git ]] && echo clone || echo copy)" install run)
  [[ "$DELETE_AFTER" == 1 ]] && steps+=(delete)
fi

gcloud_flags=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && gcloud_flags+=(--project="$PROJECT")

# Runs a shell command on every worker of the slice at once.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${gcloud_flags[@]}" --worker=all --command "$1"
}

step_create() {
  run gcloud compute tpus tpu-vm create "$NAME" "${gcloud_flags[@]}" \
    --accelerator-type="$ACCELERATOR" --version="$VERSION"
}

step_copy() {
  # Stage the working tree without .venv, .git or ignored outputs, then copy it to every
  # worker. An old copy is removed first so deleted files do not linger.
  local stage="/tmp/mcl_jax_stage.XXXXXX"
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    stage="$(mktemp -d /tmp/mcl_jax_stage.XXXXXX)"
    STAGE_DIR="$stage"  # Removed on exit, also when a later command fails.
  fi
  run mkdir -p "$stage/$REMOTE_DIR"
  run bash -c "cd $(printf '%q' "$REPO_ROOT") && git ls-files -z --cached --others \
--exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(printf '%q' "$stage/$REMOTE_DIR")"
  on_all_workers "rm -rf ~/$(printf '%q' "$REMOTE_DIR")"
  run gcloud compute tpus tpu-vm scp --recurse "$stage/$REMOTE_DIR" "$NAME:~/" \
    "${gcloud_flags[@]}" --worker=all
}

step_clone() {
  [[ -n "$REPO_URL" ]] || die "SOURCE=git needs REPO_URL (e.g. https://github.com/you/mcl_jax.git)."
  local dir
  dir="$(printf '%q' "$REMOTE_DIR")"
  on_all_workers "rm -rf ~/$dir && git clone $(printf '%q' "$REPO_URL") ~/$dir \
&& git -C ~/$dir checkout $(printf '%q' "$GIT_REF")"
}

step_install() {
  # The image's python3 is 3.10; the pinned set needs >= 3.11. The apt lock wait covers
  # unattended-upgrades, which often holds it for a few minutes after a VM boots.
  on_all_workers "set -e; \
sudo apt-get -o DPkg::Lock::Timeout=600 update -qq && \
sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq $REMOTE_PYTHON ${REMOTE_PYTHON}-venv && \
$REMOTE_PYTHON -m venv $REMOTE_VENV && \
$REMOTE_VENV/bin/pip install -q --upgrade pip && \
cd ~/$(printf '%q' "$REMOTE_DIR") && \
$REMOTE_VENV/bin/pip install -q -r requirements.txt $(printf '%q' "jax[tpu]==$JAX_VERSION")"
}

step_run() {
  [[ -n "$CONFIG" ]] || die "CONFIG is not set; e.g. CONFIG=cifar100_resnet32:mcl_x4."
  [[ "$WORKDIR" == gs://* ]] || die "WORKDIR must be a gs:// path that every TPU host \
can write (got '${WORKDIR}'); e.g. WORKDIR=gs://my-bucket/mcl/run1."
  local train_cmd
  train_cmd="$REMOTE_VENV/bin/python -m mcl_jax.main $(quote_args \
    --config="$CONFIG" --workdir="$WORKDIR" ${extra_args[@]+"${extra_args[@]}"})"
  if [[ "$DETACH" == 1 ]]; then
    train_cmd="nohup $train_cmd > ~/mcl_jax_run.log 2>&1 < /dev/null &"
  fi
  on_all_workers "cd ~/$(printf '%q' "$REMOTE_DIR") && $train_cmd"
}

step_delete() {
  run gcloud compute tpus tpu-vm delete "$NAME" "${gcloud_flags[@]}" --quiet
}

STAGE_DIR=""
cleanup() {
  if [[ -n "$STAGE_DIR" ]]; then rm -rf "$STAGE_DIR"; fi
}
trap cleanup EXIT

for step in "${steps[@]}"; do
  log "step: $step"
  "step_$step"
done
