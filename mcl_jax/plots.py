r"""Figures and tables about the members of a cohort, and the `mcl-plot` command.

  mcl-plot --workdir=RUN [--out=RUN/plots] [--examples=1000] [--split=test]
  (or python -m mcl_jax.plots ...)

draws, from a training run's workdir (supervised, MoCo or SimCLR): `curves.png`, the training
curves logged to TensorBoard (every loss term, the members' cross-entropies and training
accuracy, the embedding health, the learning rate, evaluations); `tsne.png`, the t-SNE of
two members' pooled features of the same eval examples side by side (the paper's Figure
4); and, for supervised runs, `agreement.txt`, how often each pair of members predicts
the same class (also printed).

- `tsne_side_by_side`: t-SNE of two members' embeddings of the same examples, side by
  side and coloured by class, as the paper's Figure 4 (MCL members learn embeddings with
  better-separated classes than independently trained ones).
- `member_agreement` / `format_agreement_table`: how often two members predict the same
  class on the eval split. MCL pulls members together (ICL, Soft ICL), so agreement is
  expected to rise over the independent baseline; low agreement with high accuracy is
  what makes the ensemble worth more than one member.

No global matplotlib state: the figure is drawn with the object-oriented API on an Agg
canvas, so importing this module or calling it never changes `pyplot`'s backend.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

if TYPE_CHECKING:
  from mcl_jax import knn
  from mcl_jax import models


def _tsne_2d(
  embeddings: np.ndarray,
  seed: int,
  perplexity: float,
  max_iter: int,
  method: str,
) -> np.ndarray:
  from sklearn.manifold import TSNE  # Imported here: sklearn is only needed for plots.

  n = embeddings.shape[0]
  # sklearn requires perplexity < n_samples; tiny inputs (tests, smoke runs) need less.
  perplexity = float(min(perplexity, max(1.0, (n - 1) / 3)))
  tsne = TSNE(
    n_components=2,
    perplexity=perplexity,
    init="pca",
    random_state=seed,
    max_iter=max_iter,
    method=method,
  )
  return tsne.fit_transform(embeddings.astype(np.float64))


def tsne_side_by_side(
  emb_a: Any,
  emb_b: Any,
  labels: Any,
  path: str,
  *,
  titles: tuple[str, str] = ("member 0", "member 1"),
  seed: int = 0,
  perplexity: float = 30.0,
  max_iter: int = 1000,
  method: str = "barnes_hut",
  class_names: Sequence[str] | None = None,
) -> str:
  """Writes a PNG with the t-SNE maps of two members' embeddings, side by side.

  Args:
    emb_a, emb_b: [N, D] embeddings (or pooled features) of the same N examples from two
      members of a run (numpy or jax arrays).
    labels: [N] integer class of each example; points are coloured by it.
    path: output PNG path; parent folders are created.
    titles: one title per panel.
    seed: t-SNE random state (same for both panels).
    perplexity: t-SNE perplexity, lowered automatically for small N.
    max_iter, method: passed to sklearn's TSNE (its defaults). "exact" is O(N^2) but much
      faster than Barnes-Hut for a few hundred points.
    class_names: optional names for the legend (drawn when there are at most 20 classes).

  Returns:
    `path`.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  emb_a, emb_b = np.asarray(emb_a), np.asarray(emb_b)
  labels = np.asarray(labels).reshape(-1)
  if emb_a.ndim != 2 or emb_b.ndim != 2 or emb_a.shape[0] != emb_b.shape[0]:
    raise ValueError(
      f"tsne_side_by_side wants two [N, D] arrays with the same N, got {emb_a.shape} "
      f"and {emb_b.shape}."
    )
  if labels.shape[0] != emb_a.shape[0]:
    raise ValueError(f"labels must have {emb_a.shape[0]} entries, got {labels.shape[0]}.")
  if emb_a.shape[0] < 3:
    raise ValueError(f"t-SNE needs at least 3 examples, got {emb_a.shape[0]}.")

  classes = np.unique(labels)
  # Qualitative colour maps while colours stay distinguishable; beyond 20 classes
  # (e.g. all of CIFAR-100) a continuous one, without a legend.
  cmap = "tab10" if classes.size <= 10 else "tab20" if classes.size <= 20 else "nipy_spectral"

  fig = Figure(figsize=(12, 5.5), dpi=100)
  FigureCanvasAgg(fig)  # Attaches an Agg canvas to this figure only: no pyplot state.
  axes = fig.subplots(1, 2)
  for ax, emb, title in zip(axes, (emb_a, emb_b), titles):
    xy = _tsne_2d(emb, seed, perplexity, max_iter, method)
    for i, c in enumerate(classes):
      sel = labels == c
      ax.scatter(
        xy[sel, 0],
        xy[sel, 1],
        s=6,
        alpha=0.8,
        linewidths=0,
        color=_colour(cmap, i, classes.size),
        label=str(class_names[int(c)]) if class_names is not None else str(int(c)),
      )
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
  if classes.size <= 20:
    axes[1].legend(
      loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2, frameon=False
    )
  fig.tight_layout()

  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  fig.savefig(path, format="png")
  return path


def _colour(cmap_name: str, i: int, n: int):
  from matplotlib import colormaps

  cmap = colormaps[cmap_name]
  if cmap_name in ("tab10", "tab20"):
    return cmap(i)
  return cmap(i / max(n - 1, 1))


def member_agreement(logits: Any, mask: Any | None = None) -> np.ndarray:
  """[M, M] fraction of examples on which members i and j predict the same class.

  Args:
    logits: [M, B, C] logits of the M members on the same B eval examples.
    mask: optional [B] bool, False for padding rows of the last eval batch.

  Returns:
    float64 [M, M] matrix, symmetric, with 1 on the diagonal.
  """
  logits = np.asarray(logits)
  if logits.ndim != 3:
    raise ValueError(f"member_agreement wants logits [M, B, C], got shape {logits.shape}.")
  pred = logits.argmax(axis=-1)  # [M, B]
  weights = np.ones(pred.shape[1]) if mask is None else np.asarray(mask, np.float64)
  if weights.shape != (pred.shape[1],):
    raise ValueError(f"mask must have shape [{pred.shape[1]}], got {weights.shape}.")
  total = weights.sum()
  if total <= 0:
    raise ValueError("member_agreement needs at least one unmasked example.")
  same = pred[:, None, :] == pred[None, :, :]  # [M, M, B]
  return (same * weights).sum(axis=-1) / total


def format_agreement_table(
  matrix: Any,
  *,
  names: Sequence[str] | None = None,
  digits: int = 4,
) -> str:
  """Plain-text table of a `member_agreement` matrix, one row and column per member."""
  matrix = np.asarray(matrix, np.float64)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
    raise ValueError(f"format_agreement_table wants a square matrix, got {matrix.shape}.")
  m = matrix.shape[0]
  names = [f"member {i}" for i in range(m)] if names is None else [str(n) for n in names]
  if len(names) != m:
    raise ValueError(f"names must have {m} entries, got {len(names)}.")
  width = max(max(len(n) for n in names), digits + 2)
  lines = [" " * width + "".join(f"  {n:>{width}}" for n in names)]
  for name, row in zip(names, matrix):
    lines.append(f"{name:<{width}}" + "".join(f"  {v:>{width}.{digits}f}" for v in row))
  return "\n".join(lines)


# ----------------------------------------------------------------------------- from a run


def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{tag: (steps, values)} of every scalar a run wrote to TensorBoard in `workdir`."""
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0, "scalars": 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags().get("tensors", []):
    events = acc.Tensors(tag)
    out[tag] = (
      np.asarray([e.step for e in events]),
      np.asarray([float(np.asarray(_tensor_value(e.tensor_proto))) for e in events]),
    )
  for tag in acc.Tags().get("scalars", []):
    events = acc.Scalars(tag)
    out[tag] = (np.asarray([e.step for e in events]), np.asarray([e.value for e in events]))
  return out


def _tensor_value(proto: Any) -> Any:
  from tensorboard.util import tensor_util

  return tensor_util.make_ndarray(proto)


# Panels of `training_curves`: (title, tag prefixes drawn in it).
CURVE_PANELS = (
  (
    "losses",
    (
      "train/loss",
      "train/vcl",
      "train/icl",
      "train/soft_vcl",
      "train/soft_icl",
      "train/logit_kd",
      "train/ce/",
    ),
  ),
  (
    "training accuracy and evaluation",
    (
      "train/accuracy/",
      "train/instance_accuracy/",
      "test/top1/",
      "validation/top1/",
      "test/knn_top1/",
      "validation/knn_top1/",
    ),
  ),
  (
    "embedding health (mean pairwise cosine, dead head units)",
    ("train/embed_cosine/", "train/head_dead_units/"),
  ),
  ("learning rate", ("train/learning_rate",)),
)


def training_curves(scalars: dict[str, tuple[np.ndarray, np.ndarray]], path: str) -> str:
  """One panel per group of `CURVE_PANELS` (empty groups left out); writes a PNG."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  panels = [
    (title, [t for t in sorted(scalars) if t.startswith(prefixes)])
    for title, prefixes in CURVE_PANELS
  ]
  panels = [(title, tags) for title, tags in panels if tags]
  if not panels:
    raise ValueError("The run has logged no training metrics yet.")
  fig = Figure(figsize=(8, 3.2 * len(panels)), dpi=100)
  FigureCanvasAgg(fig)
  for i, (title, tags) in enumerate(panels):
    ax = fig.add_subplot(len(panels), 1, i + 1)
    for tag in tags:
      steps, values = scalars[tag]
      style = "o-" if len(steps) < 5 else "-"
      ax.plot(steps, values, style, markersize=3, linewidth=1, label=tag)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  return path


def compare_curves(runs: dict[str, str], tags: Sequence[str], path: str) -> str:
  """One panel per TensorBoard tag, one line per run ({label: workdir}); writes a PNG.

  E.g. the mean pairwise cosine of member 0's embeddings in runs with and without a
  remedy (docs/RESULTS.md, "The collapse").
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  scalars = {label: read_scalars(workdir) for label, workdir in runs.items()}
  for tag in tags:  # A run without a tag (a baseline has no vcl) is left out of its panel.
    if not any(tag in found for found in scalars.values()):
      some = sorted(next(iter(scalars.values())))
      raise ValueError(
        f"No run has the TensorBoard scalar {tag!r}; the first has "
        f"{', '.join(some[:8])}{', ...' if len(some) > 8 else ''}."
      )
  fig = Figure(figsize=(8, 3.0 * len(tags)), dpi=100)
  FigureCanvasAgg(fig)
  for i, tag in enumerate(tags):
    ax = fig.add_subplot(len(tags), 1, i + 1)
    for j, label in enumerate(runs):
      if tag not in scalars[label]:
        continue
      steps, values = scalars[label][tag]
      ax.plot(steps, values, "-", linewidth=1.2, label=label, color=_colour("tab10", j, len(runs)))
    ax.set_title(tag, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  return path


class _MonitoredTask(Protocol):
  """What `eval_outputs` reads of a self-supervised task: its kNN monitor."""

  monitor: knn.Monitor


class _ModelTask(Protocol):
  """What `eval_outputs` reads of a supervised cohort task: its model."""

  model: models.Cohort


def eval_outputs(workdir: str, split: str = "test", examples: int = 1000) -> dict[str, np.ndarray]:
  """The newest checkpoint of a run, applied to the first `examples` of an eval split.

  {'features': [M, N, F] pooled features, 'labels': [N], 'logits': [M, N, C] (supervised
  runs only)}. The run is rebuilt from the config its checkpoint stored.
  """
  import jax

  from mcl_jax import checkpointing
  from mcl_jax import config_lib
  from mcl_jax import export as export_lib
  from mcl_jax import jobs

  _, _, meta = export_lib.read_checkpoint(workdir)
  from mcl_jax import regimes

  cohorts = [r.name for r in regimes.all_regimes() if r.exportable]
  if "trainer" not in meta or not regimes.get(meta["trainer"]).exportable:
    raise ValueError(
      f"{workdir} is a {meta.get('trainer')!r} run; mcl-plot draws the members "
      f"of a cohort run ({', '.join(cohorts)})."
    )
  config = config_lib.config_from_json(meta["config"])
  run = jobs.build(config, workdir)
  run.restore(checkpointing.Checkpointer(workdir))
  source = run.setup.source
  if split not in source.eval_split_names():
    raise ValueError(
      f"{config.input.dataset} has no {split!r} split; it has "
      f"{', '.join(source.eval_split_names())}."
    )
  image_parts: list[np.ndarray] = []
  label_parts: list[np.ndarray] = []
  for batch in source.eval_batches(split, run.setup.eval_batch_size()):
    keep = batch["mask"] > 0
    image_parts.append(batch["image"][keep])
    label_parts.append(batch["label"][keep])
    if sum(len(x) for x in label_parts) >= examples:
      break
  images = np.concatenate(image_parts)[:examples]
  labels = np.concatenate(label_parts)[:examples]
  if regimes.self_supervised(config.trainer):
    monitor = cast(_MonitoredTask, run.task).monitor
    features, _ = monitor.embed_split(run.state, split)
    return {"features": features[:, :examples], "labels": labels}
  model, state = cast(_ModelTask, run.task).model, run.state
  apply = jax.jit(
    lambda x: model.apply(
      {"params": state.params, "batch_stats": state.batch_stats}, x, train=False
    )
  )
  result = jax.device_get(apply(source.eval_preprocess(images)))
  return {
    "features": np.asarray(result["features"], np.float32),
    "logits": np.asarray(result["logits"]),
    "labels": labels,
  }


def main(argv: Sequence[str]) -> None:
  import sys

  from absl import flags

  from mcl_jax import loop

  del argv
  flags_ = flags.FLAGS
  loop.quiet_library_logs()
  if flags_.compare:
    try:
      runs = dict(item.split("=", 1) for item in flags_.compare)
      path = compare_curves(runs, flags_.tags, flags_.out or "compare.png")
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    print(f"Wrote {path}")
    return
  if not flags_.workdir:
    print("error: pass --workdir=RUN (or --compare=LABEL=RUN,...).", file=sys.stderr)
    sys.exit(2)
  out = flags_.out or os.path.join(flags_.workdir, "plots")
  try:
    scalars = read_scalars(flags_.workdir)
    written = [training_curves(scalars, os.path.join(out, "curves.png"))]
    outputs = eval_outputs(flags_.workdir, flags_.split, flags_.examples)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  features = outputs["features"]
  if features.shape[0] >= 2:
    written.append(
      tsne_side_by_side(features[0], features[1], outputs["labels"], os.path.join(out, "tsne.png"))
    )
  if "logits" in outputs:
    table = format_agreement_table(member_agreement(outputs["logits"]))
    with open(os.path.join(out, "agreement.txt"), "w") as f:
      f.write(table + "\n")
    written.append(os.path.join(out, "agreement.txt"))
    print(
      f"Members predicting the same class ({flags_.split} split, "
      f"{features.shape[1]} examples):\n{table}"
    )
  print("Wrote " + ", ".join(written))


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("workdir", None, "Workdir of a supervised, MoCo or SimCLR run.")
  flags.DEFINE_string(
    "out", None, "Folder for the figures (default: WORKDIR/plots); with --compare, the PNG's path."
  )
  flags.DEFINE_integer("examples", 1000, "Eval examples in the t-SNE and agreement.")
  flags.DEFINE_string("split", "test", "Eval split: test, or validation when held out.")
  flags.DEFINE_list(
    "compare",
    [],
    "LABEL=WORKDIR,...: overlay --tags of several runs in "
    "one PNG (--out) instead of plotting one run.",
  )
  flags.DEFINE_list(
    "tags", ["train/embed_cosine/member_0", "train/vcl"], "TensorBoard scalars for --compare."
  )


def run_cli() -> None:
  """The `mcl-plot` command."""
  from absl import app

  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run_cli()
