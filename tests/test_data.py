"""Data layer: class-aware sampler, on-device augmentation, eval padding, sources."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import data
from mcl_jax.config_lib import ConfigError
from mcl_jax.data import augment
from mcl_jax.data import sampler

CIFAR_LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(100), 500))


# -- class-aware sampler (official MPerClassSampler, m = 2) ------------------------------


def test_class_aware_epoch_batches_are_classes_times_m():
  idx = sampler.class_aware_epoch(
    CIFAR_LABELS, epoch=0, seed=0, global_batch_size=128, samples_per_class=2
  )
  assert idx.shape == (390, 128) and idx.dtype == np.int32  # 50,000 // 128 (official)
  pairs = CIFAR_LABELS[idx].reshape(390, 64, 2)
  np.testing.assert_array_equal(pairs[..., 0], pairs[..., 1])  # labels pair up
  assert all(len(set(row)) == 64 for row in pairs[..., 0])  # 64 distinct classes per batch
  pair_idx = idx.reshape(390, 64, 2)
  assert (pair_idx[..., 0] != pair_idx[..., 1]).all()  # 500 per class: no replacement


def test_class_aware_epoch_is_a_function_of_seed_and_epoch():
  kw = dict(global_batch_size=128, samples_per_class=2)
  a = sampler.class_aware_epoch(CIFAR_LABELS, epoch=3, seed=7, **kw)
  np.testing.assert_array_equal(a, sampler.class_aware_epoch(CIFAR_LABELS, epoch=3, seed=7, **kw))
  assert (a != sampler.class_aware_epoch(CIFAR_LABELS, epoch=4, seed=7, **kw)).mean() > 0.9
  assert (a != sampler.class_aware_epoch(CIFAR_LABELS, epoch=3, seed=8, **kw)).mean() > 0.9


def test_class_aware_epoch_length_and_small_classes():
  labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 3, 3])  # class 2 has one example
  idx = sampler.class_aware_epoch(
    labels, epoch=0, seed=0, global_batch_size=4, samples_per_class=2, num_examples_per_epoch=9
  )
  assert idx.shape == (2, 4)
  seen_single = False
  for e in range(50):
    idx = sampler.class_aware_epoch(
      labels, epoch=e, seed=0, global_batch_size=6, samples_per_class=2
    )
    assert idx.shape == (1, 6)
    for a, b in idx.reshape(-1, 2):
      assert labels[a] == labels[b]
      if labels[a] == 2:
        assert a == b == 7  # fewer than m examples: drawn with replacement
        seen_single = True
      else:
        assert a != b  # at least m examples: without replacement
  assert seen_single


def test_class_aware_epoch_rejects_impossible_batches():
  with pytest.raises(ValueError, match="distinct classes"):
    sampler.class_aware_epoch(
      np.arange(10) % 5, epoch=0, seed=0, global_batch_size=12, samples_per_class=2
    )
  with pytest.raises(ValueError, match="multiple"):
    sampler.class_aware_epoch(
      CIFAR_LABELS, epoch=0, seed=0, global_batch_size=127, samples_per_class=2
    )


def test_shuffled_epoch_drops_remainder_and_is_deterministic():
  idx = sampler.shuffled_epoch(1000, epoch=2, seed=1, global_batch_size=64)
  assert idx.shape == (15, 64)
  assert len(np.unique(idx)) == 15 * 64 and idx.min() >= 0 and idx.max() < 1000
  np.testing.assert_array_equal(
    idx, sampler.shuffled_epoch(1000, epoch=2, seed=1, global_batch_size=64)
  )
  assert (idx != sampler.shuffled_epoch(1000, epoch=3, seed=1, global_batch_size=64)).any()


def test_local_batch_indices_partition_the_global_batch():
  glob = sampler.shuffled_epoch(256, epoch=0, seed=0, global_batch_size=32)
  parts = [data.local_batch_indices(glob, p, 4) for p in range(4)]
  assert all(part.shape == (8, 8) for part in parts)
  np.testing.assert_array_equal(np.concatenate(parts, axis=-1), glob)
  with pytest.raises(ValueError, match="does not split evenly"):
    data.local_batch_indices(glob, 0, 3)


# -- augmentation ----------------------------------------------------------------------


def _images(n=16, size=8, channels=3):
  return np.random.default_rng(1).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def test_random_crop_is_a_window_of_the_zero_padded_image():
  images = _images()
  out = jax.jit(augment.random_crop_with_padding, static_argnums=2)(
    jax.random.PRNGKey(0), images, 2
  )
  assert out.shape == images.shape and out.dtype == jnp.float32
  padded = np.pad(images.astype(np.float32) / 255, ((0, 0), (2, 2), (2, 2), (0, 0)))
  offsets = set()
  for i in range(len(images)):
    hits = [
      (y, x)
      for y in range(5)
      for x in range(5)
      if np.allclose(out[i], padded[i, y : y + 8, x : x + 8])
    ]
    assert hits, f"example {i} is not a window of its padded image"
    offsets.add(hits[0])
  assert len(offsets) > 3  # offsets drawn per example


def test_random_flip_flips_some_examples_exactly():
  images = _images().astype(np.float32)
  out = np.asarray(jax.jit(augment.random_flip)(jax.random.PRNGKey(3), images))
  flipped = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, images)]
  kept = [np.array_equal(o, x) for o, x in zip(out, images)]
  assert all(f or k for f, k in zip(flipped, kept))
  assert any(flipped) and any(kept)


def test_normalize_scales_uint8_and_keeps_float_units():
  images = _images(n=2)
  a = augment.normalize(images, augment.CIFAR_MEAN, augment.CIFAR_STD)
  b = augment.normalize(images.astype(np.float32) / 255, augment.CIFAR_MEAN, augment.CIFAR_STD)
  assert a.dtype == jnp.float32
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  expected = (images[0, 0, 0] / 255 - np.array(augment.CIFAR_MEAN)) / np.array(augment.CIFAR_STD)
  np.testing.assert_allclose(a[0, 0, 0], expected, rtol=1e-5)
  assert augment.normalize(images, (0.5,) * 3, (0.5,) * 3, jnp.bfloat16).dtype == jnp.bfloat16


def test_train_augment_jits_and_is_deterministic_per_key():
  spec = augment.AugmentSpec(crop_padding=4, flip=True)
  fn = jax.jit(
    lambda rng, x: augment.train_augment(
      rng, x, spec, mean=augment.CIFAR_MEAN, std=augment.CIFAR_STD
    )
  )
  images = _images(size=32)
  a = fn(jax.random.PRNGKey(0), images)
  assert a.shape == images.shape and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, fn(jax.random.PRNGKey(0), images))
  assert not np.array_equal(a, fn(jax.random.PRNGKey(1), images))


# -- eval batches ----------------------------------------------------------------------


def test_eval_batches_pad_the_last_batch_with_mask_zero():
  images, labels = _images(n=10), np.arange(10, dtype=np.int32)
  batches = list(data.eval_batches(images, labels, 4))
  assert len(batches) == 3 and all(b["image"].shape == (4, 8, 8, 3) for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 10 and mask.tolist() == [1.0] * 10 + [0.0] * 2
  seen = np.concatenate([b["label"] for b in batches])[mask > 0]
  np.testing.assert_array_equal(seen, labels)  # every example exactly once, in order
  for p in range(2):  # a process's share keeps (label, mask) aligned
    local = data.local_batch_indices(batches[-1]["mask"], p, 2)
    assert local.shape == (2,)


def test_in_memory_eval_shares_split_the_batch_axis_over_processes():
  ds = data.make_source(
    {"dataset": "synthetic", "synthetic_train_size": 16, "synthetic_eval_size": 10, "image_size": 8}
  )
  shares = [list(ds.eval_batches("test", 4, process_index=p, process_count=2)) for p in range(2)]
  for batch0, batch1 in zip(*shares):
    assert batch0["image"].shape == (2, 8, 8, 3) and batch0["label"].shape == (2,)
    joined = np.concatenate([batch0["index"], batch1["index"]])
    whole = np.concatenate([batch0["image"], batch1["image"]])
    np.testing.assert_array_equal(whole, ds.eval_images[joined])
  masks = np.concatenate([np.concatenate([a["mask"], b["mask"]]) for a, b in zip(*shares)])
  assert masks.sum() == 10


# -- sources ---------------------------------------------------------------------------


def test_digits_split_is_fixed_stratified_and_normalisable():
  ds = data.make_source({"dataset": "digits", "image_size": 16})
  assert ds.train_images.shape == (1437, 16, 16, 1) and ds.eval_images.shape == (360, 16, 16, 1)
  assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
  assert 0.0 <= ds.train_images.min() and ds.train_images.max() <= 1.0
  assert ds.num_classes == 10 and ds.image_shape == (16, 16, 1)
  counts = np.bincount(ds.eval_labels, minlength=10)
  assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~10% of each class
  again = data.make_source({"dataset": "digits", "image_size": 16})
  np.testing.assert_array_equal(ds.train_labels, again.train_labels)
  x = augment.normalize(ds.train_images, ds.mean, ds.std)
  np.testing.assert_allclose([x.mean(), x.std()], [0.0, 1.0], atol=1e-3)


def test_synthetic_source_has_the_requested_shapes():
  ds = data.make_source(
    {
      "dataset": "synthetic",
      "image_size": 8,
      "synthetic_train_size": 40,
      "synthetic_eval_size": 12,
      "synthetic_num_classes": 4,
    }
  )
  assert ds.train_images.shape == (40, 8, 8, 3) and ds.train_images.dtype == np.uint8
  assert ds.eval_labels.shape == (12,) and ds.num_classes == 4
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [10, 10, 10, 10])


def test_the_in_memory_source_fulfils_the_protocol_and_materialises_on_device():
  ds = data.make_source(
    {
      "dataset": "synthetic",
      "image_size": 8,
      "synthetic_train_size": 40,
      "synthetic_eval_size": 12,
      "synthetic_num_classes": 4,
    }
  )
  assert isinstance(ds, data.protocol.Source)
  consts = {k: jnp.asarray(v) for k, v in ds.device_arrays().items()}
  index = np.array([3, 0, 39], np.int32)
  batch = jax.jit(ds.materialize)(consts, {"index": index})
  np.testing.assert_array_equal(batch["image"], ds.train_images[index])
  np.testing.assert_array_equal(batch["label"], ds.train_labels[index])
  assert "label" not in ds.materialize(consts, {"index": index}, labels=False)
  assert ds.abstract_train_batch(16) == {"index": jax.ShapeDtypeStruct((16,), np.int32)}
  replay = list(ds.eval_batches("train", 16, process_index=0, process_count=1))
  keep = np.concatenate([b["mask"] for b in replay]) > 0
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in replay])[keep], ds.train_images)
  with pytest.raises(ConfigError, match="Unknown input field"):
    data.make_source({"dataset": "synthetic", "imagesize": 8})


def test_unknown_dataset_name_lists_the_valid_ones():
  with pytest.raises(ConfigError) as err:
    data.make_source({"dataset": "cifar1000"})
  message = str(err.value)
  assert "cifar1000" in message and all(name in message for name in data.DATASETS)


def test_cifar100_through_tfds_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.make_source({"dataset": "cifar100", "data_dir": str(tmp_path)})
  assert ds.train_images.shape == (20, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32 and ds.eval_labels.shape == (20,)
  assert ds.num_classes == 100 and ds.train_labels.max() < 100
  assert ds.mean == augment.CIFAR_MEAN and ds.augment == augment.AugmentSpec(4, True)


def test_missing_cifar_is_one_clear_error(tmp_path):
  from mcl_jax.data import cifar

  with pytest.raises(data.DatasetNotFoundError, match="tfds build cifar10"):
    cifar.load_cifar("cifar10", str(tmp_path), download=False)


def test_importing_the_data_package_does_not_import_tensorflow():
  code = (
    "import sys, mcl_jax.data, mcl_jax.data.imagenet; "
    "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run(
    [sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu"}
  )


def test_rotation_classes_turn_each_image_once_and_label_4c_plus_r():
  from mcl_jax.data import pipeline

  rng = np.random.default_rng(0)
  base = pipeline.Dataset(
    "toy",
    rng.integers(0, 255, (50, 6, 6, 1), dtype=np.uint8),
    np.arange(50, dtype=np.int32) % 5,
    rng.integers(0, 255, (20, 6, 6, 1), dtype=np.uint8),
    np.arange(20, dtype=np.int32) % 5,
    num_classes=5,
    mean=(0.5,),
    std=(0.2,),
  )
  rotated = pipeline.rotation_classes(base)
  assert rotated.num_classes == 20 and not rotated.augment.flip
  for images, labels, new_images, new_labels in (
    (base.train_images, base.train_labels, rotated.train_images, rotated.train_labels),
    (base.eval_images, base.eval_labels, rotated.eval_images, rotated.eval_labels),
  ):
    assert new_images.shape == images.shape
    np.testing.assert_array_equal(new_labels // 4, labels)  # the class is kept
    for image, new, turn in zip(images, new_images, new_labels % 4):
      np.testing.assert_array_equal(new, np.rot90(image, k=int(turn), axes=(0, 1)))
  assert len(set(rotated.train_labels % 4)) == 4  # every turn occurs
  again = pipeline.rotation_classes(base)
  np.testing.assert_array_equal(again.train_labels, rotated.train_labels)  # fixed seed
