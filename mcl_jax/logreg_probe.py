r"""A linear probe that cannot diverge: logistic regression on an export's frozen features.

  mcl-logreg-probe --export=DIR --validation_size=5000 [--train_subset=5000] \
      [--classes=0,1,2,3,4] [--dataset=NAME] [--json_out=FILE]
  (or python -m mcl_jax.logreg_probe ...)

The SGD probe (`lincls.py`, the official main_lincls.py recipe) trains a linear layer on
the un-normalised pooled features with a fixed learning rate; how well that recipe fits
depends on the scale of the features, which differs between networks and between
training methods, so it can favour one network over another for a reason unrelated to
what the features encode. This probe removes that: the pooled features (BN in eval mode,
no augmentation) of the training split are standardised (each dimension to zero mean, unit
variance, with the training split's statistics), a multinomial logistic regression
(scikit-learn, L-BFGS, L2) is fitted for each inverse regularisation strength C of a grid,
the C with the best validation accuracy is kept, and its test accuracy is reported. The
dataset is built as `config.input` would build it (`--classes`, `--validation_size`,
`--train_subset`), so the probe sees the same labelled images as the SGD probe of a run.
`--json_out` writes `fit`'s result, split-first as the tasks' evaluations: {'test':
{'top1'}, 'validation': {'top1', 'top1_per_c'}, 'c'}.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import sys
from typing import Any

import numpy as np

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def fit(
  train: tuple[np.ndarray, np.ndarray],
  validation: tuple[np.ndarray, np.ndarray],
  test: tuple[np.ndarray, np.ndarray],
  cs: Sequence[float] = C_GRID,
) -> dict[str, Any]:
  """The probe with the C chosen on validation, split-first as the tasks' evaluations:
  {'test': {'top1'}, 'validation': {'top1', 'top1_per_c'}, 'c'}: the chosen C's test and
  validation top-1, the validation top-1 of every C of `cs` (in its order), and (at the
  top, not a split's accuracy) the chosen C.

  Each argument is (features [N, F], labels [N]).
  """
  from sklearn.linear_model import LogisticRegression

  if not cs:
    raise ValueError("the C grid is empty; give at least one inverse regularisation strength.")
  mean, std = train[0].mean(0), train[0].std(0)
  std = np.where(std > 0, std, 1.0)  # a constant feature stays 0 instead of NaN

  def standardise(x):
    return (x - mean) / std

  fits, per_c = [], []
  for c in cs:
    clf = LogisticRegression(C=float(c), max_iter=5000).fit(standardise(train[0]), train[1])
    per_c.append(float(clf.score(standardise(validation[0]), validation[1])))
    fits.append((c, per_c[-1], clf))
  # The first best on validation: ties keep the stronger regularisation (smaller C first).
  c, val_top1, clf = max(fits, key=lambda fit: fit[1])
  return {
    "test": {"top1": float(clf.score(standardise(test[0]), test[1]))},
    "validation": {"top1": val_top1, "top1_per_c": per_c},
    "c": float(c),
  }


def evaluate(
  export_dir: str,
  *,
  validation_size: int,
  train_subset: int = 0,
  classes: Sequence[int] = (),
  dataset: str | None = None,
  cs: Sequence[float] = C_GRID,
) -> dict[str, Any]:
  """`fit` on the export's features of the dataset's train / validation / test splits."""
  from mcl_jax import export

  if validation_size <= 0:
    raise ValueError("the probe chooses C on a validation split: give validation_size > 0.")
  splits = export.features(
    export_dir,
    ("train", "validation", "test"),
    dataset=dataset,
    classes=tuple(classes),
    validation_size=validation_size,
    train_subset=train_subset,
  )
  return fit(splits["train"], splits["validation"], splits["test"], cs)


def main(argv: Sequence[str]) -> None:
  from absl import flags
  from absl import logging

  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs dozens of INFO lines per restore
  f = flags.FLAGS
  try:
    result = evaluate(
      f.export,
      validation_size=f.validation_size,
      train_subset=f.train_subset,
      classes=[int(c) for c in f.classes],
      dataset=f.dataset,
      cs=[float(c) for c in f.cs],
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  per_c = "  ".join(
    f"C={float(c):g}: {100 * v:.2f}" for c, v in zip(f.cs, result["validation"]["top1_per_c"])
  )
  print(f"logistic-regression probe of {f.export}: validation top-1 per C: {per_c}")
  print(
    f"chosen C = {result['c']:g}: test top-1 {100 * result['test']['top1']:.2f}% "
    f"(validation {100 * result['validation']['top1']:.2f}%)"
  )
  if f.json_out:
    with open(f.json_out, "w") as out:
      json.dump(result, out, indent=1)


def _define_flags() -> None:
  from absl import flags

  from mcl_jax import export

  export.define_export_flags()
  flags.DEFINE_integer(
    "validation_size",
    5000,
    "Training images held out to choose C on (config.input.validation_size).",
  )
  flags.DEFINE_integer("train_subset", 0, "Labelled training images (0: all the rest).")
  flags.DEFINE_list("classes", [], "Class ids to keep (default: all).")
  flags.DEFINE_list("cs", [str(c) for c in C_GRID], "Inverse L2 strengths to choose from.")


def run_cli() -> None:
  """The `mcl-logreg-probe` command."""
  from absl import app

  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run_cli()
