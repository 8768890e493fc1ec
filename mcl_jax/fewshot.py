r"""Few-shot evaluation of an exported member: N-way K-shot episodes on frozen features.

  mcl-fewshot --export=DIR [--classes=5,6,7,8,9] [--ways=5] [--shots=1,5] \
      [--queries=15] [--episodes=600] [--seed=0] [--dataset=NAME] [--json_out=FILE]
  (or python -m mcl_jax.fewshot ...)

The export's pooled features (the backbone without its classifier, BN in eval mode) of
the TEST split of `--classes` (classes the pre-training did not see, e.g. with
`input.classes` holding the others out; the journal version of MCL reports such few-shot
numbers) are L2-normalised; each episode draws `--ways` of those classes, `--shots`
support and `--queries` query images per class, and classifies the queries two ways:
- nearest centroid: the class whose mean support feature has the largest cosine;
- logistic regression on the support features (scikit-learn, L2, C = 1).
Episodes come from a fixed seed, so two exports are judged on the same episodes. Printed
and returned per classifier and shot count: the mean accuracy over the episodes and its
95% confidence interval (1.96 standard deviations of the episode accuracies / sqrt(n)).
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import sys

import numpy as np

CLASSIFIERS = ("nearest_centroid", "logistic_regression")


def episode_accuracies(
  features: np.ndarray,
  labels: np.ndarray,
  *,
  ways: int,
  shots: int,
  queries: int,
  episodes: int,
  seed: int = 0,
) -> dict[str, np.ndarray]:
  """{classifier: accuracy of each episode [episodes]} on L2-normalised `features` [N, F]."""
  from sklearn.linear_model import LogisticRegression

  features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
  classes = np.unique(labels)
  if len(classes) < ways:
    raise ValueError(f"{ways}-way episodes need {ways} classes; the features have {len(classes)}.")
  by_class = {c: np.flatnonzero(labels == c) for c in classes}
  short = [int(c) for c, idx in by_class.items() if len(idx) < shots + queries]
  if short:
    raise ValueError(
      f"class {short[0]} has fewer than {shots + queries} examples for "
      f"{shots}-shot episodes with {queries} queries per class."
    )
  rng = np.random.default_rng(seed)
  out = {name: np.empty(episodes) for name in CLASSIFIERS}
  for e in range(episodes):
    chosen = rng.choice(classes, ways, replace=False)
    support, query = [], []
    for c in chosen:
      picked = rng.choice(by_class[c], shots + queries, replace=False)
      support.append(picked[:shots])
      query.append(picked[shots:])
    s_x = features[np.concatenate(support)]
    s_y = np.repeat(np.arange(ways), shots)
    q_x = features[np.concatenate(query)]
    q_y = np.repeat(np.arange(ways), queries)
    centroids = s_x.reshape(ways, shots, -1).mean(1)
    out["nearest_centroid"][e] = np.mean(np.argmax(q_x @ centroids.T, 1) == q_y)
    clf = LogisticRegression(C=1.0, max_iter=1000)
    out["logistic_regression"][e] = np.mean(clf.fit(s_x, s_y).predict(q_x) == q_y)
  return out


def summarize(accuracies: np.ndarray) -> dict[str, float]:
  """{'mean', 'ci95'}: the mean accuracy and half the 95% confidence interval."""
  a = np.asarray(accuracies, np.float64)
  return {"mean": float(a.mean()), "ci95": float(1.96 * a.std(ddof=1) / np.sqrt(a.size))}


def evaluate(
  export_dir: str,
  *,
  classes: Sequence[int],
  ways: int = 5,
  shots: Sequence[int] = (1, 5),
  queries: int = 15,
  episodes: int = 600,
  seed: int = 0,
  dataset: str | None = None,
) -> dict[str, dict[str, float]]:
  """{'<classifier>_<K>shot': {'mean', 'ci95'}} of the export (module docstring)."""
  from mcl_jax import export

  features, labels = export.features(
    export_dir, ("test",), dataset=dataset, classes=tuple(classes)
  )["test"]
  result = {}
  for k in shots:
    accuracies = episode_accuracies(
      features, labels, ways=ways, shots=k, queries=queries, episodes=episodes, seed=seed
    )
    for name, values in accuracies.items():
      result[f"{name}_{k}shot"] = summarize(values)
  return result


def main(argv: Sequence[str]) -> None:
  from absl import flags
  from absl import logging

  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs dozens of INFO lines per restore
  f = flags.FLAGS
  try:
    result = evaluate(
      f.export,
      classes=[int(c) for c in f.classes],
      ways=f.ways,
      shots=[int(s) for s in f.shots],
      queries=f.queries,
      episodes=f.episodes,
      seed=f.seed,
      dataset=f.dataset,
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(
    f"{f.ways}-way few-shot accuracy (%) of {f.export} on classes "
    f"{','.join(f.classes)}, {f.episodes} episodes, {f.queries} queries per class:"
  )
  for name, value in result.items():
    print(f"  {name:<28} {100 * value['mean']:.2f} +- {100 * value['ci95']:.2f}")
  if f.json_out:
    with open(f.json_out, "w") as out:
      json.dump(result, out, indent=1)


def _define_flags() -> None:
  from absl import flags

  from mcl_jax import export

  export.define_export_flags()
  flags.DEFINE_list("classes", ["5", "6", "7", "8", "9"], "Held-out class ids to test on.")
  flags.DEFINE_integer("ways", 5, "Classes per episode.")
  flags.DEFINE_list("shots", ["1", "5"], "Support images per class.")
  flags.DEFINE_integer("queries", 15, "Query images per class.")
  flags.DEFINE_integer("episodes", 600, "Episodes per shot count.")
  flags.DEFINE_integer("seed", 0, "Seed of the episodes.")


def run_cli() -> None:
  """The `mcl-fewshot` command."""
  from absl import app

  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run_cli()
