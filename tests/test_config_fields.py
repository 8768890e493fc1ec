"""Every field of configs/default.py is validated: a generated sweep of bad values.

Each leaf of `default.get_config()` (found by walking it, so a field added later is swept
too) gets bad values of its kind: the wrong type, None, zero, negative, huge, NaN and
infinity for numbers, an unknown string, junk for tuples. Each must make
`config_lib.validate` raise ConfigError with one sentence naming `config.<field>`, or be
on the short allow-list below with the reason it really runs. The values are put into a
config rebuilt from a dict, as a config file may build one: ml_collections' own type lock
(on assignment only) is not what is tested. A few of the cases end to end on the command
line: exit status 2, one `error:` line naming the field, no traceback, no workdir.
"""

from __future__ import annotations

import math
import re
from typing import Any

import ml_collections
import pytest
from test_config import run_cli

from mcl_jax import config_lib
from mcl_jax.configs import default
from mcl_jax.configs import fashion_mnist
from mcl_jax.configs import lincls_r18
from mcl_jax.configs import moco_digits


def _fashion() -> ml_collections.ConfigDict:
  return fashion_mnist.get_config("mcl_x2,smoke")


def _bank() -> ml_collections.ConfigDict:
  c = _fashion()
  c.loss.regime = "bank"
  return c


def _moco() -> ml_collections.ConfigDict:
  return moco_digits.get_config("smoke")


def _lincls() -> ml_collections.ConfigDict:
  c = lincls_r18.get_config("smoke")
  c.lincls.pretrained = "/nonexistent"  # only read when the probe starts
  return c


# The valid config each field's bad values go into, by the field's leading name: the
# regime where the field is read (the fashion_mnist in-batch MCL x2 smoke run otherwise).
BASES = {"moco.": _moco, "ssl.": _moco, "loss.co2_": _moco, "bank.": _bank, "lincls.": _lincls}


def base_config(field: str) -> ml_collections.ConfigDict:
  return next((make for prefix, make in BASES.items() if field.startswith(prefix)), _fashion)()


def bad_values(default_value: Any) -> dict[str, Any]:
  """{kind: value} of values that are wrong for a field with this default, by its type."""
  if isinstance(default_value, bool):
    return {"an int": 1, "a string": "yes", "None": None}
  if isinstance(default_value, int):
    return {
      "a string": "3",
      "a float": 1.5,
      "a bool": True,
      "None": None,
      "zero": 0,
      "negative": -1,
      "huge": 2**40,
    }
  if isinstance(default_value, float):
    return {
      "a string": "0.1",
      "a bool": True,
      "None": None,
      "NaN": math.nan,
      "inf": math.inf,
      "-inf": -math.inf,
      "zero": 0.0,
      "negative": -1.0,
      "huge": 1e300,
    }
  if isinstance(default_value, str):
    return {"an int": 5, "None": None, "an unknown string": "no_such_value"}
  if isinstance(default_value, tuple):
    return {
      "a string": "junk",
      "an int": 5,
      "None": None,
      "string items": ("junk",),
      "float items": (1.5, 2.5),
      "bool items": (True, False),
      "negative items": (-1, 3),
      "huge items": (2**40, 2**41),
    }
  raise AssertionError(
    f"no bad values for a field of type {type(default_value).__name__}; "
    "teach bad_values and config_lib._has_type_of the new type"
  )


_TERM_OFF = "a weight of 0 switches its term off (the ablations)"
_DIVERGES = (
  "no upper limit makes sense here; a loss or LR that overflows stops the run "
  "with exit status 3 and saves no NaN (the divergence guard)"
)
_LONG_RAMP = "a ramp longer than the run is legal: it just never reaches full strength"
_PATH = (
  "a path, read when the run starts: a missing one ends there in one sentence "
  "(tests/test_reliability.py, tests/test_export_lincls.py)"
)

# (field, kind) -> why that value passes validation and runs.
ALLOWED = {
  ("seed", "zero"): "0 is the default seed",
  ("model.num_classes", "zero"): "0 takes the class count from the dataset (default)",
  ("model.shared_stages", "zero"): "0: every member has its own stem (default)",
  ("model.bn_group_size", "zero"): "0: BatchNorm over the whole global batch (default)",
  **{
    (f"loss.{term}_weight", "zero"): _TERM_OFF
    for term in ("vcl", "icl", "soft_vcl", "soft_icl", "logit_kd", "co2")
  },
  ("loss.soft_warmup_epochs", "zero"): "0: the official constant weights (default)",
  ("loss.icl_warmup_epochs", "zero"): "0: the official constant weights (default)",
  ("bank.momentum", "zero"): "0: each bank row becomes the newest embedding",
  ("bank.gather_chunk", "zero"): "0: all candidates gathered at once (default)",
  ("moco.key_momentum", "zero"): "0: the key encoder copies the query encoder each step",
  ("moco.bn_group_size", "zero"): "0: one BN group per device",
  ("ssl.knn_every_epochs", "zero"): "0: the kNN monitor is off",
  ("input.validation_size", "zero"): "0: no validation split held out",
  ("input.train_subset", "zero"): "0: the whole training split",
  ("optim.momentum", "zero"): "0: plain SGD",
  ("optim.weight_decay", "zero"): "0: no weight decay (the linear probe's recipe)",
  ("schedule.warmup_epochs", "zero"): "0: no warm-up (default)",
  ("schedule.num_train_steps", "zero"): "0: train for schedule.epochs (default)",
  ("eval_every_epochs", "zero"): "0: evaluate only at the end",
  **{
    (f"loss.{field}", "huge"): _DIVERGES
    for field in (
      "vcl_weight",
      "icl_weight",
      "soft_vcl_weight",
      "soft_icl_weight",
      "logit_kd_weight",
      "co2_weight",
      "tau",
      "kd_temperature",
      "co2_temperature",
    )
  },
  **{
    (field, "huge"): _DIVERGES
    for field in ("optim.lr", "optim.weight_decay", "schedule.decay_factor")
  },
  ("loss.soft_warmup_epochs", "huge"): _LONG_RAMP,
  ("loss.icl_warmup_epochs", "huge"): _LONG_RAMP,
  ("schedule.warmup_epochs", "huge"): _LONG_RAMP,
  **{
    (field, "an unknown string"): _PATH
    for field in ("input.data_dir", "resume_from", "lincls.pretrained")
  },
}


def with_value(
  config: ml_collections.ConfigDict, field: str, value: Any
) -> ml_collections.ConfigDict:
  """A copy of `config` with `field` set to `value`, whatever its type."""
  tree = config.to_dict()
  *sections, name = field.split(".")
  holder = tree
  for section in sections:
    holder = holder[section]
  holder[name] = value
  return ml_collections.ConfigDict(tree)


DEFAULTS = dict(config_lib.config_leaves(default.get_config()))


@pytest.mark.parametrize("make", [_fashion, _moco, _bank, _lincls], ids=lambda f: f.__name__)
def test_the_base_configs_validate(make):
  config_lib.validate(make(), num_devices=8)


def test_every_bad_value_of_every_field_is_refused_by_name():
  """One test for all fields (one per field would spend most of its time in teardown);
  the failure lists every wrong (field, kind)."""
  wrong = []
  for field, default_value in DEFAULTS.items():
    base = base_config(field)
    for kind, value in bad_values(default_value).items():
      case = f"config.{field}={value!r} ({kind})"
      try:
        config_lib.validate(with_value(base, field, value), num_devices=8)
      except config_lib.ConfigError as e:
        message = str(e)
        if f"config.{field}" not in message or "\n" in message or not message.endswith("."):
          wrong.append(f"{case}: the error is not one sentence naming the field: {message}")
        elif (field, kind) in ALLOWED:
          wrong.append(f"{case} is refused now; drop it from ALLOWED: {message}")
      else:
        if (field, kind) not in ALLOWED:
          wrong.append(f"{case} passes validation")
  assert not wrong, "\n".join(wrong)


def test_the_allow_list_and_the_bounds_name_real_fields():
  kinds = {(field, kind) for field, value in DEFAULTS.items() for kind in bad_values(value)}
  assert set(ALLOWED) <= kinds, set(ALLOWED) - kinds
  bounded = set(config_lib.FIELD_BOUNDS)
  assert bounded <= set(DEFAULTS), bounded - set(DEFAULTS)


def test_moco_fields_are_checked_under_the_moco_trainer():
  c = _moco()
  assert c.trainer == "moco"
  for field, value in (
    ("moco.queue_size", 0),
    ("moco.key_momentum", 1.5),
    ("moco.key_momentum", math.nan),
    ("moco.mlp", 1),
    ("moco.icl_keys", "bank"),
  ):
    with pytest.raises(config_lib.ConfigError, match="^" + re.escape(f"config.{field}=")):
      config_lib.validate(with_value(c, field, value), num_devices=8)


def test_moco_icl_keys_takes_queue_or_batch():
  c = _moco()
  for choice in ("queue", "batch"):
    config_lib.validate(with_value(c, "moco.icl_keys", choice), num_devices=8)
  with pytest.raises(
    config_lib.ConfigError,
    match=re.escape("config.moco.icl_keys='queues' is not one of queue, batch."),
  ):
    config_lib.validate(with_value(c, "moco.icl_keys", "queues"), num_devices=8)


def test_shared_stages_must_leave_each_member_its_own_stages():
  c = _fashion()  # the smoke run's `tiny` has 2 stages, the stem included
  c.model.shared_stages = 2
  with pytest.raises(
    config_lib.ConfigError, match=r"config.model.shared_stages=2 must be less than tiny's 2 stages"
  ):
    config_lib.validate(c)


@pytest.mark.parametrize(
  "override,field",
  [
    ("log_every_steps=0", "config.log_every_steps"),
    ("seed=-1", "config.seed"),
    ("checkpoint.every_epochs=0", "config.checkpoint.every_epochs"),
    ("optim.lr=nan", "config.optim.lr"),
    ("seed=x", "config.seed"),
    ("schedule.boundaries=junk", "config.schedule.boundaries"),
  ],
)
def test_cli_bad_field_is_one_error_line_and_no_workdir(override, field, tmp_path):
  workdir = tmp_path / "run"
  r = run_cli(
    "--config=fashion_mnist:mcl_x2,smoke",
    f"--config.{override}",
    f"--workdir={workdir}",
    tmp_path=tmp_path,
  )
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert r.returncode == 2, r.stderr
  assert len(errors) == 1 and field in errors[0], r.stderr
  assert "Traceback" not in r.stderr, r.stderr
  assert not workdir.exists()
