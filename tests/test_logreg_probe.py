"""The logistic-regression probe: C chosen on validation, blind to the features' scale."""

import numpy as np
import pytest

from mcl_jax import logreg_probe


def split(num_classes, per_class, dim, spread, seed):
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(0).normal(size=(num_classes, dim)) * 2
  labels = np.repeat(np.arange(num_classes), per_class)
  return centres[labels] + spread * rng.normal(size=(labels.size, dim)), labels


def test_separable_features_are_classified_perfectly():
  train, val, test = (split(4, 30, 8, 0.05, seed) for seed in (1, 2, 3))
  result = logreg_probe.fit(train, val, test)
  assert result["test"]["top1"] == 1.0 and result["validation"]["top1"] == 1.0
  assert result["c"] in logreg_probe.C_GRID


def test_the_chosen_c_is_the_best_on_validation():
  train, val, test = (split(5, 40, 16, 2.5, seed) for seed in (1, 2, 3))
  result = logreg_probe.fit(train, val, test)
  per_c = result["validation"]["top1_per_c"]
  assert len(per_c) == len(logreg_probe.C_GRID)
  assert result["validation"]["top1"] == max(per_c)
  assert result["c"] == logreg_probe.C_GRID[int(np.argmax(per_c))]  # ties: the smallest C
  assert 0.2 < result["test"]["top1"] < 1.0  # overlapping clusters: above chance, not perfect


def test_the_scale_of_the_features_does_not_matter():
  # The reason for this probe: a fixed-lr SGD probe diverges on large features.
  train, val, test = (split(5, 40, 16, 2.5, seed) for seed in (1, 2, 3))
  scaled = [(1000.0 * x + 50.0, y) for x, y in (train, val, test)]
  a, b = logreg_probe.fit(train, val, test), logreg_probe.fit(*scaled)
  assert a["c"] == b["c"] and a["test"]["top1"] == pytest.approx(b["test"]["top1"], abs=0.01)


def test_a_constant_feature_is_harmless():
  train, val, test = (split(3, 20, 4, 0.1, seed) for seed in (1, 2, 3))
  with_constant = [(np.concatenate([x, np.ones((len(x), 1))], 1), y) for x, y in (train, val, test)]
  result = logreg_probe.fit(*with_constant, cs=(1.0,))
  assert result["test"]["top1"] == 1.0


def test_bad_input_is_one_sentence(tmp_path):
  train = split(3, 5, 4, 0.1, 1)
  with pytest.raises(ValueError, match="the C grid is empty"):
    logreg_probe.fit(train, train, train, cs=())
  with pytest.raises(ValueError, match="chooses C on a validation split"):
    logreg_probe.evaluate(str(tmp_path), validation_size=0)
