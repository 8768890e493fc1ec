r"""Where a planned TPU step's HBM bytes go: compile a config (default imagenet_r18_x3) for
v5e:4x4 with `mcl_jax.plan` and rank the scheduled HLO's top-level instructions by the bytes of
their operands and result (what XLA's cost analysis sums as "bytes accessed").

  .venv/bin/python benchmarks/tpu_hlo_bytes.py [CONFIG_PATH] > out.txt   (needs libtpu)
"""

import collections
import re
import sys

from mcl_jax import plan

name = sys.argv[1] if len(sys.argv) > 1 else "mcl_jax/configs/imagenet_r18_x3.py"
topology = "v5e:4x4"
config = plan.load_config(name)
planned = plan.build(config, topology)
result, compiled = plan.compile_and_analyse(
  planned.task.compiled_train_step,
  (planned.state, planned.batch, planned.task.consts),
  plan.chip_spec(topology),
  num_chips=16,
  batch_size=config.input.global_batch_size,
)
hlo = compiled.as_text()

ca = compiled.cost_analysis()
ca = ca[0] if isinstance(ca, list) else ca
print("bytes accessed per chip", ca.get("bytes accessed"))
for k, v in sorted(ca.items()):
  if k.startswith("bytes accessed") and v > 1e8:
    print(k, v)

DTYPE = plan.DTYPE_BYTES
shape_re = re.compile(r"\b(" + "|".join(DTYPE) + r")\[([\d,]*)\]")


def nbytes(text):
  total = 0
  for dt, dims in shape_re.findall(text):
    n = 1
    for d in dims.split(","):
      if d:
        n *= int(d)
    total += n * DTYPE[dt]
  return total


# Computations: name -> lines. Fused computations are internal (no HBM traffic of their own).
comps, current = {}, None
for line in hlo.splitlines():
  m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
  if m and not line.startswith(" "):
    current = m.group(2)
    comps[current] = []
  elif current and line.startswith("  "):
    comps[current].append(line)
fused = set()
for lines in comps.values():
  for line in lines:
    fused.update(re.findall(r"calls=%?([\w.\-]+)", line))
result_bytes = {}
rows = []
for comp, lines in comps.items():
  if comp in fused or "fused" in comp:
    continue
  for line in lines:
    m = re.match(r"\s+(ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(.*)$", line)
    if not m:
      continue
    name, shape, op, args, rest = m.group(2), m.group(3), m.group(4), m.group(5), m.group(6)
    out = nbytes(shape)
    result_bytes[name] = out
    if op in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
      continue
    ins = sum(result_bytes.get(a.strip().lstrip("%"), 0) for a in args.split(","))
    kind = re.search(r"kind=(\w+)", rest)
    label = op + (":" + kind.group(1) if kind else "")
    rows.append((out + ins, label, name, shape[:60], comp[:30]))
by_label = collections.Counter()
for b, label, *_ in rows:
  by_label[label] += b
total = sum(b for b, *_ in rows)
print(f"top-level instructions: {len(rows)}, operand+result bytes {total / 1e9:.2f} GB")
for label, b in by_label.most_common(15):
  print(f"  {label:35s} {b / 1e9:7.2f} GB")
print("largest instructions:")
for b, label, name, shape, comp in sorted(rows, reverse=True)[:40]:
  print(f"  {b / 1e6:9.1f} MB  {label:28s} {name:40s} {shape}  [{comp}]")
