#!/usr/bin/env bash
# The whole GPU comparison in one command (docs/PERFORMANCE.md, "On a GPU"):
#
#   benchmarks/gpu.sh            # on a GPU machine; about 6-8 minutes on one H100/H200
#   benchmarks/gpu.sh --cpu      # the same code paths at toy sizes on a CPU (CI runs it)
#
# Writes to $OUT (the device tool's return folder) or benchmarks/results/gpu-<date>/:
#   bench.jsonl   mcl_jax.bench records (step time, compile, images/s, MFU, peak memory)
#   torch.jsonl   the PyTorch MCL step (the official code if .official/winycg_MCL was
#                 carried, else benchmarks/torch_mcl.py), fp32 and channels_last + AMP
#   epoch.jsonl   one end-to-end CIFAR-shaped epoch of MCL x4 resnet32
#   summary.md    the tables (benchmarks/summarize.py) and the JAX / PyTorch ratios
#   log.txt       everything printed
# Python packages the device machine lacks (ml_collections) travel as wheels in .whl/
# (the device README's recipe); they are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-gpu}
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
echo "# $(date -u +%FT%TZ) mode=$MODE host=$(hostname)"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader || true
"$PY" -c "import jax; print('# jax', jax.__version__, jax.devices())"

bench() {  # bench <mcl_jax.bench flags...>
  "$PY" -m mcl_jax.bench "$@" --json_out="$OUT/bench.jsonl"
}

if [[ $MODE == --cpu ]]; then
  # Toy sizes, the same scripts: checks that everything runs before a lease is spent.
  bench --arch=tiny --members=1,2 --strategies=unroll,vmap --batch=16 --image_size=16 \
      --dtype=float32 --steps=2 --warmup=1
  bench --arch=tiny --members=2 --strategies=unroll --batch=16 --image_size=16 \
      --dtype=bfloat16 --steps=2 --warmup=1
  "$PY" benchmarks/torch_step.py --members=2 --batch=16 --image_size=16 --steps=2 --warmup=1 \
      --official=.official/winycg_MCL --json_out="$OUT/torch.jsonl"
  "$PY" benchmarks/epoch.py --arch=tiny --members=4 --shared_stages=1 --steps=4 \
      --train_examples=256 --batch=16 --image_size=16 --json_out="$OUT/epoch.jsonl"
else
  # CIFAR: resnet32 M = 1, 2, 4 (the official shared trunk for 4) and wrn_16_2 x2,
  # B = 128, float32 and bfloat16, unroll and vmap, MCL on.
  for dtype in float32 bfloat16; do
    bench --arch=resnet32 --members=1,2 --strategies=unroll,vmap --batch=128 --dtype=$dtype
    bench --arch=resnet32 --members=4 --shared_stages=2 --strategies=unroll,vmap --batch=128 \
        --dtype=$dtype
    bench --arch=wrn_16_2 --members=2 --strategies=unroll,vmap --batch=128 --dtype=$dtype
  done
  # ImageNet: resnet18 M = 1 and 3 (stem + layer1 + layer2 shared), B = 256, 224 px, bf16.
  bench --arch=resnet18 --members=1 --strategies=unroll --batch=256 --image_size=224 \
      --dtype=bfloat16
  bench --arch=resnet18 --members=3 --shared_stages=3 --strategies=unroll,vmap --batch=256 \
      --image_size=224 --dtype=bfloat16
  # The official PyTorch step on the same GPU: fp32 as it runs, then tuned.
  "$PY" benchmarks/torch_step.py --members=2,4 --official=.official/winycg_MCL \
      --json_out="$OUT/torch.jsonl"
  "$PY" benchmarks/torch_step.py --members=2,4 --official=.official/winycg_MCL --amp \
      --channels_last --json_out="$OUT/torch.jsonl"
  # One end-to-end epoch of MCL x4 resnet32 (official: 55 s on an RTX 3090).
  "$PY" benchmarks/epoch.py --members=4 --json_out="$OUT/epoch.jsonl"
  "$PY" benchmarks/epoch.py --members=4 --dtype=bfloat16 --json_out="$OUT/epoch.jsonl"
fi

"$PY" benchmarks/summarize.py "$OUT/bench.jsonl" --torch="$OUT/torch.jsonl" \
    --epoch="$OUT/epoch.jsonl" > "$OUT/summary.md"
cat "$OUT/summary.md"
echo "# $(date -u +%FT%TZ) done: $OUT"
