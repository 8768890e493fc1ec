"""Config validation and the CLI: bad input gets one clear sentence and exit status 2."""

import os
import subprocess
import sys

import pytest

from mcl_jax import config_lib
from mcl_jax.configs import cifar100_ablation
from mcl_jax.configs import cifar100_cohort_size
from mcl_jax.configs import cifar100_resnet32
from mcl_jax.configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config():
  return cifar100_resnet32.get_config("mcl_x2,smoke")


def assert_error(config, match, **kw):
  with pytest.raises(config_lib.ConfigError, match=match) as info:
    config_lib.validate(config, **kw)
  message = str(info.value)
  assert "\n" not in message and message.endswith("."), message


def test_default_and_smoke_configs_validate(tmp_path):
  config_lib.validate(smoke_config(), num_devices=8, workdir=str(tmp_path))


def test_unknown_architecture():
  c = smoke_config()
  c.model.arch = "resnet33"
  assert_error(c, r"Unknown architecture config.model.arch='resnet33'; choose one of .*resnet32")


def test_cohort_of_one_with_mcl_terms_on():
  c = smoke_config()
  c.cohort.num_members = 1
  assert_error(c, r"num_members=1 but MCL needs a cohort of at least 2")


def test_cohort_of_one_without_mcl_terms_is_fine():
  c = cifar100_resnet32.get_config("baseline,smoke")
  c.cohort.num_members = 1
  config_lib.validate(c, num_devices=8)


def test_batch_not_divisible_by_devices():
  c = smoke_config()
  c.input.global_batch_size = 12
  c.input.samples_per_class = 2
  assert_error(c, r"global_batch_size=12 is not divisible by the 8 devices", num_devices=8)


def test_batch_not_divisible_by_samples_per_class():
  c = smoke_config()
  c.input.global_batch_size = 16
  c.input.samples_per_class = 3
  assert_error(c, r"global_batch_size=16 is not divisible by config.input.samples_per_class=3")


def test_in_batch_mcl_needs_class_aware_batches():
  c = smoke_config()
  c.input.samples_per_class = 0
  assert_error(c, r"samples_per_class=0: in-batch MCL needs class-aware batches")


def test_queue_not_divisible_by_global_batch():
  c = smoke_config()
  c.trainer = "moco"
  c.loss.regime = "moco"
  c.input.samples_per_class = 0
  c.moco.queue_size = 100
  assert_error(c, r"queue_size=100 is not a positive multiple of the global batch 16")


@pytest.mark.parametrize(
  "trainer,regime", [("supervised", "moco"), ("moco", "batch"), ("moco", "bank")]
)
def test_trainer_and_regime_must_match(trainer, regime):
  c = smoke_config()
  c.trainer, c.loss.regime = trainer, regime
  c.input.samples_per_class = 0 if trainer == "moco" else 2
  assert_error(c, rf"config.trainer='{trainer}' does not train config.loss.regime='{regime}'")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_workdir_not_writable_as_user(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir(mode=0o500)
  assert_error(smoke_config(), r"--workdir=.* is not writable", workdir=str(locked / "run"))


def test_workdir_not_writable(tmp_path):
  # Works as root too: a path under a regular file can never be created.
  blocker = tmp_path / "file"
  blocker.write_text("x")
  assert_error(
    smoke_config(), r"--workdir=.*file/run is not writable", workdir=str(blocker / "run")
  )


def test_unknown_config_field():
  c = smoke_config()
  with c.unlocked():
    c.optim.lrr = 0.05
  assert_error(c, r"Unknown config field 'optim.lrr'; known fields here: lr, momentum")


def test_bad_choice_names_the_field():
  c = smoke_config()
  c.loss.logit_kd_targets = "first"
  assert_error(c, r"config.loss.logit_kd_targets='first' is not one of all, last")


def all_config_args():
  """(file, arg) for every experiment config's smoke variant(s)."""
  return config_lib.experiment_names()


@pytest.mark.parametrize("name", all_config_args())
def test_every_config_loads_and_validates(name):
  import importlib

  module = importlib.import_module(f"mcl_jax.configs.{name}")
  doc = module.__doc__ or ""
  assert "mcl-train --config=" in doc or "python -m mcl_jax." in doc, "no launch command"
  config = module.get_config("smoke")  # every config's default variant, smoke
  if config.trainer == "lincls":
    config.lincls.pretrained = "/nonexistent"  # only checked when the probe starts
  config_lib.validate(config, num_devices=8)


def test_config_args_are_checked():
  with pytest.raises(ValueError, match="expected one of baseline, mcl_x2"):
    cifar100_resnet32.get_config("mcl_x3")
  for bad in ("1", "9,smoke", "2,3"):
    with pytest.raises(ValueError, match=r"config argument .* optionally followed by ',smoke'"):
      cifar100_cohort_size.get_config(bad)
  with pytest.raises(ValueError, match="config argument 'vcl\\+kd'"):
    cifar100_ablation.get_config("vcl+kd")
  assert cifar100_cohort_size.get_config("5,smoke").cohort.num_members == 5


def test_ablation_and_cohort_size_set_the_official_fields():
  c = cifar100_ablation.get_config("vcl+soft_icl")
  assert (c.loss.vcl_weight, c.loss.icl_weight, c.loss.soft_vcl_weight, c.loss.soft_icl_weight) == (
    0.1,
    0.0,
    0.0,
    1.0,
  )
  assert c.cohort.num_members == 4 and c.model.shared_stages == 2
  c = cifar100_cohort_size.get_config("6")
  assert c.cohort.num_members == 6 and c.model.shared_stages == 2
  assert cifar100_cohort_size.get_config("2").model.shared_stages == 0
  logit = cifar100_resnet32.get_config("mcl_x4_logit")
  assert logit.loss.logit_kd_weight == 1.0 and logit.loss.logit_kd_targets == "last"
  assert default.get_config().model.shared_stages == 0


def run_cli(*args, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "mcl_jax.main", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_cli_unknown_override_field_is_one_line(tmp_path):
  r = run_cli(
    "--config=cifar100_resnet32:mcl_x2,smoke",
    "--config.optim.lrr=0.05",
    f"--workdir={tmp_path}",
    tmp_path=tmp_path,
  )
  assert r.returncode == 2, r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and "lrr" in last, r.stderr
  assert "Traceback" not in r.stderr


def test_cli_bad_batch_split_is_one_line(tmp_path):
  r = run_cli(
    "--config=cifar100_resnet32:mcl_x2,smoke",
    "--config.input.global_batch_size=12",
    "--config.input.samples_per_class=2",
    f"--workdir={tmp_path}",
    tmp_path=tmp_path,
  )
  assert r.returncode == 2, r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last == (
    "error: config.input.global_batch_size=12 is not divisible by the 8 devices; "
    "use a multiple of 8."
  ), r.stderr
  assert "Traceback" not in r.stderr


def test_the_top_level_configs_folder_is_the_packages_own():
  """`--config=configs/imagenet_r18_x3.py` from the repository root names a real file, and
  it is the installed package's file, not a copy (`configs` links to mcl_jax/configs)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  top = os.path.join(root, "configs", "imagenet_r18_x3.py")
  assert os.path.isfile(top)
  assert os.path.samefile(top, os.path.join(config_lib.CONFIG_DIR, "imagenet_r18_x3.py"))
  assert config_lib.resolve_config_path(top + ":smoke") == top + ":smoke"
