#!/usr/bin/env bash
# The whole GPU comparison in one command (docs/PERFORMANCE.md, "On a GPU"):
#
#   benchmarks/gpu.sh                      # on a GPU machine, everything (about 10 min on an H200)
#   GPU_BUDGET_S=480 benchmarks/gpu.sh     # stop starting sections after 480 s, cut the one
#                                          # running then, and still write the summary
#   benchmarks/gpu.sh --cpu                # the same code paths at toy sizes on a CPU (CI runs it)
#
# Sections run in the order of what matters most, so a budget cuts the least useful ones:
# resnet32 bfloat16 (M = 1, 2), the official PyTorch step as it runs, resnet32 x4, resnet18
# at 224 px, the tuned PyTorch step, one epoch, then the float32 and remaining settings.
# If the first section fails (not cut by the budget), the script stops at once: the library
# does not run on this machine, and no lease time should go on the rest.
#
# Writes to $OUT (the device tool's return folder) or benchmarks/results/gpu-<date>/:
#   bench.jsonl   mcl_jax.bench records (step time, compile, images/s, MFU, peak memory)
#   torch.jsonl   the PyTorch MCL step (the official code if .official/winycg_MCL was
#                 carried, else benchmarks/torch_mcl.py), fp32 and channels_last + AMP
#   epoch.jsonl   one end-to-end CIFAR-shaped epoch of MCL x4 resnet32
#   ceiling.json  a bfloat16 matrix product's rate on this device (the MFU's context)
#   summary.md    the tables (benchmarks/summarize.py) and the JAX / PyTorch ratios
#   log.txt       everything printed
# Python packages the device machine lacks (ml_collections) travel as wheels in .whl/
# (the device README's recipe); they are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-gpu}
PY=${PY:-python3}
BUDGET_S=${GPU_BUDGET_S:-0}
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT" && touch "$OUT/bench.jsonl"
exec > >(tee -a "$OUT/log.txt") 2>&1

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
echo "# $(date -u +%FT%TZ) mode=$MODE host=$(hostname) budget=${BUDGET_S}s"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader || true
"$PY" -c "import jax; print('# jax', jax.__version__, jax.devices())"

SECTIONS_RUN=0
section() {  # section NAME COMMAND...: run it unless the budget is spent; cut it at the budget
  local name=$1 rc=0
  shift
  local limit=()
  if ((BUDGET_S > 0)); then
    local left=$((BUDGET_S - SECONDS))
    if ((left < 30)); then
      echo "# section '$name' skipped: budget of ${BUDGET_S}s spent"
      return 0
    fi
    # timeout signals the whole process group; bash -c runs the exported shell functions.
    limit=(timeout --signal=INT --kill-after=15 "$left" bash -c '"$@"' _)
  fi
  echo "# section '$name' at ${SECONDS}s"
  "${limit[@]}" "$@" || rc=$?
  SECTIONS_RUN=$((SECTIONS_RUN + 1))
  if ((rc != 0)); then
    echo "# section '$name' ended with rc=$rc$( ((rc == 124)) && echo ' (cut at the budget)')"
    if ((SECTIONS_RUN == 1 && rc != 124)); then
      echo "# the first section failed: stopping here"
      exit "$rc"
    fi
  fi
}
bench() {  # bench <mcl_jax.bench flags...>
  "$PY" -m mcl_jax.bench "$@" --json_out="$OUT/bench.jsonl"
}
torch_step() {
  "$PY" benchmarks/torch_step.py --official=.official/winycg_MCL --json_out="$OUT/torch.jsonl" "$@"
}
epoch() {
  "$PY" benchmarks/epoch.py --json_out="$OUT/epoch.jsonl" "$@"
}
ceiling() {  # a large bfloat16 matrix product through XLA: what "peak" looks like here
  "$PY" - "$OUT/ceiling.json" "$@" << 'PYEOF'
import json, sys, time
import jax, jax.numpy as jnp
n = int(sys.argv[2])
a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
f = jax.jit(lambda a, b: a @ b)
f(a, b).block_until_ready()
times = []
for _ in range(10):
  t = time.perf_counter()
  f(a, b).block_until_ready()
  times.append(time.perf_counter() - t)
t = sorted(times)[len(times) // 2]
rec = {"n": n, "dtype": "bfloat16", "median_s": t, "tflops": 2 * n**3 / t / 1e12,
       "device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__}
print("# ceiling:", json.dumps(rec))
open(sys.argv[1], "w").write(json.dumps(rec) + "\n")
PYEOF
}

export PY OUT
export -f bench torch_step epoch ceiling

if [[ $MODE == --cpu ]]; then
  # Toy sizes, the same scripts: checks that everything runs before a lease is spent.
  section "tiny bf16" bench --arch=tiny --members=2 --strategies=unroll --batch=16 \
      --image_size=16 --dtype=bfloat16 --steps=2 --warmup=1
  section "ceiling" ceiling 256
  section "tiny f32" bench --arch=tiny --members=1,2 --strategies=unroll,vmap --batch=16 \
      --image_size=16 --dtype=float32 --steps=2 --warmup=1
  section "torch" torch_step --members=2 --batch=16 --image_size=16 --steps=2 --warmup=1
  section "epoch" epoch --arch=tiny --members=4 --shared_stages=1 --steps=4 \
      --train_examples=256 --batch=16 --image_size=16
else
  # CIFAR: resnet32 M = 1, 2, 4 (the official shared trunk for 4) and wrn_16_2 x2,
  # B = 128, MCL on; ImageNet: resnet18 M = 1 and 3 (stem + layer1 + layer2 shared),
  # B = 256, 224 px, bfloat16; the official PyTorch step (fp32 as it runs, then tuned);
  # one end-to-end epoch of MCL x4 resnet32 (official: 55 s on an RTX 3090).
  section "resnet32 bf16 M=1,2" bench --arch=resnet32 --members=1,2 --strategies=unroll,vmap \
      --batch=128 --dtype=bfloat16
  section "ceiling" ceiling 8192
  section "torch fp32" torch_step --members=2,4
  section "resnet32 bf16 M=4" bench --arch=resnet32 --members=4 --shared_stages=2 \
      --strategies=unroll,vmap --batch=128 --dtype=bfloat16
  section "resnet18 bf16 M=1" bench --arch=resnet18 --members=1 --strategies=unroll \
      --batch=256 --image_size=224 --dtype=bfloat16
  section "resnet18 bf16 M=3 unroll" bench --arch=resnet18 --members=3 --shared_stages=3 \
      --strategies=unroll --batch=256 --image_size=224 --dtype=bfloat16
  section "torch amp" torch_step --members=2,4 --amp --channels_last
  section "epoch bf16" epoch --members=4 --dtype=bfloat16
  section "resnet32 f32 M=1,2" bench --arch=resnet32 --members=1,2 --strategies=unroll,vmap \
      --batch=128 --dtype=float32
  section "resnet32 f32 M=4" bench --arch=resnet32 --members=4 --shared_stages=2 \
      --strategies=unroll,vmap --batch=128 --dtype=float32
  section "wrn_16_2 bf16" bench --arch=wrn_16_2 --members=2 --strategies=unroll,vmap \
      --batch=128 --dtype=bfloat16
  section "resnet18 bf16 M=3 vmap" bench --arch=resnet18 --members=3 --shared_stages=3 \
      --strategies=vmap --batch=256 --image_size=224 --dtype=bfloat16
  section "wrn_16_2 f32" bench --arch=wrn_16_2 --members=2 --strategies=unroll,vmap \
      --batch=128 --dtype=float32
  section "epoch f32" epoch --members=4
fi

"$PY" benchmarks/summarize.py "$OUT/bench.jsonl" --torch="$OUT/torch.jsonl" \
    --epoch="$OUT/epoch.jsonl" > "$OUT/summary.md"
cat "$OUT/summary.md"
echo "# $(date -u +%FT%TZ) done in ${SECONDS}s: $OUT"
