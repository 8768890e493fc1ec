#!/usr/bin/env bash
# The CPU measurements in benchmarks/results/ (cpu_README.md explains them):
#   benchmarks/cpu.sh [resnet32|resnet18|all]      (from the repository root or anywhere)
# Appends to results/cpu_<arch>.jsonl and results/cpu_<arch>.txt (the printed tables, with
# `uptime` before and after each run: the machine these were taken on was shared).
# Summarise with: .venv/bin/python benchmarks/summarize.py benchmarks/results/cpu_*.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results
STEPS=${STEPS:-4}
WARMUP=${WARMUP:-1}
mkdir -p "$OUT"

run() {  # run <arch> <bench flags...>
  local arch=$1; shift
  {
    echo "# $(date -u +%FT%TZ) uptime:$(uptime)"
    echo "# $PY -m mcl_jax.bench --arch=$arch $* --steps=$STEPS --warmup=$WARMUP"
    "$PY" -m mcl_jax.bench --arch="$arch" "$@" --steps="$STEPS" --warmup="$WARMUP" \
        --json_out="$OUT/cpu_$arch.jsonl" 2>>"$OUT/cpu_$arch.stderr.log"
    echo "# $(date -u +%FT%TZ) uptime:$(uptime)"
  } | tee -a "$OUT/cpu_$arch.txt"
}

what=${1:-all}
if [[ $what == resnet32 || $what == all ]]; then
  run resnet32 --members=1,2,4 --strategies=vmap,unroll,map --batch=128 --image_size=32 --mcl=both
fi
if [[ $what == resnet18 || $what == all ]]; then
  run resnet18 --members=1,2,3 --strategies=vmap,unroll,map --batch=32 --image_size=64 --mcl=both
fi
