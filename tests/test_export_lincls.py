"""Export of one member (docs/SPEC.md 1) and the linear probe on it (docs/SPEC.md 4), end to end.

Two tiny runs are shared by the tests (module-scoped): a supervised MCL x2 cohort with a
shared trunk, exported through the `python -m mcl_jax.export` command line, and a MoCo v2
MCL x2 cohort exported in-process and probed with `lincls_r18:smoke` through
`jobs.run`, the CLI's dispatch.
"""

import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import checkpointing
from mcl_jax import config_lib
from mcl_jax import convert
from mcl_jax import export
from mcl_jax import jobs
from mcl_jax import models
from mcl_jax.configs import cifar100_common
from mcl_jax.configs import common
from mcl_jax.configs import lincls_r18
from mcl_jax.configs import moco_r18_x2

# The module-scoped runs are made once: every test of this file goes to the same worker.
pytestmark = pytest.mark.xdist_group("export_lincls")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 8  # 8x8 synthetic images: every compile here stays in the seconds
MEMBER = 1  # not 0: an export that always took the first member must fail


def run_command(module, *args, timeout=300):
  """`python -m <module> args` on one host CPU device, as a user runs a command."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def run_export_cli(*args):
  return run_command("mcl_jax.export", *args, timeout=120)


def assert_one_sentence(message):
  assert "\n" not in message and message.endswith("."), message


def supervised_config():
  """MCL x2 of `tiny` with the stem shared (trunk + branches), 8x8 synthetic data."""
  c = common.smoke(cifar100_common.set_variant(cifar100_common.base("tiny"), "mcl_x2"))
  c.model.num_classes = 0  # the synthetic set's 10 classes
  c.model.shared_stages = 1
  c.input.image_size = SIZE
  return c


@pytest.fixture(scope="module")
def supervised(tmp_path_factory):
  """Two training steps (BN statistics move), a checkpoint, then the export CLI, --torch."""
  workdir = str(tmp_path_factory.mktemp("supervised"))
  trainer = jobs.build(supervised_config(), workdir)
  trainer.train_steps(2)
  ckpt = checkpointing.Checkpointer(workdir)
  ckpt.save(2, trainer.state, trainer.task.meta())
  ckpt.close()
  out = os.path.join(workdir, f"member{MEMBER}")
  cli = run_export_cli(f"--workdir={workdir}", f"--member={MEMBER}", f"--out={out}", "--torch")
  assert cli.returncode == 0, cli.stderr
  return types.SimpleNamespace(trainer=trainer, workdir=workdir, out=out, cli=cli)


def test_exported_member_gives_the_cohort_members_logits(supervised):
  trainer = supervised.trainer
  assert "Exported member 1 (tiny" in supervised.cli.stdout
  module, variables, info = export.load_exported(supervised.out)
  assert info["arch"] == "tiny" and info["num_classes"] == 10
  pre = info["preprocessing"]
  assert pre["image_shape"] == [SIZE, SIZE, 3]
  np.testing.assert_allclose(pre["mean"], trainer.setup.source.mean)
  np.testing.assert_allclose(pre["std"], trainer.setup.source.std)
  assert info["source"]["member"] == MEMBER and info["source"]["step"] == 2
  assert info["source"]["shared_stages"] == 1 and info["files"]["torch"] == "model.safetensors"
  assert "head" not in variables["params"]  # docs/SPEC.md 1: no projection head at inference
  assert info["num_params"] == models.count_params(variables["params"])

  x = jax.random.normal(jax.random.PRNGKey(3), (5, SIZE, SIZE, 3))
  state = trainer.state
  cohort = trainer.task.model.apply(
    {"params": state.params, "batch_stats": state.batch_stats}, x, train=False
  )["logits"]
  single = models.create(info["arch"], info["num_classes"])
  logits, _ = single.apply(variables, x, False)
  assert not np.allclose(cohort[0], cohort[1], atol=1e-3)  # the members really differ
  np.testing.assert_allclose(logits, cohort[MEMBER], rtol=1e-5, atol=1e-5)
  assert module.num_classes == info["num_classes"]
  # The running statistics are the trained ones (2 steps of train-mode BN), not init's.
  bn = variables["batch_stats"]["bn1"]["mean"]
  assert np.any(np.asarray(bn) != 0)
  np.testing.assert_array_equal(bn, state.batch_stats["trunk"]["bn1"]["mean"])


def test_safetensors_have_official_names_and_round_trip(supervised):
  _, variables, _ = export.load_exported(supervised.out)
  sd = convert.load_safetensors(os.path.join(supervised.out, export.TORCH_FILE))
  # The official CIFAR ResNet names (tiny follows them): no cohort paths, OIHW / (out, in).
  assert {
    "conv1.weight",
    "bn1.running_mean",
    "bn1.running_var",
    "layer1.0.conv2.weight",
    "layer1.0.downsample.0.weight",
    "classifier.weight",
    "classifier.bias",
  } <= set(sd)
  assert not any(k.startswith(("trunk", "members", "head")) for k in sd)
  assert sd["conv1.weight"].shape == (8, 3, 3, 3)
  assert sd["classifier.weight"].shape == (10, 16)
  back = convert.from_torch("tiny", sd)
  jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(variables))


# ----------------------------------------------------------------------------- MoCo -> probe


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
  """MoCo v2 MCL x2 (3 steps) -> export member 1 -> linear probe (3 steps), as the README."""
  root = tmp_path_factory.mktemp("moco")
  pre = moco_r18_x2.make(version=2, num_members=2, arg="smoke")
  pre.input.image_size = SIZE
  pre.ssl.knn_every_epochs = 0  # the kNN monitor has its own tests
  moco_dir, out, probe_dir = str(root / "moco"), str(root / "member1"), str(root / "probe")
  moco_result = jobs.run(pre, moco_dir)
  info = export.export_member(moco_dir, MEMBER, out)
  c = lincls_r18.get_config("smoke")
  c.input.image_size = SIZE
  c.lincls.pretrained = out
  config_lib.validate(c, num_devices=8, workdir=probe_dir)
  result = jobs.run(c, probe_dir)
  return types.SimpleNamespace(
    moco_dir=moco_dir,
    out=out,
    probe_dir=probe_dir,
    info=info,
    moco_result=moco_result,
    result=result,
    config=c,
  )


def test_moco_export_is_the_query_encoders_backbone(probed):
  info = probed.info
  width = 16  # tiny's pooled features: v2's fc is the MLP's Dense(F, F)
  assert info["source"]["trainer"] == "moco" and info["source"]["moco_mlp"] is True
  assert info["num_classes"] == width and "MLP projection" in info["classifier"]
  _, state, _ = export.read_checkpoint(probed.moco_dir)
  _, variables, _ = export.load_exported(probed.out)
  query = state["params"]["members"]["backbone"]
  jax.tree.map(lambda e, q: np.testing.assert_array_equal(e, q[MEMBER]), variables["params"], query)
  key = state["key_params"]["members"]["backbone"]
  assert not np.allclose(key["conv1"]["kernel"][MEMBER], variables["params"]["conv1"]["kernel"])


def test_linear_probe_on_the_export_finishes_with_accuracy(probed):
  result = probed.result
  assert result["steps"] == 3 and not result["preempted"]
  assert np.isfinite(result["train"]["loss"])
  top1, top5 = result["eval"]["test"]["top1"], result["eval"]["test"]["top5"]
  assert 0 <= top1 <= top5 <= 1
  # 24 eval examples: the accuracy counts every one of them exactly once.
  assert abs(top1 * 24 - round(top1 * 24)) < 1e-4


def test_probe_trains_only_a_fresh_classifier_on_the_frozen_export(probed):
  trainer = jobs.build(probed.config, probed.probe_dir)
  assert trainer.task.meta()["pretrained"] == probed.out
  assert trainer.restore(checkpointing.Checkpointer(probed.probe_dir))
  head = jax.device_get(trainer.state.params)
  assert set(head) == {"classifier"}  # only the classifier is state
  assert head["classifier"]["kernel"].shape == (16, 10)  # F -> the probe's 10 classes
  net, variables, _ = export.load_exported(probed.out)
  for name in variables["params"]:
    if name != "classifier":
      jax.tree.map(
        np.testing.assert_array_equal,
        trainer.task.consts["frozen"]["params"][name],
        variables["params"][name],
      )
  images = np.random.default_rng(0).uniform(size=(4, SIZE, SIZE, 3)).astype(np.float32)
  x = (images - np.asarray(trainer.setup.source.mean)) / np.asarray(trainer.setup.source.std)
  _, features = net.apply(variables, jnp.asarray(x), False)  # eval-mode BN of the export
  expected = features @ head["classifier"]["kernel"] + head["classifier"]["bias"]
  np.testing.assert_allclose(
    trainer.task.logits(trainer.state, images), expected, rtol=1e-4, atol=1e-5
  )


# ----------------------------------------------------------------------------- errors


def test_member_out_of_range_is_one_line(supervised, tmp_path):
  cli = run_export_cli(f"--workdir={supervised.workdir}", "--member=2", f"--out={tmp_path}")
  assert cli.returncode == 2
  last = cli.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --member=2 is out of range") and "2 members (0..1)" in last
  assert "Traceback" not in cli.stderr
  assert_one_sentence(last)
  with pytest.raises(ValueError, match=r"--member=-1 is out of range") as e:
    export.export_member(supervised.workdir, -1, str(tmp_path))
  assert_one_sentence(str(e.value))


def test_workdir_without_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint in") as e:
    export.export_member(str(tmp_path), 0, str(tmp_path / "out"))
  assert_one_sentence(str(e.value))


def test_a_probe_run_is_not_exportable(probed, tmp_path):
  with pytest.raises(ValueError, match="is a 'lincls' run") as e:
    export.export_member(probed.probe_dir, 0, str(tmp_path))
  assert_one_sentence(str(e.value))


@pytest.mark.parametrize("make_dir", [False, True])
def test_pretrained_dir_missing_or_not_an_export(make_dir, tmp_path):
  path = tmp_path / "member0"
  if make_dir:
    path.mkdir()  # exists, but no export.json in it
  c = lincls_r18.get_config("smoke")
  c.lincls.pretrained = str(path)
  with pytest.raises(config_lib.ConfigError, match="config.lincls.pretrained: .*member0") as e:
    jobs.run(c, str(tmp_path / "probe"))
  assert_one_sentence(str(e.value))
  assert ("is not an export directory" if make_dir else "does not exist") in str(e.value)


def test_export_json_is_plain_json(supervised):
  with open(os.path.join(supervised.out, export.INFO_FILE)) as f:
    info = json.load(f)
  assert info["format"] == export.FORMAT
  assert info["preprocessing"]["image_size"] == SIZE


def test_probe_train_and_eval_steps_compile_once(probed, tmp_path):
  trainer = jobs.build(probed.config, str(tmp_path))
  trainer.train_steps(3)
  trainer.evaluate()
  trainer.evaluate()
  assert trainer.task.compiled_train_step._cache_size() == 1
  assert trainer.task.compiled_eval_step._cache_size() == 1


def test_fewshot_command_on_the_export(supervised, tmp_path):
  """mcl-fewshot on the exported member's features of the synthetic test split."""
  out = tmp_path / "fewshot.json"
  proc = run_command(
    "mcl_jax.fewshot",
    f"--export={supervised.out}",
    "--classes=0,1,2,3,4",
    "--shots=1,2",
    "--queries=3",
    "--episodes=10",
    f"--json_out={out}",
  )
  assert proc.returncode == 0, proc.stderr
  result = json.loads(out.read_text())
  assert set(result) == {
    f"{c}_{k}shot" for c in ("nearest_centroid", "logistic_regression") for k in (1, 2)
  }
  for value in result.values():
    assert 0 <= value["mean"] <= 1 and value["ci95"] >= 0
  assert "5-way few-shot accuracy" in proc.stdout


def test_logreg_probe_command_on_the_export(supervised, tmp_path):
  """mcl-logreg-probe on the exported member's features, C chosen on a held-out split."""
  out = tmp_path / "probe.json"
  proc = run_command(
    "mcl_jax.logreg_probe",
    f"--export={supervised.out}",
    "--validation_size=64",
    "--cs=0.1,10",
    f"--json_out={out}",
  )
  assert proc.returncode == 0, proc.stderr
  result = json.loads(out.read_text())
  assert result["c"] in (0.1, 10.0) and len(result["validation"]["top1_per_c"]) == 2
  assert 0 <= result["test"]["top1"] <= 1 and 0 <= result["validation"]["top1"] <= 1
  assert "chosen C =" in proc.stdout
