"""Config validation: every bad field stops start-up with one sentence that names it.

A config is an ml_collections.ConfigDict built by `configs/<experiment>.py:get_config(arg)`
on top of `configs/default.py`, which declares every field. `validate` runs before any
device work, so a typo or an impossible combination costs seconds, not a pod allocation.
"""
from __future__ import annotations

import glob
import os
import sys
import uuid
from typing import Any

import ml_collections

TRAINERS = ("supervised", "moco", "lincls")
REGIMES = ("batch", "bank", "moco")
STRATEGIES = ("auto", "vmap", "unroll", "map")
DTYPES = ("float32", "bfloat16")
HEAD_NORMS = ("none", "batchnorm")
KD_TARGETS = ("all", "last")
SCHEDULES = ("cosine", "step")
MOCO_VIEWS = ("v1", "v2", "digits", "fashion_mnist")
DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "imagenet2012", "image_folder",
            "synthetic")


class ConfigError(ValueError):
  """A config value that cannot work; the message is one sentence for a person."""


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_configs_importable() -> None:
  """configs/ sits at the repository root next to mcl_jax/; experiment configs import
  `configs.default`, so the root must be importable wherever the command runs from."""
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def experiment_names() -> list[str]:
  """The experiment configs in configs/ (module names, sorted): every file but the shared
  pieces (`default`, `*_common`)."""
  names = [os.path.basename(path)[:-3]
           for path in sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "*.py")))]
  return [n for n in names if n not in ("__init__", "default") and not n.endswith("_common")]


def default_config() -> ml_collections.ConfigDict:
  ensure_configs_importable()
  from configs import default
  return default.get_config()


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


def mcl_terms_on(config: ml_collections.ConfigDict) -> bool:
  loss = config.loss
  weights = [loss.icl_weight, loss.soft_vcl_weight, loss.soft_icl_weight, loss.logit_kd_weight]
  # Under MoCo, VCL of one network is MoCo's own InfoNCE loss, so only the other terms need
  # peers (a single-network MoCo baseline keeps vcl_weight = 1).
  if config.trainer != "moco":
    weights.append(loss.vcl_weight)
  return any(w != 0 for w in weights)


def check_workdir(workdir: str) -> None:
  """The workdir must be creatable and writable (checked by writing a probe file)."""
  if not workdir:
    raise ConfigError("--workdir is empty; pass a directory for checkpoints and logs.")
  if "://" in workdir:  # gs:// and other remote stores are checked by the first save.
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{uuid.uuid4().hex}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(
        f"--workdir={workdir} is not writable ({e.strerror}); choose a directory you can "
        "write to.") from None


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             workdir: str | None = None) -> None:
  """Raises ConfigError naming the first bad field; returns None when the config can run."""
  unknown = _unknown_fields(config, default_config())
  if unknown:
    name, known = unknown[0]
    raise ConfigError(f"Unknown config field '{name}'; known fields here: {', '.join(known)}.")

  _choice(config.trainer, "trainer", TRAINERS)
  _choice(config.loss.regime, "loss.regime", REGIMES)
  _choice(config.model.strategy, "model.strategy", STRATEGIES)
  _choice(config.model.dtype, "model.dtype", DTYPES)
  _choice(config.model.head_norm, "model.head_norm", HEAD_NORMS)
  _choice(config.loss.logit_kd_targets, "loss.logit_kd_targets", KD_TARGETS)
  _choice(config.schedule.kind, "schedule.kind", SCHEDULES)
  _choice(config.input.dataset, "input.dataset", DATASETS)

  from mcl_jax import models  # Imported here: the registry pulls in Flax.
  if config.model.arch not in models.ARCHS:
    raise ConfigError(f"Unknown architecture config.model.arch={config.model.arch!r}; "
                      f"choose one of {', '.join(sorted(models.ARCHS))}.")

  members = config.cohort.num_members
  if members < 1:
    raise ConfigError(f"config.cohort.num_members={members} must be at least 1.")
  if members < 2 and mcl_terms_on(config):
    raise ConfigError(
        f"config.cohort.num_members={members} but MCL needs a cohort of at least 2; set "
        "num_members >= 2 or every loss weight (vcl/icl/soft_vcl/soft_icl/logit_kd) to 0.")
  if config.model.shared_stages < 0:
    raise ConfigError(f"config.model.shared_stages={config.model.shared_stages} must be >= 0.")
  if config.loss.tau <= 0 or config.loss.kd_temperature <= 0:
    raise ConfigError("config.loss.tau and config.loss.kd_temperature must be positive.")

  batch = config.input.global_batch_size
  if batch < 1:
    raise ConfigError(f"config.input.global_batch_size={batch} must be positive.")
  if num_devices is not None and batch % num_devices:
    raise ConfigError(
        f"config.input.global_batch_size={batch} is not divisible by the {num_devices} "
        f"devices; use a multiple of {num_devices}.")
  per_class = config.input.samples_per_class
  if config.trainer == "supervised" and config.loss.regime == "batch" and mcl_terms_on(config):
    if per_class < 2:
      raise ConfigError(
          f"config.input.samples_per_class={per_class}: in-batch MCL needs class-aware "
          "batches with at least 2 samples per class so every row has a positive.")
  if per_class > 0 and batch % per_class:
    raise ConfigError(
        f"config.input.global_batch_size={batch} is not divisible by "
        f"config.input.samples_per_class={per_class}.")
  _choice(config.moco.views, "moco.views", MOCO_VIEWS)
  if config.trainer == "moco" and config.moco.queue_size % batch:
    raise ConfigError(
        f"config.moco.queue_size={config.moco.queue_size} is not divisible by the global "
        f"batch {batch}; the FIFO queue takes whole batches.")
  if config.loss.regime == "bank" and config.bank.num_negatives < 1:
    raise ConfigError("config.bank.num_negatives must be at least 1 for the memory bank.")
  if config.schedule.epochs < 1:
    raise ConfigError(f"config.schedule.epochs={config.schedule.epochs} must be positive.")
  if config.loss.soft_warmup_epochs < 0:
    raise ConfigError(
        f"config.loss.soft_warmup_epochs={config.loss.soft_warmup_epochs} must be >= 0 (0: off).")
  if config.schedule.warmup_epochs < 0:
    raise ConfigError(
        f"config.schedule.warmup_epochs={config.schedule.warmup_epochs} must be >= 0 (0: off).")
  if config.input.validation_size < 0 or config.input.train_subset < 0:
    raise ConfigError("config.input.validation_size and config.input.train_subset must be "
                      ">= 0 (0: none / the whole training split).")
  if config.trainer == "lincls" and not config.lincls.pretrained:
    raise ConfigError("config.lincls.pretrained is empty; pass the export directory, e.g. "
                      "--config.lincls.pretrained=DIR.")
  if workdir is not None:
    check_workdir(workdir)
