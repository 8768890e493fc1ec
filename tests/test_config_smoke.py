"""Every experiment config runs end to end in its `smoke` mode (a few steps, then eval).

A config that validates can still fail at run time (a shape its architecture does not
accept, a shared trunk that does not split the network, a bank that does not fit its
sampler); this runs each one through the same entry point as the CLI. `lincls_r18` needs
an exported member and is run from one in tests/test_export_lincls.py.
"""

import importlib
import os

import numpy as np
import pytest

from mcl_jax import config_lib
from mcl_jax import jobs

NEEDS_AN_EXPORTED_MEMBER = ("lincls_r18",)
# A smoke run costs 30-75 s on this CPU, almost all of it compiling the cohort's train step
# (measured: resnet56 x2 50 s, resnet18 x4 with the bank 73 s, resnet34 x4 19 GB of memory),
# and the default suite must stay a few minutes. So each architecture family is smoke-run
# as written once (cifar100_resnet32, cifar100_wrn_16_2, cifar100_shufflenetv2_05x, digits,
# cifar100_ablation for a shared trunk, imagenet_r18_x3 for the bank); the other configs
# run with a small network of the same layout, the rest of the config as written (the
# architectures themselves are tested in test_models*.py and test_convert.py). With
# --runslow (`make test-all`) every config also runs as written.
LIGHT_STAND_IN = {
  "cifar100_resnet56": "tiny",
  "cifar100_resnet110": "tiny",
  "cifar100_wrn_40_2": "tiny",
  "cifar100_wrn_28_4": "tiny",
  "cifar100_shufflenetv2_1x": "tiny",
  "cifar100_hcgnet_a1": "tiny",
  "cifar100_hcgnet_a2": "tiny",
  "cifar100_cohort_size": "tiny",
  "imagenet_r18_baseline": "tiny_imagenet",
  "imagenet_r18_x2": "tiny_imagenet",
  "imagenet_r18_x4": "tiny_imagenet",
  "imagenet_r34_x2": "tiny_imagenet",
  "imagenet_r34_x4": "tiny_imagenet",
}


def experiment_configs():
  names = []
  for name in config_lib.experiment_names():
    if name in NEEDS_AN_EXPORTED_MEMBER:
      continue
    names.append(name)
    if name in LIGHT_STAND_IN:
      names.append(pytest.param(name + ":as_written", marks=pytest.mark.slow))
  return names


@pytest.mark.parametrize("name", experiment_configs())
def test_smoke_run(name, tmp_path):
  name, _, as_written = name.partition(":")
  config = importlib.import_module(f"mcl_jax.configs.{name}").get_config("smoke")
  if name in LIGHT_STAND_IN and not as_written:
    config.model.arch = LIGHT_STAND_IN[name]
  config_lib.validate(config, num_devices=8, workdir=str(tmp_path))
  result = jobs.run(config, str(tmp_path))
  members = config.cohort.num_members
  for key, value in result["train"].items():
    assert np.all(np.isfinite(value)), f"train metric {key} = {value}"
  if config.trainer == "supervised":
    top1 = np.asarray(result["eval"]["test"]["top1"])
    assert top1.shape == (members + 1,)  # every member and the ensemble
    assert np.all((0 <= top1) & (top1 <= 1))
  assert os.listdir(tmp_path / "checkpoints"), "no checkpoint written"
