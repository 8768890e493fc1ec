"""Few-shot evaluation: episodes, classifiers, confidence intervals, the command."""

import os
import subprocess
import sys

import numpy as np
import pytest

from mcl_jax import fewshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clusters(num_classes, per_class, dim, spread, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, dim)) * 5
  labels = np.repeat(np.arange(num_classes), per_class)
  return centres[labels] + spread * rng.normal(size=(labels.size, dim)), labels


def test_separable_classes_give_perfect_episodes():
  features, labels = clusters(6, 20, 8, spread=0.01)
  acc = fewshot.episode_accuracies(features, labels + 3, ways=5, shots=1, queries=5, episodes=20)
  for name in fewshot.CLASSIFIERS:
    np.testing.assert_array_equal(acc[name], np.ones(20))


def test_random_features_give_chance_accuracy():
  rng = np.random.default_rng(1)
  features, labels = rng.normal(size=(500, 16)), np.repeat(np.arange(5), 100)
  acc = fewshot.episode_accuracies(
    features, labels, ways=5, shots=5, queries=15, episodes=300, seed=3
  )
  for name in fewshot.CLASSIFIERS:
    summary = fewshot.summarize(acc[name])
    assert abs(summary["mean"] - 0.2) < 3 * summary["ci95"] + 0.01, (name, summary)


def test_episodes_are_a_function_of_the_seed():
  features, labels = clusters(5, 30, 4, spread=3.0)
  run = lambda seed: fewshot.episode_accuracies(
    features, labels, ways=3, shots=2, queries=4, episodes=15, seed=seed
  )
  a, b, c = run(0), run(0), run(1)
  np.testing.assert_array_equal(a["nearest_centroid"], b["nearest_centroid"])
  assert not np.array_equal(a["nearest_centroid"], c["nearest_centroid"])


def test_summary_is_the_mean_and_the_95_percent_half_width():
  values = np.array([0.2, 0.4, 0.6, 0.8])
  got = fewshot.summarize(values)
  assert got["mean"] == pytest.approx(0.5)
  assert got["ci95"] == pytest.approx(1.96 * np.std(values, ddof=1) / 2)


def test_too_few_classes_or_examples_is_one_sentence():
  features, labels = clusters(3, 4, 4, spread=1.0)
  with pytest.raises(ValueError, match="5-way episodes need 5 classes; the features have 3"):
    fewshot.episode_accuracies(features, labels, ways=5, shots=1, queries=2, episodes=1)
  with pytest.raises(ValueError, match="fewer than 6 examples"):
    fewshot.episode_accuracies(features, labels, ways=3, shots=1, queries=5, episodes=1)


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
    [sys.executable, "-m", "mcl_jax.fewshot", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_command_on_a_missing_export_is_one_line_and_exit_2(tmp_path):
  proc = run_cli(f"--export={tmp_path / 'nothing'}")
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
