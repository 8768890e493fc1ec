"""What every experiment config shares: the argument grammar and the smoke recipe.

Argument grammar (the part after ':' in `--config=NAME:ARG`), for every config:
  'variant[,smoke]'   one variant of the experiment (the config lists them), optionally
                      followed by ',smoke'; an empty ARG is the config's default variant.
`smoke` shrinks any config to a few steps on a CPU in seconds: synthetic data (real data
for the small in-memory datasets the config already uses), small batches, a log line per
step; a test runs every config that way (tests/test_config_smoke.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ml_collections

# Datasets small enough to smoke-run on their real data.
REAL_SMOKE_DATASETS = ("digits", "fashion_mnist")


def parse_arg(
  arg: str | None, variants: Sequence[str] | Callable[[str], bool] = (), default: str = ""
) -> tuple[str, bool]:
  """(variant, smoke) of 'variant[,smoke]'.

  `variants` lists the accepted variant names, or is a predicate for generated names (e.g.
  the loss terms of an ablation); an absent variant is `default`. Anything else raises
  ValueError with one sentence listing what is accepted.
  """
  parts = [p for p in (arg or "").split(",") if p]
  smoke = "smoke" in parts
  rest = [p for p in parts if p != "smoke"]
  variant = rest[0] if rest else default
  accepts = variants if callable(variants) else (lambda v: v in variants)
  if len(rest) > 1 or not accepts(variant):
    listed = "" if callable(variants) else f"one of {', '.join(variants)}, "
    raise ValueError(f"config argument {arg!r}: expected {listed}optionally followed by ',smoke'.")
  return variant, smoke


def smoke(
  c: ml_collections.ConfigDict,
  *,
  arch: str | None = None,
  image_size: int | None = None,
  num_classes: int = 10,
) -> ml_collections.ConfigDict:
  """The config shrunk to 3 steps: the same code path in seconds on a CPU.

  Synthetic images (64 train, 24 eval, `num_classes` classes) unless the dataset is small
  and real (REAL_SMOKE_DATASETS: 256 training images then); batches of 16; a 16-negative
  bank, a 64-key queue and the kNN monitor on; `arch` and `image_size` replace the
  config's when given.
  """
  if arch:
    c.model.arch = arch
  if c.input.dataset in REAL_SMOKE_DATASETS:
    if c.input.validation_size:
      c.input.validation_size = 100
    c.input.train_subset = 256 if c.input.dataset == "fashion_mnist" else 0
  else:
    c.input.dataset = "synthetic"
    c.input.synthetic_train_size = 64
    c.input.synthetic_eval_size = 24
    c.input.synthetic_num_classes = num_classes
    c.model.num_classes = 0  # the synthetic set's
    c.input.global_batch_size = 16
    c.input.eval_batch_size = 16
  if image_size:
    c.input.image_size = image_size
  c.bank.num_negatives = 16
  if c.trainer == "moco":
    c.input.global_batch_size = 16
    c.moco.queue_size = 64
    c.ssl.knn_every_epochs = 1
  c.schedule.epochs = 2
  c.schedule.num_train_steps = 3
  c.log_every_steps = 1
  return c
