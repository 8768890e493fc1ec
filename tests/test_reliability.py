"""Nothing lost, nothing silent: the divergence guard, resuming only what matches, elastic
restore on another device count, a corrupted newest checkpoint, and bad input.

Every bad input must end in one sentence (exit status 2 on the command line) with nothing
written to the workdir.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mcl_jax import checkpointing
from mcl_jax import config_lib
from mcl_jax import jobs
from mcl_jax import loop
from mcl_jax import sharding as sharding_lib
from mcl_jax.configs import cifar100_common
from mcl_jax.configs import common
from mcl_jax.errors import ConfigError
from mcl_jax.errors import DatasetNotFoundError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.xdist_group("reliability")


def tiny_config(**overrides):
  """tiny x2 with MCL on 8x8 synthetic images: 4 steps per epoch, a checkpoint per epoch."""
  c = common.smoke(cifar100_common.set_variant(cifar100_common.base("tiny"), "mcl_x2"))
  c.input.image_size = 8
  c.input.synthetic_train_size = 64
  c.input.synthetic_eval_size = 20
  c.input.eval_batch_size = 8
  c.schedule.epochs = 3
  c.schedule.num_train_steps = 0
  c.checkpoint.every_epochs = 1
  c.checkpoint.keep = 3
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def one_sentence(message: str) -> bool:
  return "\n" not in message and message.rstrip().endswith(".")


# ----------------------------------------------------------------------------- divergence


def test_a_diverging_run_stops_with_exit_3_and_keeps_its_last_finite_checkpoint(tmp_path):
  """Epoch 0 at lr 0.1 (saved at step 4), then x1e9: the loss becomes NaN in epoch 1."""
  workdir = tmp_path / "run"
  cmd = [
    sys.executable,
    "-m",
    "mcl_jax.main",
    "--config=cifar100_resnet32:mcl_x2,smoke",
    f"--workdir={workdir}",
    "--config.model.arch=tiny",
    "--config.input.image_size=8",
    "--config.schedule.num_train_steps=0",
    "--config.schedule.epochs=3",
    "--config.schedule.kind=step",
    "--config.schedule.boundaries=(1,)",
    "--config.schedule.decay_factor=1e9",
    "--config.checkpoint.every_epochs=1",
    "--config.log_every_steps=1",
  ]
  r = subprocess.run(
    cmd,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert r.returncode == 3, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: The loss diverged at step ") and "not finite" in last
  assert "the newest checkpoint, step 4, is finite" in last and one_sentence(last)
  ckpt = checkpointing.Checkpointer(str(workdir), read_only=True)
  assert ckpt.steps() == [4]  # nothing written after the divergence
  state, _ = ckpt.restore(4, jobs.build(tiny_config(), str(tmp_path / "x")).state)
  ckpt.close()
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


# ----------------------------------------------------------------------------- resume


def test_resume_refuses_a_checkpoint_of_another_experiment(tmp_path):
  workdir = str(tmp_path / "run")
  loop.fit(jobs.build(tiny_config(**{"schedule.num_train_steps": 4}), workdir))
  with pytest.raises(ConfigError) as e:
    jobs.run(tiny_config(**{"cohort.num_members": 3, "model.shared_stages": 1}), workdir)
  message = str(e.value)
  assert one_sentence(message)
  assert "cohort.num_members=2 (now 3)" in message and "model.shared_stages=0 (now 1)" in message
  assert "choose a new --workdir" in message and "--config.resume_from=" in message
  # Naming the checkpoints explicitly does not make mismatched shapes restorable.
  bigger = tiny_config(**{"cohort.num_members": 3, "model.shared_stages": 1})
  bigger.resume_from = workdir
  with pytest.raises(ConfigError, match="does not fit this config's state"):
    jobs.run(bigger, workdir)


def assert_restored(run: loop.Run, saved, *, bank_rows: int | None = None) -> None:
  """Every leaf of `run.state` (params, optimizer state, BN statistics, RNG, step, bank)
  equals `saved`, the state that was checkpointed, bit for bit; on another device count
  the bank equal in its first `bank_rows` rows and zero in the padding after them.

  A restore that brought back only part of the state (the step, say, with fresh
  parameters) passes a check of the step or of the end of training (a restart from
  scratch on the same batches ends alike), not this one.
  """
  got_leaves, got_tree = jax.tree_util.tree_flatten_with_path(jax.device_get(run.state))
  want_leaves, want_tree = jax.tree_util.tree_flatten_with_path(saved)
  assert got_tree == want_tree
  for (path, got), (_, want) in zip(got_leaves, want_leaves):
    name = jax.tree_util.keystr(path)
    got, want = np.asarray(got), np.asarray(want)
    if name == ".bank" and bank_rows is not None:
      np.testing.assert_array_equal(got[:, :bank_rows], want[:, :bank_rows], err_msg=name)
      assert not np.any(got[:, bank_rows:]), "the bank's padding rows are not zero"
    else:
      np.testing.assert_array_equal(got, want, err_msg=name)


def restored_run(config, workdir: str, **build_options) -> loop.Run:
  """A new run of `config` in `workdir`, resumed from its newest checkpoint (as `fit` does)."""
  run = jobs.build(config, workdir, **build_options)
  ckpt = checkpointing.Checkpointer(workdir)
  try:
    assert loop.resume(run, ckpt)
  finally:
    ckpt.close()
  return run


def test_harmless_changes_resume(tmp_path):
  workdir = str(tmp_path / "run")
  first = jobs.build(tiny_config(**{"schedule.num_train_steps": 4}), workdir)
  loop.fit(first)
  saved = jax.device_get(first.state)  # what step 4's checkpoint holds
  more = tiny_config()
  more.log_every_steps, more.eval_every_epochs = 2, 2
  more.schedule.epochs = 2  # 8 steps: resumes at 4 and trains 4 more
  run = restored_run(more, workdir)
  assert int(run.state.step) == 4
  assert_restored(run, saved)
  result = loop.fit(run)
  assert result["steps"] == 8


def test_resume_from_another_workdir(tmp_path):
  first = str(tmp_path / "first")
  loop.fit(jobs.build(tiny_config(**{"schedule.num_train_steps": 4}), first))
  second = tiny_config(**{"schedule.num_train_steps": 6})
  second.resume_from = first
  run = jobs.build(second, str(tmp_path / "second"))
  ckpt = checkpointing.Checkpointer(str(tmp_path / "second"))
  assert loop.resume(run, ckpt).endswith(os.path.join("first", "checkpoints"))
  ckpt.close()
  assert int(run.state.step) == 4


# ----------------------------------------------------------------------------- elastic


def bank_config():
  c = tiny_config()
  c.loss.regime = "bank"
  c.input.samples_per_class = 0
  c.input.synthetic_train_size = 60  # not a multiple of 8 or 4: the bank is padded
  c.input.global_batch_size = 8
  c.model.dtype = "float32"
  c.schedule.epochs = 3  # 7 steps per epoch: 21 steps
  return c


def mesh_of(n):
  return sharding_lib.make_mesh(jax.devices()[:n])


def test_elastic_restore_8_to_2_to_4_devices_equals_an_uninterrupted_run(tmp_path):
  full = jobs.build(bank_config(), str(tmp_path / "full"), mesh=mesh_of(8))
  full.train_steps()
  workdir = str(tmp_path / "elastic")
  saved = None  # the state the previous leg ended with and checkpointed
  for devices, steps in ((8, 7), (2, 14), (4, 21)):
    c = bank_config()
    c.schedule.num_train_steps = steps
    if saved is None:
      run = jobs.build(c, workdir, mesh=mesh_of(devices))
    else:  # the restore itself, before any training: the whole state, re-padded
      run = restored_run(c, workdir, mesh=mesh_of(devices))
      assert_restored(run, saved, bank_rows=60)
    loop.fit(run)
    saved = jax.device_get(run.state)
    assert int(run.state.step) == steps and run.setup.mesh.size == devices
    rows = run.state.bank.shape[1]
    assert rows == -(-60 // devices) * devices  # padded for this mesh
    assert run.state.bank.sharding.spec == jax.sharding.PartitionSpec(None, "data", None)
  a, b = jax.device_get(run.state), jax.device_get(full.state)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, atol=2e-5)
  np.testing.assert_allclose(a.bank[:, :60], b.bank[:, :60], atol=2e-5)


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path):
  workdir = str(tmp_path / "run")
  c = tiny_config(**{"schedule.num_train_steps": 8})
  loop.fit(jobs.build(c, workdir))
  newest = os.path.join(checkpointing.checkpoint_dir(workdir), "8", "state")
  for dirpath, _, files in os.walk(newest):
    for name in files:
      path = os.path.join(dirpath, name)
      if os.path.getsize(path) > 64:
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
  run = jobs.build(c, workdir)
  ckpt = checkpointing.Checkpointer(workdir)
  assert loop.resume(run, ckpt)  # logs one warning naming step 8
  ckpt.close()
  assert int(run.state.step) == 4


# ----------------------------------------------------------------------------- bad input


def fashion(**overrides):
  from mcl_jax.configs import fashion_mnist

  c = fashion_mnist.get_config("mcl_x2,smoke")
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def image_folder(root, classes):
  from PIL import Image

  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    for name, count in classes.items():
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(count):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
  return str(root)


def bad_inputs(tmp_path):
  smoke = lambda **kw: tiny_config(**kw)  # noqa: E731
  folder_one = lambda: image_folder(tmp_path / "one", {"a": 4})  # noqa: E731
  folder_empty = lambda: image_folder(tmp_path / "empty", {"a": 4, "b": 0})  # noqa: E731
  return {
    "zero lr": (lambda: smoke(**{"optim.lr": 0.0}), "config.optim.lr=0.0 must be positive"),
    "negative lr": (lambda: smoke(**{"optim.lr": -1.0}), "config.optim.lr=-1.0"),
    "tau 0": (lambda: smoke(**{"loss.tau": 0.0}), "config.loss.tau=0.0 must be positive"),
    "KD temperature < 0": (
      lambda: smoke(**{"loss.kd_temperature": -3.0}),
      "config.loss.kd_temperature=-3.0 must be positive",
    ),
    "unknown dataset": (
      lambda: smoke(**{"input.dataset": "mnist3"}),
      "config.input.dataset='mnist3' is not one of",
    ),
    "unknown arch": (
      lambda: smoke(**{"model.arch": "resnet33"}),
      "Unknown architecture config.model.arch='resnet33'",
    ),
    "missing data_dir": (
      lambda: fashion(**{"input.data_dir": str(tmp_path / "none")}),
      "does not exist; to get Fashion-MNIST",
    ),
    # download off: TFDS would otherwise retry a download for minutes on a machine
    # without network before the same sentence.
    "data_dir of wrong files": (
      lambda: fashion(**{"input.data_dir": str(tmp_path), "input.download": False}),
      "Fashion-MNIST was found neither as IDX files",
    ),
    "one class": (
      lambda: _folder(smoke, folder_one),
      "has 1 class folder; a classifier needs at least 2",
    ),
    "an empty class": (lambda: _folder(smoke, folder_empty), "holds no images"),
    "labels outside num_classes": (
      lambda: smoke(**{"model.num_classes": 5}),
      "config.model.num_classes=5 but synthetic has 10",
    ),
    "batch that does not split": (
      lambda: smoke(**{"input.global_batch_size": 12, "input.samples_per_class": 2}),
      "is not divisible by the 8 devices",
    ),
    "too few classes for the batch": (
      lambda: smoke(**{"input.global_batch_size": 48, "input.samples_per_class": 2}),
      "needs 24 distinct classes but synthetic has only 10",
    ),
    "images of the wrong shape": (
      lambda: fashion(**{"input.image_size": 20}),
      "config.input.image_size=20 is not 28 (native)",
    ),
    "probe on a training workdir": (lambda: _probe_of(tmp_path), "is not an export directory"),
  }


def _folder(smoke, make):
  c = smoke(**{"input.samples_per_class": 0, "loss.regime": "bank"})
  c.input.dataset = "image_folder"
  c.input.data_dir = make()
  c.input.image_size = 8
  return c


def _probe_of(tmp_path):
  from mcl_jax.configs import lincls_r18

  c = lincls_r18.get_config("smoke")
  training = tmp_path / "training_run"
  training.mkdir(exist_ok=True)
  c.lincls.pretrained = str(training)
  return c


@pytest.mark.parametrize("case", list(bad_inputs(os.path.abspath(os.sep))))
def test_bad_input_is_one_sentence_and_writes_nothing(case, tmp_path):
  if case in ("missing data_dir", "data_dir of wrong files", "images of the wrong shape"):
    from mcl_jax.data import fashion_mnist

    if case == "images of the wrong shape" and not fashion_mnist.has_idx_files(
      fashion_mnist.DEBIAN_DIR
    ):
      pytest.skip("apt-get install dataset-fashion-mnist")
  make, expected = bad_inputs(tmp_path)[case]
  config = make()
  workdir = tmp_path / "workdir"
  with pytest.raises((ConfigError, DatasetNotFoundError)) as e:
    jobs.run(config, str(workdir))
  message = str(e.value)
  assert expected in message and one_sentence(message), message
  assert not workdir.exists(), os.listdir(workdir)


def test_a_workdir_that_is_a_file(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(ConfigError, match="is a file, not a directory"):
    config_lib.validate(tiny_config(), workdir=str(blocker))
  assert blocker.read_text() == "x"
