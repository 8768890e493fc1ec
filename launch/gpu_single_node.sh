#!/usr/bin/env bash
# Train mcl_jax on one machine with one or more GPUs: ONE process, and JAX uses every
# local GPU (the mesh's `data` axis spans them; no jax.distributed needed).
#
# Usage, from the repo root:
#   CONFIG=cifar100_resnet32:mcl_x4 WORKDIR=workdirs/resnet32_x4 \
#     launch/gpu_single_node.sh [EXTRA_MAIN_FLAGS ...]
# e.g. only GPUs 0-3, and a config override:
#   CUDA_VISIBLE_DEVICES=0,1,2,3 CONFIG=cifar100_resnet32:mcl_x2 \
#     WORKDIR=workdirs/r32_x2 launch/gpu_single_node.sh --config.optim.lr=0.05
#   DRY_RUN=1 CONFIG=... WORKDIR=... launch/gpu_single_node.sh   # print, run nothing
#
# Settings (environment variables):
#   CONFIG     <experiment>[:arg]             (required)
#   WORKDIR    checkpoints and logs         (required); a rerun resumes from it
#   PYTHON     interpreter                  (default .venv/bin/python, else python3)
#   INSTALL=1  first `pip install -r requirements.txt "jax[cuda12]==$JAX_VERSION"`
#   JAX_VERSION                             (default 0.10.2, as requirements.txt)
#   DRY_RUN=1  print the commands instead of running them
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
# shellcheck source=launch/lib.sh
source "$SCRIPT_DIR/lib.sh"

case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/{/^set -euo/d; s/^# \{0,1\}//; p;}' "$0"; exit 0 ;;
esac

CONFIG="${CONFIG:-}"
WORKDIR="${WORKDIR:-}"
INSTALL="${INSTALL:-0}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
[[ -n "$CONFIG" ]] || die "CONFIG is not set; e.g. CONFIG=cifar100_resnet32:mcl_x4."
[[ -n "$WORKDIR" ]] || die "WORKDIR is not set; e.g. WORKDIR=workdirs/resnet32_x4."

cd "$REPO_ROOT"
PYTHON="$(default_python "$REPO_ROOT")"

if [[ "$INSTALL" == 1 ]]; then
  run "$PYTHON" -m pip install -q -r requirements.txt "jax[cuda12]==$JAX_VERSION"
fi

# Inside a SLURM allocation (salloc, srun --pty) the SLURM_* variables would make
# mcl_jax.main start jax.distributed, and JAX's SLURM detection would then give this
# process only GPU number $SLURM_LOCALID. One process owns the whole node here, so they go.
run env -u SLURM_NTASKS -u SLURM_PROCID -u SLURM_LOCALID \
  "$PYTHON" -m mcl_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
