"""ImageNet-style supervised MCL: the memory bank in the sharded train state (docs/SPEC.md 2.2)."""

import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from mcl_jax import checkpointing
from mcl_jax import jobs
from mcl_jax import memory_bank
from mcl_jax import sharding as sharding_lib
from mcl_jax.configs import imagenet_r18_x3


def tiny_bank_config():
  """imagenet_r18_x3's smoke recipe (bank, logit KD, bf16) on the tiny architecture."""
  c = imagenet_r18_x3.get_config("smoke")
  c.model.arch = "tiny"
  c.model.shared_stages = 1
  c.input.image_size = 8
  c.input.synthetic_train_size = 60  # not a multiple of 8: the bank is padded to 64 rows
  # The sharded layout, whose split these tests check (the configs' replicated one:
  # test_a_replicated_bank_trains_as_the_sharded_one_and_resumes_its_checkpoint).
  c.bank.layout = "sharded"
  return c


def test_imagenet_r18_x3_is_the_official_recipe():
  """Its smoke run (finite losses, every member evaluated) is in tests/test_config_smoke.py."""
  c = imagenet_r18_x3.get_config()
  assert (c.model.arch, c.cohort.num_members, c.model.shared_stages) == ("resnet18", 3, 3)
  assert c.loss.regime == "bank" and c.loss.logit_kd_targets == "last"
  assert (c.bank.num_positives, c.bank.num_negatives, c.model.dtype) == (1, 8192, "bfloat16")


def test_bank_is_sharded_and_updated_as_memory_bank_update(tmp_path):
  c = tiny_bank_config()
  c.model.dtype = "float32"  # the reference forward below runs outside the step's jit
  trainer = jobs.build(c, str(tmp_path))
  bank = trainer.state.bank
  assert bank.shape == (2 if c.cohort.num_members == 2 else 3, 64, 128)
  assert bank.sharding.spec == P(None, "data", None)
  assert {s.data.shape for s in bank.addressable_shards} == {(bank.shape[0], 8, 128)}

  before = jax.device_get(trainer.state)
  ((_, batch),) = [next(iter(trainer.batches()))]
  trainer.step(batch)
  after = np.asarray(trainer.state.bank)

  # The embeddings the step computed: same RNG split, preprocessing and forward pass.
  idx = jnp.asarray(batch["index"])
  _, aug_rng, _ = jax.random.split(before.rng, 3)
  images = trainer.setup.source.train_preprocess(aug_rng, trainer.task.consts["train_image"][idx])
  outputs, _ = trainer.task.model.apply(
    {"params": before.params, "batch_stats": before.batch_stats},
    images,
    train=True,
    mutable=["batch_stats"],
  )
  expected = memory_bank.update(
    jnp.asarray(before.bank), idx, outputs["embeddings"], c.bank.momentum
  )
  np.testing.assert_allclose(after, np.asarray(expected), atol=2e-6)
  untouched = np.setdiff1d(np.arange(64), np.asarray(idx))
  np.testing.assert_array_equal(after[:, untouched], before.bank[:, untouched])
  assert trainer.state.bank.sharding.spec == P(None, "data", None)


def test_one_and_eight_devices_give_the_same_losses(tmp_path):
  c = tiny_bank_config()
  c.model.dtype = "float32"  # compare the arithmetic, not bf16 rounding order
  eight = jobs.build(c, str(tmp_path / "eight"))
  one = jobs.build(c, str(tmp_path / "one"), mesh=sharding_lib.make_mesh(jax.devices()[:1]))
  h8, h1 = eight.train_steps(2), one.train_steps(2)
  for name in ("loss", "vcl", "icl", "soft_vcl", "soft_icl", "logit_kd"):
    # atol: the soft terms are ~0.02, where float32 sums in another order (8 shards vs 1)
    # differ by a few 1e-7 absolute (5.7e-7 seen on one machine: 2.4e-5 relative).
    np.testing.assert_allclose(
      np.asarray(h8[-1][name]), np.asarray(h1[-1][name]), rtol=2e-5, atol=2e-6, err_msg=name
    )
  # 60 real rows; 8 devices pad the bank to 64 with rows that are never read or written.
  np.testing.assert_allclose(
    np.asarray(eight.state.bank)[:, :60], np.asarray(one.state.bank), atol=1e-5
  )
  assert not np.asarray(eight.state.bank)[:, 60:].any()


def test_resume_restores_the_sharded_bank(tmp_path):
  c = tiny_bank_config()
  trainer = jobs.build(c, str(tmp_path))
  trainer.train_steps(2)
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.save(2, trainer.state, trainer.task.meta())
  ckpt.close()
  fresh = jobs.build(c, str(tmp_path))
  assert not np.array_equal(np.asarray(fresh.state.bank), np.asarray(trainer.state.bank))
  assert fresh.restore(checkpointing.Checkpointer(str(tmp_path)))
  np.testing.assert_array_equal(np.asarray(fresh.state.bank), np.asarray(trainer.state.bank))
  assert fresh.state.bank.sharding.spec == P(None, "data", None)
  assert int(fresh.state.step) == 2


def test_streamed_image_folder_with_the_bank(tmp_path):
  """The real ImageNet path: JPEGs decoded by tf.data, cropped on the host, bank on device."""
  from PIL import Image

  rng = np.random.default_rng(0)
  for split, per_class in (("train", 6), ("val", 2)):
    for cls in ("ant", "bee", "cat", "dog"):
      folder = tmp_path / "data" / split / cls
      folder.mkdir(parents=True)
      for i in range(per_class):
        pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg")
  c = tiny_bank_config()
  c.input.dataset = "image_folder"
  c.input.data_dir = str(tmp_path / "data")
  c.model.num_classes = 0
  c.input.global_batch_size = 8
  c.input.eval_batch_size = 8
  c.schedule.num_train_steps = 3  # crosses an epoch boundary (24 images / 8 = 3 steps)
  result = jobs.run(c, str(tmp_path / "run"))
  assert result["steps"] == 3 and result["eval"]["test"]["top1"].shape == (4,)
  assert np.isfinite(result["train"]["loss"])
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "3")


def test_a_replicated_bank_trains_as_the_sharded_one_and_resumes_its_checkpoint(tmp_path):
  """bank.layout="replicated" (a copy per device, each reading only its own examples'
  candidates) gives the sharded layout's losses and bank on 8 devices, and restores a
  checkpoint the sharded layout wrote: switching layouts keeps a run."""
  c = tiny_bank_config()
  c.model.dtype = "float32"
  assert imagenet_r18_x3.get_config().bank.layout == "replicated"
  sharded = jobs.build(c, str(tmp_path / "sharded"))
  c.bank.layout = "replicated"
  replicated = jobs.build(c, str(tmp_path / "replicated"))
  assert replicated.state.bank.sharding.spec == P()
  hs, hr = sharded.train_steps(2), replicated.train_steps(2)
  for name in ("loss", "vcl", "icl", "soft_vcl", "soft_icl", "logit_kd"):
    np.testing.assert_allclose(
      np.asarray(hr[-1][name]), np.asarray(hs[-1][name]), rtol=2e-5, atol=2e-6, err_msg=name
    )
  np.testing.assert_allclose(
    np.asarray(replicated.state.bank), np.asarray(sharded.state.bank), atol=1e-5
  )
  assert replicated.state.bank.sharding.spec == P()

  ckpt = checkpointing.Checkpointer(str(tmp_path / "sharded"))
  ckpt.save(2, sharded.state, sharded.task.meta())
  ckpt.close()
  fresh = jobs.build(c, str(tmp_path / "sharded"))
  assert fresh.restore(checkpointing.Checkpointer(str(tmp_path / "sharded")))
  np.testing.assert_array_equal(np.asarray(fresh.state.bank), np.asarray(sharded.state.bank))
  assert fresh.state.bank.sharding.spec == P()


def test_a_bfloat16_bank_trains_as_the_float32_one_to_bfloat16_precision(tmp_path):
  """bank.dtype="bfloat16" stores the bank in half the bytes, in either layout; rows are
  mixed and normalised in float32 and the similarities are float32 dots, so the losses
  and the bank stay within bfloat16 rounding of the float32 bank's run."""
  c = tiny_bank_config()
  c.model.dtype = "float32"
  f32 = jobs.build(c, str(tmp_path / "f32"))
  f32_initial = np.asarray(f32.state.bank.astype(jnp.bfloat16), np.float32)
  h32 = f32.train_steps(2)
  c.bank.dtype = "bfloat16"
  for layout in ("sharded", "replicated"):
    c.bank.layout = layout
    bf16 = jobs.build(c, str(tmp_path / f"bf16_{layout}"))
    assert bf16.state.bank.dtype == jnp.bfloat16 and bf16.state.bank.shape == f32.state.bank.shape
    # The same draw, rounded once.
    initial = np.asarray(bf16.state.bank.astype(jnp.float32))
    np.testing.assert_array_equal(initial, f32_initial)
    h16 = bf16.train_steps(2)
    assert bf16.state.bank.dtype == jnp.bfloat16
    for name in ("loss", "vcl", "icl", "soft_vcl", "soft_icl"):
      np.testing.assert_allclose(
        np.asarray(h16[-1][name]), np.asarray(h32[-1][name]), rtol=2e-2, err_msg=name
      )
    bank16 = np.asarray(bf16.state.bank.astype(jnp.float32))
    np.testing.assert_allclose(bank16, np.asarray(f32.state.bank), atol=2e-2)
    changed = np.any(bank16 != initial, axis=(0, 2))
    assert changed.sum() >= c.input.global_batch_size  # two batches' rows were written
  # A checkpoint of the bfloat16 bank restores bit for bit, still bfloat16.
  ckpt = checkpointing.Checkpointer(str(tmp_path / "bf16_replicated"))
  ckpt.save(2, bf16.state, bf16.task.meta())
  ckpt.close()
  fresh = jobs.build(c, str(tmp_path / "bf16_replicated"))
  assert fresh.restore(checkpointing.Checkpointer(str(tmp_path / "bf16_replicated")))
  assert fresh.state.bank.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    np.asarray(fresh.state.bank, np.float32), np.asarray(bf16.state.bank, np.float32)
  )
