"""Figures and tables about the members of a cohort.

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

import os
from typing import Any, Sequence

import numpy as np


def _tsne_2d(
    embeddings: np.ndarray, seed: int, perplexity: float, max_iter: int, method: str,
) -> np.ndarray:
  from sklearn.manifold import TSNE  # Imported here: sklearn is only needed for plots.

  n = embeddings.shape[0]
  # sklearn requires perplexity < n_samples; tiny inputs (tests, smoke runs) need less.
  perplexity = float(min(perplexity, max(1.0, (n - 1) / 3)))
  tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
              max_iter=max_iter, method=method)
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
        f"and {emb_b.shape}.")
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
          xy[sel, 0], xy[sel, 1], s=6, alpha=0.8, linewidths=0,
          color=_colour(cmap, i, classes.size),
          label=str(class_names[int(c)]) if class_names is not None else str(int(c)))
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
  if classes.size <= 20:
    axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
                   markerscale=2, frameon=False)
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
    matrix: Any, *, names: Sequence[str] | None = None, digits: int = 4,
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
