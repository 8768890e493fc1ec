"""The regime registry: what the rest of the package asks of a training regime.

A regime is one module (`mcl_jax.supervised`, `mcl_jax.moco`, `mcl_jax.simclr`,
`mcl_jax.lincls`) that declares a module-level `REGIME = regimes.Regime(...)` next to its
`build_task(setup)`. The job runner, config validation, export, plots, the planner and the
reproduction runner ask this registry (`get(config.trainer)`, `names()`) instead of
spelling a regime's name, so adding a regime is writing its module, adding it to
`MODULES`, and its test (docs/DESIGN.md, "How to add a regime"); a regime kept outside the
package is named by its module path (`get`).

`config.trainer` names the regime. `config.loss.regime` chooses among the contrastive
candidate sets a regime's step trains (`Regime.loss_regimes`): the supervised step takes
its candidates from the batch ('batch') or from a memory bank ('bank') with the same
model, state and evaluation, so the two are one module with two loss regimes rather than
two near-copies. Regimes with one candidate set leave it at their only value.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import importlib
from typing import Any

# The regime modules, in the order `names()` lists them. Each defines REGIME and
# build_task(setup, **options) -> a `loop.Task`.
MODULES = ("mcl_jax.supervised", "mcl_jax.moco", "mcl_jax.simclr", "mcl_jax.lincls")


def _no_checks(config: Any) -> None:
  del config


def _no_note(meta: dict[str, Any]) -> str:
  del meta
  return ""


@dataclasses.dataclass(frozen=True)
class Regime:
  """One regime's answers to what the rest of the package asks (module docstring).

  name: the value of `config.trainer`.
  module: the module whose `build_task(setup, **options)` builds its `loop.Task`.
  loss_regimes: the values of `config.loss.regime` it trains.
  self_supervised: trains without labels; its own-network VCL is the regime's InfoNCE, so
      a single-network baseline keeps vcl_weight at 1 without being MCL; its members are
      judged after training by a linear probe on frozen features, during it by kNN.
  two_views: its batches carry two views of every image (the source is built for them).
  class_aware_batches: may sample `input.samples_per_class` examples of each class.
  supports_co2: trains the CO2 consistency term (`loss.co2_weight`).
  exportable: its members are cohort networks `mcl-export` can write one by one.
  eval_metric: what `Task.evaluate` measures, for tables and plots: 'top1' (each member's
      and the ensemble's classifier) or 'knn_top1' (each member's frozen features).
  check: the regime's own config checks (raise ConfigError), run by config_lib.validate.
  contrastive_candidates: config -> how many candidates a member's own contrastive loss
      ranks its positive among (its chance loss is the log of that): the collapse signal.
  export_note: checkpoint meta -> what an exported member's `fc` layer is, in words.
  """

  name: str
  module: str
  loss_regimes: tuple[str, ...]
  self_supervised: bool = False
  two_views: bool = False
  class_aware_batches: bool = False
  supports_co2: bool = False
  exportable: bool = True
  eval_metric: str = "top1"
  check: Callable[[Any], None] = _no_checks
  contrastive_candidates: Callable[[Any], int] | None = None
  export_note: Callable[[dict[str, Any]], str] = _no_note

  def build_task(self, setup: Any, **options: Any) -> Any:
    """The regime's `loop.Task` for a prepared `loop.Setup`."""
    return importlib.import_module(self.module).build_task(setup, **options)


def all_regimes() -> tuple[Regime, ...]:
  """Every registered regime, in `MODULES` order (imports their modules)."""
  return tuple(importlib.import_module(m).REGIME for m in MODULES)


def names() -> tuple[str, ...]:
  """The values `config.trainer` may take."""
  return tuple(r.name for r in all_regimes())


def get(name: str) -> Regime:
  """The regime `config.trainer == name` trains; ValueError for an unknown name.

  A name that is not one of `names()` but a dotted module path (`my_project.my_regime`)
  is a regime outside the package: that module is imported and its REGIME returned, so a
  project adds its own regime without editing this one (its REGIME.name must be the path).
  """
  for regime in all_regimes():
    if regime.name == name:
      return regime
  if "." in name:
    try:
      module = importlib.import_module(name)
    except ImportError as e:
      raise ValueError(
        f"Unknown regime {name!r}: it is not one of {', '.join(names())}, "
        f"and importing it as a module failed ({e})."
      ) from None
    declared = getattr(module, "REGIME", None)
    if not isinstance(declared, Regime) or declared.name != name:
      raise ValueError(
        f"Module {name} declares no REGIME = regimes.Regime(name={name!r}, "
        "...); a regime module must."
      )
    return declared
  raise ValueError(
    f"Unknown regime {name!r}; the registered ones are {', '.join(names())} "
    "(or give the dotted path of a module that declares REGIME)."
  )


def self_supervised(name: str) -> bool:
  return get(name).self_supervised
