"""Reproduction suites as data, and where their runs live.

A suite is a module `mcl_jax/suites/<suite>.py` that names the config module its rows train
(`CONFIG`: `mcl_jax/configs/<CONFIG>.py`, whose `get_config(variant)` builds each row's
config), its tables (`TABLES`: table id -> title, in report order) and its rows (`ROWS`: a
list of `Row`). `mcl-reproduce --suite=<suite>` (mcl_jax/reproduce.py) trains every row
over seeds and reports them.

Every (row, seed) trains in its own folder, `run_dir`: rows with the same config (variant
and overrides) share it, so a config shared by two tables trains once. A run is finished
when its `RESULT_FILE` exists (written by `reproduce_eval.train_one`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import dataclasses
import importlib
import json
import os
from typing import Any

RESULT_FILE = "result.json"


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of a results table: a config variant (+ overrides) trained over seeds.

  name: what `--rows` selects it by.
  variant: the argument of the config module's `get_config` (',smoke' is added for
      `--smoke`).
  table: the id (in the suite's `TABLES`) of the table it is a line of.
  overrides: config fields set after `get_config` ('node.field' -> value); a mapping or
      (key, value) pairs, kept sorted by key (the run folder's name lists them in order).
  label: the row's title in the tables and the plot (default: its name).
  fewshot: held-out classes a self-supervised row's members are tested on in few-shot
      episodes (mcl_jax.fewshot); none: no few-shot test.
  """

  name: str
  variant: str
  table: str
  overrides: Mapping[str, Any] | tuple[tuple[str, Any], ...] = ()
  label: str = ""
  fewshot: tuple[int, ...] = ()

  def __post_init__(self):
    pairs = self.overrides.items() if isinstance(self.overrides, Mapping) else self.overrides
    object.__setattr__(self, "overrides", tuple(sorted(pairs, key=lambda kv: kv[0])))
    object.__setattr__(self, "fewshot", tuple(self.fewshot))

  @property
  def title(self) -> str:
    return self.label or self.name

  @property
  def override_pairs(self) -> tuple[tuple[str, Any], ...]:
    """`overrides` as `__post_init__` leaves them: (key, value) pairs sorted by key."""
    assert isinstance(self.overrides, tuple)
    return self.overrides


def load_suite(suite: str) -> tuple[Any, list[Row], dict[str, str]]:
  """(config module, rows, tables) of the suite `mcl_jax/suites/<suite>.py`."""
  try:
    module = importlib.import_module(f"{__name__}.{suite}")
  except ModuleNotFoundError:
    raise ValueError(f"--suite={suite}: there is no mcl_jax/suites/{suite}.py.") from None
  config_module = importlib.import_module(f"mcl_jax.configs.{module.CONFIG}")
  return config_module, list(module.ROWS), dict(module.TABLES)


def select_rows(rows: Sequence[Row], names: Sequence[str]) -> list[Row]:
  """The rows called `names`, in that order (every row when `names` is empty); ValueError
  naming the first unknown one."""
  if not names:
    return list(rows)
  by_name = {r.name: r for r in rows}
  unknown = [n for n in names if n not in by_name]
  if unknown:
    raise ValueError(f"--rows: unknown row {unknown[0]!r}; this suite has {', '.join(by_name)}.")
  return [by_name[n] for n in names]


def row_config(config_module: Any, row: Row, seed: int, smoke: bool, variant: str | None = None):
  """The row's config (or the config module's `variant`, e.g. 'probe') with the row's
  overrides and `seed`; another variant takes only the row's data overrides (`input.*`): a
  probe sees the row's images with its own recipe, not the row's learning rate."""
  config = config_module.get_config((variant or row.variant) + (",smoke" if smoke else ""))
  for key, value in row.override_pairs:
    if variant and not key.startswith("input."):
      continue
    node, *path, field = key.split(".")
    target = config[node]
    for part in path:
      target = target[part]
    target[field] = value
  config.seed = seed
  return config


def run_dir(workdir: str, row: Row, seed: int) -> str:
  """WORKDIR/<variant>[__field=value...]/seed<k>: rows with the same config share a run."""
  name = "__".join([row.variant.replace("+", "-")] + [f"{k}={v}" for k, v in row.override_pairs])
  return os.path.join(workdir, name, f"seed{seed}")


def finished_runs(
  rows: Sequence[Row], seeds: Sequence[int], workdir: str
) -> Iterator[tuple[Row, int, str, dict[str, Any]]]:
  """(row, seed, run directory, its result) of every finished run among rows x seeds."""
  for row in rows:
    for seed in seeds:
      directory = run_dir(workdir, row, seed)
      path = os.path.join(directory, RESULT_FILE)
      if os.path.exists(path):
        with open(path) as f:
          yield row, seed, directory, json.load(f)
