r"""Export one member of a trained cohort as a plain single network (docs/SPEC.md 1).

  mcl-export --workdir=DIR --member=m --out=DIR2 [--torch] [--step=N]
  (or python -m mcl_jax.export ...)

Reads the newest checkpoint in DIR (or step N) of a cohort run (a regime whose `REGIME`
is exportable: supervised, MoCo, SimCLR), takes member m alone and writes to DIR2:
- `variables/`: an Orbax checkpoint of {'params', 'batch_stats'} of
  `models.create(arch, num_classes)`: the shared trunk (if any) merged with member m's
  branch and classifier (`models.extract_member`). No projection head; for MoCo the QUERY
  encoder's backbone, without the MLP's second layer, the key encoder or the queue.
- `export.json`: arch, num_classes, the preprocessing (image shape, mean/std of [0, 1]
  pixels) and where it came from (workdir, step, trainer, member, cohort size).
- `model.safetensors` with `--torch`: the same weights under torchvision / official-code
  names (`mcl_jax.convert.to_torch`), loadable with `model.load_state_dict`.

What the exported `fc` is depends on the regime (`Regime.export_note`, written into
export.json): the trained classifier (supervised), MoCo's projection (v1: the 128-d
embedding; v2: the MLP's first layer, F -> F), or untrained (SimCLR). A linear probe
(`lincls.py`) replaces it. `load_exported(DIR2)` gives (module, variables, info) back.
"""

from __future__ import annotations

from collections.abc import Sequence
import datetime
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax import checkpointing
from mcl_jax import errors
from mcl_jax import models

FORMAT = "mcl_jax.export/1"
INFO_FILE = "export.json"
VARIABLES_DIR = "variables"
TORCH_FILE = "model.safetensors"
FEATURE_BATCH = 1000  # images per forward pass of `features`


def _cpu() -> jax.sharding.Sharding:
  """Restore on the host: export never needs (or occupies) an accelerator."""
  return jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])


def read_checkpoint(workdir: str, step: int | None = None) -> tuple[int, dict, dict]:
  """(step, state as nested dicts of arrays, meta) of the newest checkpoint in `workdir`.

  The state is restored without knowing the trainer's state class: its tree and shapes come
  from the checkpoint's own metadata, every array lands on the host CPU.
  """
  import orbax.checkpoint as ocp

  directory = checkpointing.checkpoint_dir(workdir)
  if "://" not in directory and not os.path.isdir(directory):
    raise FileNotFoundError(
      f"No checkpoint in {workdir}: {directory} does not exist; pass "
      "the --workdir of a training run that has saved a checkpoint."
    )
  manager = ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(create=False),
    item_names=("state", "meta"),
    item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
  )
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(
        f"No checkpoint in {workdir}: {directory} holds no complete checkpoint yet."
      )
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(
        f"No checkpoint of step {step} in {workdir}; it has steps "
        f"{', '.join(map(str, sorted(steps)))}."
      )
    metadata = manager.item_metadata(step)["state"]
    tree = getattr(metadata, "tree", metadata)
    cpu = _cpu()
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), tree)
    restored = manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
    )
  finally:
    manager.close()
  return int(step), restored["state"], dict(restored["meta"] or {})


def _member_info(meta: dict, workdir: str) -> dict:
  from mcl_jax import regimes

  exportable = [r.name for r in regimes.all_regimes() if r.exportable]
  # The trainer first: a linear probe's meta lacks the cohort keys, and "not a cohort run"
  # is the sentence that helps there.
  if "trainer" in meta and not regimes.get(meta["trainer"]).exportable:
    raise ValueError(
      f"{workdir} is a {meta['trainer']!r} run; export reads the cohort runs "
      f"of the {', '.join(exportable)} trainers (a linear probe's backbone is "
      "its config.lincls.pretrained export)."
    )
  missing = [
    k
    for k in (
      "arch",
      "num_members",
      "shared_stages",
      "num_classes",
      "trainer",
      "image_shape",
      "mean",
      "std",
    )
    if k not in meta
  ]
  if missing:
    raise ValueError(
      f"The checkpoint meta in {workdir} lacks {', '.join(missing)}; it was not "
      f"written by one of mcl_jax's {', '.join(exportable)} trainers."
    )
  return meta


def export_member(
  workdir: str, member: int, out: str, torch: bool = False, step: int | None = None
) -> dict[str, Any]:
  """Writes member `member` of the run in `workdir` to `out`; returns the export.json dict.

  Raises FileNotFoundError (no checkpoint) or ValueError (member out of range, not an
  exportable run), each with one sentence. An existing export in `out` is overwritten.
  """
  import orbax.checkpoint as ocp

  step, state, meta = read_checkpoint(workdir, step)
  meta = _member_info(meta, workdir)
  num_members = int(meta["num_members"])
  if not 0 <= member < num_members:
    raise ValueError(
      f"--member={member} is out of range: the run in {workdir} has "
      f"{num_members} member{'s' if num_members > 1 else ''} "
      f"(0..{num_members - 1})."
    )
  cohort = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
  variables = models.extract_member(cohort, member, int(meta["shared_stages"]))
  variables = jax.tree.map(np.asarray, variables)
  arch, num_classes = meta["arch"], int(meta["num_classes"])
  _check_variables(arch, num_classes, variables, tuple(meta["image_shape"]))

  out = os.path.abspath(out)
  os.makedirs(out, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(out, VARIABLES_DIR), variables, force=True)
  torch_file = None
  if torch:
    _write_torch(arch, variables, os.path.join(out, TORCH_FILE))
    torch_file = TORCH_FILE
  elif os.path.exists(os.path.join(out, TORCH_FILE)):
    os.remove(os.path.join(out, TORCH_FILE))  # a stale file from an earlier export

  image_shape = [int(s) for s in meta["image_shape"]]
  info = {
    "format": FORMAT,
    "arch": arch,
    "num_classes": num_classes,
    "num_params": models.count_params(variables["params"]),
    "preprocessing": {
      "image_shape": image_shape,
      "image_size": image_shape[0],
      "mean": [float(x) for x in meta["mean"]],
      "std": [float(x) for x in meta["std"]],
      "pixels": "RGB (or grey) in [0, 1] (uint8 / 255), then (x - mean) / std, NHWC",
    },
    "classifier": _classifier_note(meta),
    "source": {
      "workdir": workdir if "://" in workdir else os.path.abspath(workdir),
      "step": step,
      "trainer": meta["trainer"],
      "member": member,
      "num_members": num_members,
      "shared_stages": int(meta["shared_stages"]),
      "moco_mlp": meta.get("moco_mlp"),
      "embed_dim": meta.get("embed_dim"),
      "dataset": _dataset(meta),
    },
    "files": {"variables": VARIABLES_DIR, "torch": torch_file},
    "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }
  with open(os.path.join(out, INFO_FILE), "w") as f:
    json.dump(info, f, indent=2)
  return info


def _dataset(meta: dict) -> str | None:
  """The training run's config.input.dataset, from the config its checkpoint stored."""
  try:
    return json.loads(meta["config"])["input"]["dataset"]
  except (KeyError, TypeError, ValueError):
    return None


def _classifier_note(meta: dict) -> str:
  from mcl_jax import regimes

  return regimes.get(meta["trainer"]).export_note(meta)


def _template(arch: str, num_classes: int, image_shape: tuple[int, ...]) -> dict[str, Any]:
  net = models.create(arch, num_classes)
  return jax.eval_shape(
    lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), False)
  )


def _check_variables(
  arch: str, num_classes: int, variables: dict, image_shape: tuple[int, ...]
) -> None:
  """The exported tree must be exactly `create(arch, num_classes)`'s, shapes included."""
  expected = jax.tree.map(lambda s: s.shape, _template(arch, num_classes, image_shape))
  got = jax.tree.map(lambda a: a.shape, {k: variables[k] for k in expected if k in variables})
  if got != {k: expected[k] for k in expected}:
    raise ValueError(
      f"The extracted member does not match {arch} with {num_classes} classes; "
      "the checkpoint meta disagrees with its variables."
    )


def _write_torch(arch: str, variables: dict, path: str) -> None:
  try:
    from mcl_jax import convert

    to_torch, save = convert.to_torch, convert.save_safetensors
  except (ImportError, AttributeError) as e:
    raise RuntimeError(
      f"--torch needs mcl_jax.convert.to_torch and save_safetensors, which "
      f"this checkout lacks ({e}); export without --torch."
    ) from None
  save(path, to_torch(arch, variables))


def load_exported(path: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
  """(module, variables, info) of an export directory.

  module = models.create(info['arch'], info['num_classes']); apply it as
  `module.apply(variables, images, False) -> (logits, features)` with images preprocessed
  as info['preprocessing'] says. Variables are restored on the host CPU.
  """
  import orbax.checkpoint as ocp

  if not os.path.isdir(path):
    raise FileNotFoundError(
      f"{path} does not exist; create an export directory with python -m "
      "mcl_jax.export --workdir=RUN --member=0 --out=DIR."
    )
  info_path = os.path.join(path, INFO_FILE)
  if not os.path.isfile(info_path):
    raise FileNotFoundError(
      f"{path} is not an export directory (no {INFO_FILE}); create one "
      "with python -m mcl_jax.export --workdir=RUN --member=0 --out=DIR."
    )
  with open(info_path) as f:
    info = json.load(f)
  if info.get("format") != FORMAT:
    raise ValueError(f"{info_path} has format {info.get('format')!r}, not {FORMAT!r}.")
  module = models.create(info["arch"], int(info["num_classes"]))
  image_shape = tuple(info["preprocessing"]["image_shape"])
  cpu = _cpu()
  target = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu),
    _template(info["arch"], int(info["num_classes"]), image_shape),
  )
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(os.path.join(os.path.abspath(path), VARIABLES_DIR), target)
  return module, dict(variables), info


def features(
  export_dir: str,
  splits: Sequence[str] = ("test",),
  *,
  dataset: str | None = None,
  **input_fields: Any,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{split: (pooled features [N, F], labels [N])} of an export, BN in eval mode.

  The images come from `data.sources.make_source` for `dataset` (default: the one the export
  was trained on) at the export's image size, with `input_fields` (e.g. classes,
  validation_size, train_subset) as in `config.input`. Splits: 'train' (un-augmented),
  'validation' (when input_fields hold one out) and 'test'.
  """
  from mcl_jax.data import protocol
  from mcl_jax.data import sources

  module, variables, info = load_exported(export_dir)
  name = dataset or info["source"].get("dataset")
  if not name:
    raise ValueError(f"{export_dir} does not record its dataset; pass --dataset.")
  source = sources.make_source(
    {"dataset": name, "image_size": info["preprocessing"]["image_size"], **input_fields}
  )
  available = (protocol.TRAIN_SPLIT,) + source.eval_split_names()
  missing = [s for s in splits if s not in available]
  if missing:
    raise ValueError(
      f"split {missing[0]!r} is not in {name} as given (it has "
      f"{', '.join(sorted(available))}); a 'validation' split needs "
      "validation_size."
    )
  apply = jax.jit(lambda x: module.apply(variables, x, False)[1])
  out = {}
  for split in splits:
    chunks, labels = [], []
    for batch in source.eval_batches(split, FEATURE_BATCH, process_index=0, process_count=1):
      keep = batch["mask"] > 0
      chunks.append(np.asarray(apply(source.eval_preprocess(batch["image"])))[keep])
      labels.append(batch["label"][keep])
    out[split] = (np.concatenate(chunks), np.concatenate(labels))
  return out


def define_export_flags() -> None:
  """The flags every command that reads an export shares: --export (required), --dataset,
  --json_out."""
  from absl import flags

  flags.DEFINE_string("export", None, "An export directory (mcl-export --out).")
  flags.DEFINE_string("dataset", None, "Dataset (default: the one the export was trained on).")
  flags.DEFINE_string("json_out", None, "Write the result as JSON here.")
  flags.mark_flags_as_required(["export"])


def main(argv: list[str]) -> None:
  from absl import flags
  from absl import logging

  # Export logs nothing of its own; Orbax's INFO lines (dozens per save) would bury the
  # one-line result or error.
  logging.set_verbosity(logging.WARNING)
  flags_ = flags.FLAGS
  if len(argv) > 1:
    errors.exit_with(f"unexpected arguments {' '.join(argv[1:])}; pass options as --flag=value.")
  try:
    info = export_member(
      flags_.workdir, flags_.member, flags_.out, torch=flags_.torch, step=flags_.step
    )
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    errors.exit_with(str(e))
  print(
    f"Exported member {info['source']['member']} ({info['arch']}, "
    f"{info['num_params']:,} params, step {info['source']['step']}) to {flags_.out}."
  )


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("workdir", None, "Workdir of a supervised, MoCo or SimCLR run.")
  flags.DEFINE_integer("member", 0, "Which member to export (0-based).")
  flags.DEFINE_string("out", None, "Export directory to write.")
  flags.DEFINE_bool("torch", False, "Also write model.safetensors with torchvision names.")
  flags.DEFINE_integer("step", None, "Export this checkpoint step instead of the newest.")
  flags.mark_flags_as_required(["workdir", "out"])


def run_cli() -> None:
  """The `mcl-export` command."""
  from absl import app

  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run_cli()
