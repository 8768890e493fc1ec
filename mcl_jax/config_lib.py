"""Config validation: every bad field stops start-up with one sentence that names it.

A config is an ml_collections.ConfigDict built by `configs/<experiment>.py:get_config(arg)`
on top of `mcl_jax/configs/default.py`, which declares every field. `validate` runs before any
device work, so a typo or an impossible combination costs seconds, not a pod allocation.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import glob
import math
import numbers
import os
from typing import Any

import ml_collections

from mcl_jax.errors import ConfigError  # noqa: F401 (re-exported: config_lib.ConfigError)

DTYPES = ("float32", "bfloat16")
KD_TARGETS = ("all", "last")
SCHEDULES = ("cosine", "step")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# Shared pieces of the experiment configs, not experiments themselves.
NOT_EXPERIMENTS = ("__init__", "default", "common")


def experiment_names() -> list[str]:
  """The experiment configs in mcl_jax/configs/ (module names, sorted): every file but the
  shared pieces (`default`, `common`, `*_common`)."""
  names = [
    os.path.basename(path)[:-3] for path in sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py")))
  ]
  return [n for n in names if n not in NOT_EXPERIMENTS and not n.endswith("_common")]


def resolve_config_path(value: str) -> str:
  """`--config` value -> the config file it names, keeping any ':ARG'.

  A path that exists is taken as it is (a user's own config file); otherwise the name is
  looked up among the package's configs, with or without a leading `configs/` and the
  `.py`, so `--config=fashion_mnist:mcl_x2` works from any directory and for an installed
  package.
  """
  path, sep, arg = value.partition(":")
  if os.path.exists(path):
    return value
  name = os.path.basename(path)
  name = name if name.endswith(".py") else name + ".py"
  candidate = os.path.join(CONFIG_DIR, name)
  return candidate + sep + arg if os.path.exists(candidate) else value


def default_config() -> ml_collections.ConfigDict:
  from mcl_jax.configs import default

  return default.get_config()


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """The config a checkpoint stored (`to_json_best_effort`), on top of today's defaults:
  fields added since it was written get their defaults, fields since removed are dropped."""
  import json

  def merge(into: ml_collections.ConfigDict, stored: dict) -> None:
    for key, value in stored.items():
      if key not in into:
        continue
      if isinstance(into[key], ml_collections.ConfigDict) and isinstance(value, dict):
        merge(into[key], value)
      else:
        into[key] = tuple(value) if isinstance(into[key], tuple) else value

  config = default_config()
  merge(config, json.loads(text))
  return config


# Fields whose change alters the train state's shapes or what its values mean: a run
# resumed with another value would fail in Orbax, or silently mix two experiments.
STATE_FIELDS = (
  "trainer",
  "model.arch",
  "model.num_classes",
  "model.shared_stages",
  "model.embed_dim",
  "model.head",
  "model.head_norm",
  "cohort.num_members",
  "loss.regime",
  "input.dataset",
  "input.image_size",
  "input.classes",
  "input.rotation_classes",
  "input.train_subset",
  "input.validation_size",
  "bank.dtype",
  "moco.queue_size",
  "moco.mlp",
  "lincls.pretrained",
)


def _comparable(value: Any) -> Any:
  """JSON gives lists where the config has tuples (input.classes)."""
  return tuple(value) if isinstance(value, (list, tuple)) else value


def changed_state_fields(
  stored_config_json: str | None, config: ml_collections.ConfigDict
) -> list[tuple[str, Any, Any]]:
  """(field, stored value, new value) of every STATE_FIELDS entry that differs between the
  config a checkpoint was written with and `config`; [] when nothing is stored."""
  if not stored_config_json:
    return []
  stored = config_from_json(stored_config_json)
  changes = []
  for field in STATE_FIELDS:
    section, _, name = field.rpartition(".")
    old = stored[section][name] if section else stored[name]
    new = config[section][name] if section else config[name]
    if _comparable(old) != _comparable(new):
      changes.append((field, old, new))
  return changes


def _unknown_fields(config: Any, schema: Any, prefix: str = "") -> list[tuple[str, list[str]]]:
  """Dotted names present in `config` but not in `schema`, with the known names beside them."""
  found = []
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in schema:
      found.append((name, sorted(schema.keys())))
    elif isinstance(config[key], ml_collections.ConfigDict):
      if not isinstance(schema[key], ml_collections.ConfigDict):
        found.append((name, sorted(schema.keys())))
      else:
        found.extend(_unknown_fields(config[key], schema[key], name + "."))
  return found


def _choice(value: Any, field: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ConfigError(f"config.{field}={value!r} is not one of {', '.join(choices)}.")


# Without jax_enable_x64, JAX counts steps, sizes and indices in 32-bit integers.
INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Bounds:
  """The valid values of a numeric field, or of each item of a tuple field.

  `low` is inclusive unless `low_open`, `high` inclusive unless `high_open`; an integer
  field without `high` may go up to INT32_MAX. `note` (in parentheses) says what a special
  value means or why the bound is there; it ends the error sentence.
  """

  low: float
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  note: str = ""

  def violation(self, value: float, is_int: bool) -> str | None:
    """'must be ...' when `value` is out of bounds, else None."""
    high = self.high if self.high is not None else (INT32_MAX if is_int else None)
    too_low = value < self.low or (self.low_open and value == self.low)
    too_high = high is not None and (value > high or (self.high_open and value == high))
    if not (too_low or too_high):
      return None
    if self.high is not None:
      phrase = (
        f"must be in {'(' if self.low_open else '['}{self.low}, "
        f"{self.high}{')' if self.high_open else ']'}"
      )
    elif too_high:
      phrase = f"must be at most {high} (JAX counts in 32-bit integers)"
    elif (self.low == 0 and self.low_open) or (is_int and self.low == 1):
      phrase = "must be positive"
    elif self.low == 0:
      phrase = "must be >= 0"
    else:
      phrase = f"must be at least {self.low}"
    return f"{phrase} {self.note}" if self.note else phrase


_POSITIVE = Bounds(0, low_open=True)
_TEMPERATURE = Bounds(0, low_open=True, note="(it divides the logits)")
_TERM_WEIGHT = Bounds(0, note="(0: the term is off)")

# The range of every numeric field of configs/default.py (of each item, for a tuple). The
# type of every field is checked against its default's (`_check_fields`); bools and strings
# need no range, strings with a fixed set of values are checked in `_check_choices`, and
# bounds that depend on other fields are checked in the `_check_*` functions below.
FIELD_BOUNDS: dict[str, Bounds] = {
  "seed": Bounds(
    0,
    2**32 - 1,
    note="(numpy's SeedSequence takes no negative seed, and a JAX PRNG key keeps 32 bits)",
  ),
  "model.num_classes": Bounds(0, note="(0: from the dataset)"),
  "model.shared_stages": Bounds(0, note="(0: nothing shared)"),  # and < the arch's stages
  "model.embed_dim": Bounds(1),
  "cohort.num_members": Bounds(1),
  **dict.fromkeys(
    (
      "loss.vcl_weight",
      "loss.icl_weight",
      "loss.soft_vcl_weight",
      "loss.soft_icl_weight",
      "loss.logit_kd_weight",
      "loss.co2_weight",
    ),
    _TERM_WEIGHT,
  ),
  "loss.tau": _TEMPERATURE,
  "loss.kd_temperature": _TEMPERATURE,
  "loss.co2_temperature": _TEMPERATURE,
  "loss.soft_warmup_epochs": Bounds(0, note="(0: constant weights)"),
  "loss.icl_warmup_epochs": Bounds(0, note="(0: constant weights)"),
  "bank.num_positives": Bounds(1),
  "bank.num_negatives": Bounds(1),
  "bank.momentum": Bounds(0, 1),
  "bank.gather_chunk": Bounds(0, note="(0: all candidates at once)"),
  "model.bn_group_size": Bounds(0, note="(0: the whole global batch)"),
  "moco.queue_size": Bounds(1),
  "moco.key_momentum": Bounds(0, 1),
  "moco.bn_group_size": Bounds(0, note="(0: one group per device)"),
  "ssl.knn_every_epochs": Bounds(0, note="(0: off)"),
  "input.validation_size": Bounds(0, note="(0: none)"),
  "input.train_subset": Bounds(0, note="(0: the whole training split)"),
  "input.classes": Bounds(0, note="(class ids)"),
  "input.global_batch_size": Bounds(1),
  "input.samples_per_class": Bounds(0, note="(0: plain shuffled batches)"),
  "input.image_size": Bounds(1),
  "input.eval_batch_size": Bounds(1),
  "input.synthetic_train_size": Bounds(1),
  "input.synthetic_eval_size": Bounds(1),
  "input.synthetic_num_classes": Bounds(2, note="(a classifier needs two classes)"),
  "optim.lr": _POSITIVE,
  "optim.momentum": Bounds(0, 1, high_open=True),
  "optim.weight_decay": Bounds(0),
  "schedule.epochs": Bounds(1),
  "schedule.boundaries": Bounds(0, note="(epochs)"),
  "schedule.decay_factor": _POSITIVE,
  "schedule.warmup_epochs": Bounds(0, note="(0: off)"),
  "schedule.num_train_steps": Bounds(0, note="(0: schedule.epochs)"),
  "checkpoint.every_epochs": Bounds(1, note="(the end of the run is always saved)"),
  "checkpoint.keep": Bounds(1),
  "log_every_steps": Bounds(1),
  "eval_every_epochs": Bounds(0, note="(0: only at the end)"),
}


def config_leaves(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted name, value) of every field that is not itself a ConfigDict, depth first."""
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from config_leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# What a field of each default's type must hold: (one value, several values).
_TYPE_NAMES = {
  bool: ("True or False", "True/False values"),
  int: ("an integer", "integers"),
  float: ("a finite number", "finite numbers"),
  str: ("a string", "strings"),
}


def _has_type_of(value: Any, default: Any) -> bool:
  """Whether `value` has the type of the field's default `default`.

  ml_collections locks a field's type only on assignment, and lets None, a bool for an
  int and an int for a float through (and anything into a config built from a dict), so
  this is checked here. A float field takes an int, but no NaN or infinity; every tuple
  field holds integers unless its default says otherwise.
  """
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return _is_int(value)
  if isinstance(default, float):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
  if isinstance(default, str):
    return isinstance(value, str)
  if isinstance(default, tuple):
    item = default[0] if default else 0
    return isinstance(value, (tuple, list)) and all(_has_type_of(v, item) for v in value)
  return True


def _type_wanted(default: Any) -> str:
  """'an integer', 'a tuple of integers, e.g. (150, 225)', ...: what `_has_type_of` wants."""
  if isinstance(default, tuple):
    item = default[0] if default else 0
    return f"a tuple of {_TYPE_NAMES[type(item)][1]}, e.g. {default or (0, 1)}"
  return _TYPE_NAMES[type(default)][0]


def _check_fields(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict) -> None:
  """Every field of `schema` present in `config` has its default's type and its bounds."""
  for field, default in config_leaves(schema):
    section, _, name = field.rpartition(".")
    holder = config
    for key in section.split(".") if section else ():
      holder = holder.get(key) if isinstance(holder, ml_collections.ConfigDict) else None
    if not isinstance(holder, ml_collections.ConfigDict) or name not in holder:
      continue  # absent here: nothing to check
    value = holder[name]
    if not _has_type_of(value, default):
      raise ConfigError(f"config.{field}={value!r} must be {_type_wanted(default)}.")
    if isinstance(default, tuple):
      items, is_int = value, all(_is_int(v) for v in value)
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
      items, is_int = (value,), isinstance(default, int)
    else:
      continue  # bools and strings: the type is all (choices: `_check_choices`)
    # A number without bounds of its own must still fit JAX's int32 when it is an integer.
    bounds = FIELD_BOUNDS.get(field) or (Bounds(-INT32_MAX - 1) if is_int else None)
    if bounds is None:
      continue  # a float without bounds of its own: any value
    for item in items:
      wrong = bounds.violation(item, is_int)
      if wrong:
        where = ": each item " if isinstance(default, tuple) else " "
        raise ConfigError(f"config.{field}={value!r}{where}{wrong}.")


def mcl_terms_on(config: ml_collections.ConfigDict) -> bool:
  loss = config.loss
  weights = [loss.icl_weight, loss.soft_vcl_weight, loss.soft_icl_weight, loss.logit_kd_weight]
  # Self-supervised, VCL of one network is MoCo's InfoNCE or SimCLR's NT-Xent, so only the
  # other terms need peers (a single-network baseline keeps vcl_weight = 1).
  from mcl_jax import regimes

  if not regimes.self_supervised(config.trainer):
    weights.append(loss.vcl_weight)
  return any(w != 0 for w in weights)


def check_workdir(workdir: str) -> None:
  """The workdir must be a directory this process can create or write into.

  Nothing is created or written here: a run that stops at start-up for another reason
  leaves no trace. A path under an existing file, or an existing file, is refused.
  """
  if not workdir:
    raise ConfigError("--workdir is empty; pass a directory for checkpoints and logs.")
  if "://" in workdir:  # gs:// and other remote stores are checked by the first save.
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(
      f"--workdir={workdir} is a file, not a directory; choose a directory "
      "for checkpoints and logs."
    )
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    reason = "is not a directory" if not os.path.isdir(parent) else "is not writable"
    raise ConfigError(
      f"--workdir={workdir} is not writable ({parent} {reason}); choose a "
      "directory you can write to."
    )


def validate(
  config: ml_collections.ConfigDict, *, num_devices: int | None = None, workdir: str | None = None
) -> None:
  """Raises ConfigError naming the first bad field; returns None when the config can run.

  Every check that needs only the config (and the device count and workdir) lives here and
  runs once, before any data is read or device touched (`mcl_jax.jobs.build`). Checks that
  need the data (a batch larger than the dataset, a probe on a dataset of another channel
  count) are made where the data is first read, with the same one-sentence errors.
  """
  schema = default_config()
  unknown = _unknown_fields(config, schema)
  if unknown:
    name, known = unknown[0]
    raise ConfigError(f"Unknown config field '{name}'; known fields here: {', '.join(known)}.")
  _check_fields(config, schema)
  _check_choices(config)
  _check_model(config)
  _check_loss(config)
  _check_input(config, num_devices)
  _check_trainer(config)
  if workdir is not None:
    check_workdir(workdir)


def _check_choices(config: ml_collections.ConfigDict) -> None:
  from mcl_jax import losses  # Imported here: the registries pull in JAX and Flax.
  from mcl_jax import memory_bank
  from mcl_jax import models
  from mcl_jax import regimes
  from mcl_jax.data import sources
  from mcl_jax.data import views

  try:
    regime = regimes.get(config.trainer)
  except ValueError as e:
    raise ConfigError(f"config.trainer={config.trainer!r}: {e}") from None
  if config.loss.regime not in regime.loss_regimes:
    expected = " or ".join(f"'{r}'" for r in regime.loss_regimes)
    raise ConfigError(
      f"config.trainer={config.trainer!r} does not train config.loss.regime="
      f"{config.loss.regime!r}; use loss.regime {expected} with this trainer."
    )
  _choice(config.model.strategy, "model.strategy", ("auto",) + models.STRATEGIES)
  _choice(config.model.dtype, "model.dtype", DTYPES)
  _choice(config.bank.layout, "bank.layout", memory_bank.LAYOUTS)
  _choice(config.bank.dtype, "bank.dtype", memory_bank.DTYPES)
  _choice(config.model.head, "model.head", models.HEADS)
  _choice(config.model.head_norm, "model.head_norm", models.HEAD_NORMS)
  _choice(config.loss.logit_kd_targets, "loss.logit_kd_targets", KD_TARGETS)
  _choice(config.schedule.kind, "schedule.kind", SCHEDULES)
  _choice(config.input.dataset, "input.dataset", sources.DATASETS)
  _choice(config.ssl.views, "ssl.views", tuple(views.VIEW_SPECS))
  _choice(config.moco.icl_keys, "moco.icl_keys", losses.ICL_KEYS)
  if config.model.arch not in models.ARCHS:
    raise ConfigError(
      f"Unknown architecture config.model.arch={config.model.arch!r}; "
      f"choose one of {', '.join(sorted(models.ARCHS))}."
    )


def _check_model(config: ml_collections.ConfigDict) -> None:
  from mcl_jax import models

  members = config.cohort.num_members
  if members < 2 and mcl_terms_on(config):
    raise ConfigError(
      f"config.cohort.num_members={members} but MCL needs a cohort of at least 2; set "
      "num_members >= 2 or every loss weight (vcl/icl/soft_vcl/soft_icl/logit_kd) to 0."
    )
  arch, shared = config.model.arch, config.model.shared_stages
  stages = models.create(arch, max(1, config.model.num_classes)).num_stages
  if shared >= stages:
    raise ConfigError(
      f"config.model.shared_stages={shared} must be less than {arch}'s "
      f"{stages} stages (stem included), so each member keeps its own."
    )


def _check_loss(config: ml_collections.ConfigDict) -> None:
  from mcl_jax import regimes

  loss = config.loss
  if loss.co2_weight and not regimes.get(config.trainer).supports_co2:
    co2 = [r.name for r in regimes.all_regimes() if r.supports_co2]
    raise ConfigError(
      f"config.loss.co2_weight={loss.co2_weight}: CO2 regularises MoCo's "
      f"queue similarities; use it with the {' or '.join(co2)} trainer or set "
      "it to 0."
    )


def _check_input(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
  from mcl_jax.data import sources

  batch = config.input.global_batch_size
  if num_devices is not None and batch % num_devices:
    raise ConfigError(
      f"config.input.global_batch_size={batch} is not divisible by the {num_devices} "
      f"devices; use a multiple of {num_devices}."
    )
  from mcl_jax import regimes

  per_class = config.input.samples_per_class
  if per_class > 0 and batch % per_class:
    raise ConfigError(
      f"config.input.global_batch_size={batch} is not divisible by "
      f"config.input.samples_per_class={per_class}."
    )
  class_aware = regimes.get(config.trainer).class_aware_batches
  if per_class and (not class_aware or config.input.dataset in sources.STREAMING):
    where = (
      f"{config.input.dataset} streams plain shuffles"
      if class_aware
      else f"the {config.trainer} trainer uses plain shuffled batches"
    )
    raise ConfigError(f"config.input.samples_per_class={per_class}: {where}; set it to 0.")
  classes = tuple(config.input.classes)
  if classes and (len(set(classes)) != len(classes) or len(classes) < 2):
    raise ConfigError(
      f"config.input.classes={classes} must name at least 2 distinct "
      "non-negative class ids (or be empty: every class)."
    )
  if classes and config.input.dataset in sources.STREAMING:
    raise ConfigError(
      f"config.input.classes selects classes of in-memory datasets; "
      f"{config.input.dataset} streams every class."
    )
  if config.input.rotation_classes and config.input.dataset in sources.STREAMING:
    raise ConfigError(
      "config.input.rotation_classes builds a task from in-memory datasets; "
      f"{config.input.dataset} is streamed."
    )


def _check_trainer(config: ml_collections.ConfigDict) -> None:
  """The regime's own checks (`Regime.check`)."""
  from mcl_jax import regimes

  regimes.get(config.trainer).check(config)
