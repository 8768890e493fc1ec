"""The MoCo-MCL trainer: queues, key encoders, gradients, resume, two-view augmentation."""

import dataclasses
import functools
import itertools
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import checkpointing
from mcl_jax import jobs
from mcl_jax import losses
from mcl_jax import moco
from mcl_jax import optim
from mcl_jax import sharding as sharding_lib
from mcl_jax.configs import moco_r18_x2
from mcl_jax.data import views

# The module-scoped runs are made once: every test of this file goes to the same worker.
pytestmark = pytest.mark.xdist_group("moco")

BATCH, QUEUE = 16, 32  # K = 2 B: the third step wraps around


def tiny_config(**overrides):
  """The smoke config, shrunk to 8x8 images and a queue of two global batches."""
  c = moco_r18_x2.get_config("smoke")
  c.input.image_size = 8
  c.input.synthetic_train_size = 64
  c.input.synthetic_eval_size = 16
  c.input.global_batch_size = BATCH
  c.input.eval_batch_size = 16
  c.moco.queue_size = QUEUE
  c.moco.key_momentum = 0.9  # far from 1, so the EMA is visible after a few steps
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def assert_trees_close(a, b, **kw):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Three steps of a tiny MoCo-MCL x2 on 8 devices, every state kept on the host."""
  workdir = str(tmp_path_factory.mktemp("moco"))
  trainer = jobs.build(tiny_config(), workdir)
  states, metrics, batches = [jax.device_get(trainer.state)], [], []
  for _, batch in itertools.islice(trainer.batches(), 3):
    batches.append(batch)
    metrics.append(jax.device_get(trainer.step(batch)))
    states.append(jax.device_get(trainer.state))
  ckpt = checkpointing.Checkpointer(workdir)
  ckpt.save(3, trainer.state, trainer.task.meta())
  ckpt.close()
  return types.SimpleNamespace(
    trainer=trainer, states=states, metrics=metrics, batches=batches, workdir=workdir
  )


def test_queue_takes_the_global_batch_at_the_pointer_fifo(run):
  s = run.states
  assert [int(x.queue_ptr) for x in s] == [0, BATCH, 0, BATCH]  # wraps after K / B steps
  first, second = slice(0, BATCH), slice(BATCH, QUEUE)
  q0, q1, q2, q3 = (np.asarray(x.queues) for x in s)
  assert q0.shape == (2, QUEUE, 128)
  np.testing.assert_array_equal(q1[:, second], q0[:, second])  # step 1 wrote rows [0, B)
  assert not np.allclose(q1[:, first], q0[:, first])
  np.testing.assert_array_equal(q2[:, first], q1[:, first])  # step 2 wrote rows [B, 2B)
  assert not np.allclose(q2[:, second], q1[:, second])
  np.testing.assert_array_equal(q3[:, second], q2[:, second])  # step 3 wrapped to row 0
  assert not np.allclose(q3[:, first], q2[:, first])
  np.testing.assert_allclose(np.linalg.norm(q3, axis=-1), 1.0, rtol=1e-5)


def test_key_encoder_is_the_ema_of_the_query_encoder(run):
  m = 0.9
  s = run.states
  # Key encoders start as copies of the query encoders.
  assert_trees_close(s[0].key_params, s[0].params, rtol=0, atol=0)
  for before, after in zip(s[:-1], s[1:]):
    expected = jax.tree.map(lambda k, q: m * k + (1 - m) * q, before.key_params, before.params)
    assert_trees_close(after.key_params, expected, rtol=1e-6, atol=1e-7)
  # After two steps the keys lag the queries: they differ from both.
  leaf = lambda t: np.asarray(jax.tree.leaves(t)[0])  # noqa: E731
  assert not np.allclose(leaf(s[2].key_params), leaf(s[2].params))
  # Key BN statistics move with the key encoder's own (train-mode) forward passes.
  assert not np.allclose(leaf(s[1].key_batch_stats), leaf(s[0].key_batch_stats))


def test_losses_are_finite_with_per_member_metrics(run):
  for metrics in run.metrics:
    for name in ("loss", *losses.MCL_TERMS):
      assert np.isfinite(metrics[name]), name
    assert metrics["ce"].shape == (2,) and np.all(np.isfinite(metrics["ce"]))
    acc = metrics["instance_accuracy"]
    assert acc.shape == (2,) and np.all((0 <= acc) & (acc <= 1))
  total = sum(run.metrics[0][k] for k in losses.MCL_TERMS)  # the four terms, weight 1
  np.testing.assert_allclose(run.metrics[0]["loss"], total, rtol=1e-6)


def test_no_gradient_reaches_the_key_encoders(run):
  enc, s = run.trainer.task.encoders, run.states[1]
  loss_cfg = run.trainer.setup.config.loss
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))

  def loss(params, key_params):
    keys, _ = moco.compute_keys(enc, {"params": key_params, "batch_stats": s.key_batch_stats}, x)
    return moco.moco_loss(
      params, s.batch_stats, x, keys, s.queues, encoders=enc, loss_cfg=loss_cfg
    )[0]

  grad_q, grad_k = jax.jit(jax.grad(loss, argnums=(0, 1)))(s.params, s.key_params)
  assert all(not np.any(g) for g in jax.tree.leaves(grad_k))
  assert any(np.any(g) for g in jax.tree.leaves(grad_q))


def test_resume_restores_queues_pointer_and_key_encoders(run):
  restarted = jobs.build(tiny_config(), run.workdir)
  assert int(restarted.state.queue_ptr) == 0
  assert restarted.restore(checkpointing.Checkpointer(run.workdir))
  restored, saved = jax.device_get(restarted.state), run.states[3]
  assert int(restored.step) == 3 and int(restored.queue_ptr) == BATCH
  for name in (
    "queues",
    "key_params",
    "key_batch_stats",
    "params",
    "batch_stats",
    "opt_state",
    "rng",
  ):
    assert_trees_close(getattr(restored, name), getattr(saved, name), rtol=0, atol=0)
  for leaf in jax.tree.leaves(restarted.state):
    assert leaf.sharding.is_fully_replicated
  meta = restarted.task.meta()
  assert meta["trainer"] == "moco" and meta["num_classes"] == 128 and meta["moco_mlp"] is False
  assert meta["views"] == dataclasses.asdict(views.MOCO_V1)  # the official v1 recipe


def test_views_replace_the_official_recipe(tmp_path):
  """`views=` reaches the step's augmentation (and the meta): with an identity recipe the
  two views are both exactly the normalised source images."""
  identity = views.ViewSpec(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    jitter=(0.0,) * 4,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
    flip=False,
  )
  trainer = jobs.build(tiny_config(), str(tmp_path), views=identity)
  assert trainer.task.spec == identity and trainer.task.meta()["views"]["flip"] is False
  images = jnp.asarray(trainer.setup.source.train_images[:4])
  q, k = jax.jit(trainer.task.views)(jax.random.PRNGKey(0), {"image": images})
  expected = (images / 255.0 - 0.5) / 0.289  # the synthetic set's mean / std
  np.testing.assert_allclose(q, expected, atol=1e-5)
  np.testing.assert_allclose(k, expected, atol=1e-5)
  assert views.DIGITS_VIEWS.flip is False and views.DIGITS_VIEWS.blur_p == 0.0


def test_sharded_step_equals_single_device(run, tmp_path):
  """BN statistics over the global batch (no shuffle-BN): 8 devices == 1 device."""
  one = jobs.build(tiny_config(), str(tmp_path), mesh=sharding_lib.make_mesh(jax.devices()[:1]))
  metrics = jax.device_get(one.step(run.batches[0]))
  np.testing.assert_allclose(metrics["loss"], run.metrics[0]["loss"], rtol=1e-5)
  state, eight = jax.device_get(one.state), run.states[1]
  np.testing.assert_allclose(state.queues, eight.queues, atol=1e-5)
  assert_trees_close(state.params, eight.params, atol=1e-5)
  assert_trees_close(state.batch_stats, eight.batch_stats, atol=1e-5)


def test_single_network_mocov2_step():
  """M = 1 (the MoCo baseline): VCL alone is MoCo's InfoNCE; the MLP head is real."""
  c = tiny_config(
    **{
      "cohort.num_members": 1,
      "moco.mlp": True,
      "loss.tau": 0.2,
      "loss.icl_weight": 0.0,
      "loss.soft_vcl_weight": 0.0,
      "loss.soft_icl_weight": 0.0,
    }
  )
  mesh = sharding_lib.make_mesh()
  enc = moco.build_encoders(c, (8, 8, 3))
  width = moco.feature_width("tiny", (8, 8, 3))
  assert enc.cohort.num_classes == width and enc.mlp  # v2: fc is Dense(F, F)
  tx, _ = optim.make_optimizer(c, steps_per_epoch=4)
  state = moco.create_state(enc, tx, jax.random.PRNGKey(0), mesh, queue_size=QUEUE)
  assert state.params["members"]["mlp"]["kernel"].shape == (1, width, 128)
  assert "head" not in state.params["members"]  # the Cohort's docs/SPEC.md 1 head is not MoCo's
  two = functools.partial(
    views.two_views, spec=views.MOCO_V2, mean=(0.5,) * 3, std=(0.25,) * 3, size=8
  )
  step = jax.jit(
    functools.partial(
      moco.train_step,
      encoders=enc,
      tx=tx,
      loss_cfg=c.loss,
      key_momentum=0.99,
      views=lambda rng, b: two(rng, b["image"], None),
    )
  )
  images = np.random.default_rng(0).integers(0, 256, (BATCH, 8, 8, 3), dtype=np.uint8)
  batch = sharding_lib.global_batch({"image": images}, mesh)
  state, metrics = step(state, batch, {})
  assert int(state.queue_ptr) == BATCH
  assert float(metrics["icl"]) == 0 and float(metrics["soft_vcl"]) == 0
  np.testing.assert_allclose(metrics["loss"], metrics["vcl"], rtol=1e-6)
  np.testing.assert_allclose(metrics["ce"][0], metrics["vcl"], rtol=1e-5)
  assert np.isfinite(metrics["loss"])


# ----------------------------------------------------------------------------- augmentation


def test_full_window_resize_is_the_identity():
  image = jax.random.uniform(jax.random.PRNGKey(0), (8, 8, 3))

  @jax.jit
  def full_window(image):
    u = jnp.full((views.NUM_UNIFORMS,), 0.5)
    window = views.crop_window(u, 8, 8, (1.0, 1.0), (1.0, 1.0))
    return jnp.stack(window), views.resized_crop(image, window, 8)

  window, out = full_window(image)
  np.testing.assert_array_equal(window, [0, 0, 8, 8])
  np.testing.assert_allclose(out, image, atol=1e-6)


def test_crop_windows_fit_the_image_and_the_scale():
  u = jax.random.uniform(jax.random.PRNGKey(0), (200, views.NUM_UNIFORMS))
  top, left, h, w = jax.jit(
    jax.vmap(lambda v: jnp.stack(views.crop_window(v, 32, 24, (0.2, 1.0), (3 / 4, 4 / 3))))
  )(u).T
  assert np.all((top >= 0) & (left >= 0) & (top + h <= 32) & (left + w <= 24))
  area = h * w / (32 * 24)
  assert np.all((area > 0.15) & (area <= 1.0))  # scale (0.2, 1) up to rounding
  assert len(np.unique(np.stack([top, left, h, w]), axis=1).T) > 150  # per-example windows


def test_hsv_round_trip_and_grayscale():
  rgb = jax.random.uniform(jax.random.PRNGKey(0), (64, 3))
  round_trip = jax.jit(lambda x: views.hsv_to_rgb(views.rgb_to_hsv(x)))
  np.testing.assert_allclose(round_trip(rgb), rgb, atol=1e-5)
  spec = views.ViewSpec(jitter=(0.0, 0.0, 0.0, 0.0), grayscale_p=1.0, flip=False)
  image = jax.random.uniform(jax.random.PRNGKey(1), (8, 8, 3))
  gray = jax.jit(
    lambda x: views.augment_view(jnp.zeros((views.NUM_UNIFORMS,)), x, spec, size=8, crop=False)
  )(image)
  np.testing.assert_allclose(gray[..., 0], gray[..., 2], atol=1e-6)
  np.testing.assert_allclose(gray[..., 0], image @ jnp.asarray([0.299, 0.587, 0.114]), atol=1e-6)


def test_two_views_differ_per_view_and_per_example():
  image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  images = jnp.asarray(np.stack([image] * 4))  # four copies of one image
  fn = jax.jit(
    lambda k, x: views.two_views(
      k, x, None, views.MOCO_V2, mean=(0.5,) * 3, std=(0.25,) * 3, size=8
    )
  )
  q, k = fn(jax.random.PRNGKey(0), images)
  assert q.shape == k.shape == (4, 8, 8, 3) and q.dtype == jnp.float32
  assert np.all(np.isfinite(q)) and np.all(np.isfinite(k))
  flat = np.concatenate([np.asarray(q), np.asarray(k)]).reshape(8, -1)
  distinct = {tuple(np.round(row, 4)) for row in flat}
  assert len(distinct) == 8  # every view of every copy is its own random draw
  q2, _ = fn(jax.random.PRNGKey(0), images)
  np.testing.assert_array_equal(q, q2)  # a pure function of the key


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TF/tfds internals
def test_streaming_sources_yield_two_crops_per_image(tmp_path):
  from mcl_jax.data import imagenet
  from mcl_jax.data import tf_lazy

  tf = tf_lazy.tf()
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    for name in ("ant", "bee"):
      os.makedirs(tmp_path / split / name)
      for i in range(2):
        pixels = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
        tf.io.write_file(str(tmp_path / split / name / f"{i}.jpg"), tf.io.encode_jpeg(pixels))
  with pytest.raises(ValueError, match="uint8"):
    imagenet.ImageFolderSource(
      str(tmp_path), image_size=16, output_dtype="float32", two_view_crop_scale=(0.2, 1.0)
    )
  source = imagenet.ImageFolderSource(str(tmp_path), image_size=16, two_view_crop_scale=(0.2, 1.0))
  first = list(
    source.train_batches(0, seed=0, global_batch_size=4, process_index=0, process_count=1)
  )
  again = list(
    source.train_batches(0, seed=0, global_batch_size=4, process_index=0, process_count=1)
  )
  assert len(first) == 1
  batch = first[0]
  assert batch["image"].shape == batch["image2"].shape == (4, 16, 16, 3)
  assert batch["image"].dtype == np.uint8
  assert not np.array_equal(batch["image"], batch["image2"])  # two crops of each image
  np.testing.assert_array_equal(batch["image2"], again[0]["image2"])  # (seed, epoch) only


def test_train_and_embed_steps_compile_once(tmp_path):
  c = tiny_config()
  c.input.synthetic_eval_size = 20  # the last eval batch of 16 is padded
  trainer = jobs.build(c, str(tmp_path))
  trainer.train_steps(3)
  trainer.evaluate()
  result = trainer.evaluate()
  assert result["test"]["knn_top1"].shape == result["test"]["knn_top1_k20"].shape == (2,)
  assert trainer.task.compiled_train_step._cache_size() == 1
  assert trainer.task.compiled_eval_step._cache_size() == 1


def test_co2_adds_its_weighted_term_to_the_first_step(tmp_path):
  """Same seed, same first batch and state: the loss with CO2 on exceeds the loss without
  by exactly weight x the reported co2 term (cross-member pairs on)."""
  plain = jobs.build(tiny_config(), str(tmp_path / "plain"))
  with_co2 = jobs.build(
    tiny_config(**{"loss.co2_weight": 2.0, "loss.co2_cross": True}), str(tmp_path / "co2")
  )
  a, b = plain.train_steps(1)[0], with_co2.train_steps(1)[0]
  assert "co2" not in a and float(b["co2"]) > 0
  np.testing.assert_allclose(float(b["loss"]) - float(a["loss"]), 2.0 * float(b["co2"]), rtol=1e-4)


def test_icl_ramp_and_batch_keys_reach_the_first_step(tmp_path):
  """Same seed, same first batch and state as the plain run: with loss.icl_warmup_epochs
  the ICL and Soft ICL weights are 1 / ramp steps at step 0 (VCL and Soft VCL in full);
  with moco.icl_keys="batch" the ICL terms change and VCL / Soft VCL stay the same."""
  plain = jobs.build(tiny_config(), str(tmp_path / "plain"))
  ramped = jobs.build(tiny_config(**{"loss.icl_warmup_epochs": 25.0}), str(tmp_path / "ramp"))
  batch = jobs.build(tiny_config(**{"moco.icl_keys": "batch"}), str(tmp_path / "batch"))
  a, r, b = (t.train_steps(1)[0] for t in (plain, ramped, batch))
  for name in losses.MCL_TERMS:  # the terms themselves are logged unweighted
    np.testing.assert_allclose(float(r[name]), float(a[name]), rtol=1e-6, err_msg=name)
  scale = 1.0 / (25.0 * ramped.setup.steps_per_epoch)  # (step + 1) / ramp steps at step 0
  assert scale == 0.01  # 4 steps per epoch
  alone = float(r["vcl"]) + float(r["soft_vcl"])  # the tiny config's weights are all 1
  np.testing.assert_allclose(
    float(r["loss"]), alone + scale * (float(r["icl"]) + float(r["soft_icl"])), rtol=1e-6
  )
  assert float(a["loss"]) - float(r["loss"]) > 0.5 * float(a["icl"])  # ICL mostly gone
  for name in ("vcl", "soft_vcl"):
    np.testing.assert_allclose(float(b[name]), float(a[name]), rtol=1e-6, err_msg=name)
  assert abs(float(b["icl"]) - float(a["icl"])) > 0.1


# ----------------------------------------------------------------------------- shuffle-BN


class BatchNormOnly:
  """A one-member stand-in for `moco.MocoEncoders`: a BatchNorm over the flattened images,
  so each output row is its image normalised by the statistics of the batch BN saw."""

  def __init__(self):
    self.bn = moco.layers.BatchNorm(use_running_average=False)

  def init(self, width):
    return self.bn.init(jax.random.PRNGKey(0), jnp.zeros((2, width)))

  def apply_with_hidden(self, variables, images, train):
    assert train
    y, mutated = self.bn.apply(
      variables, images.reshape(images.shape[0], -1), mutable=["batch_stats"]
    )
    return y[None], y[None], mutated["batch_stats"], None

  def apply(self, variables, images, train):
    return self.apply_with_hidden(variables, images, train)[:3]


def normalise_per_group(x, groups):
  """NumPy: rows of x [B, F] normalised by their group's mean and biased variance (BN at
  init: scale 1, bias 0, eps 1e-5), groups = B / G consecutive rows each."""
  g = x.reshape(groups, -1, x.shape[-1])
  mean, var = g.mean(1, keepdims=True), g.var(1, keepdims=True)
  return ((g - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)


def official_shuffled_keys(x, idx_shuffle, encoder, world_size):
  """NumPy re-implementation of the official builder's key path on `world_size` GPUs:
  GPU r holds rows [r b, (r + 1) b) of x; `_batch_shuffle_ddp` gives it
  x_gather[idx_shuffle.view(world, -1)[r]], its encoder normalises over that share, and
  `_batch_unshuffle_ddp` gives it back k_gather[idx_unshuffle.view(world, -1)[r]]."""
  idx_unshuffle = np.argsort(idx_shuffle)
  shuffled_keys = np.concatenate(
    [encoder(x[this]) for this in idx_shuffle.reshape(world_size, -1)]
  )  # all-gathered
  return np.concatenate([shuffled_keys[this] for this in idx_unshuffle.reshape(world_size, -1)])


def test_shuffle_bn_keys_use_each_groups_statistics_over_a_permutation():
  """Keys: BN per group of consecutive images of the PERMUTED batch, returned in the
  original order; queries: BN per group of the batch as it is; running statistics: the
  mean over the groups of each group's update."""
  enc, groups, rng = BatchNormOnly(), 4, jax.random.PRNGKey(3)
  x = np.random.default_rng(0).normal(size=(BATCH, 5)).astype(np.float32) * [1, 2, 3, 4, 5]
  variables = enc.init(5)
  keys, stats = jax.jit(
    functools.partial(moco.compute_keys, enc, shuffle_bn_groups=groups, shuffle_rng=rng)
  )(variables, x)
  perm = np.asarray(jax.random.permutation(rng, BATCH))
  assert not np.array_equal(perm, np.arange(BATCH))
  expected = normalise_per_group(x[perm], groups)[np.argsort(perm)]
  np.testing.assert_allclose(keys[0], expected, atol=1e-4)
  # Not the same as normalising the unpermuted groups, nor the whole batch.
  assert not np.allclose(keys[0], normalise_per_group(x, groups), atol=1e-2)
  assert not np.allclose(keys[0], normalise_per_group(x, 1), atol=1e-2)
  shuffled = x[perm].reshape(groups, -1, 5)
  n = shuffled.shape[1]
  np.testing.assert_allclose(stats["mean"], 0.1 * shuffled.mean(1).mean(0), atol=1e-5)
  np.testing.assert_allclose(
    stats["var"], 0.9 + 0.1 * (shuffled.var(1) * n / (n - 1)).mean(0), atol=1e-5
  )
  queries = moco.apply_in_groups(enc, variables, jnp.asarray(x), groups)[0]
  np.testing.assert_allclose(queries[0], normalise_per_group(x, groups), atol=1e-4)
  # No shuffle-BN (the default of compute_keys and train_step): BN over the whole batch.
  plain, _ = moco.compute_keys(enc, variables, jnp.asarray(x))
  np.testing.assert_allclose(plain[0], normalise_per_group(x, 1), atol=1e-4)


def test_one_group_per_device_is_the_official_per_gpu_shuffle():
  """bn_group_size=0 on 8 devices: 8 groups, and the keys of the batch sharded over the 8
  devices equal the official `_batch_shuffle_ddp` / `_batch_unshuffle_ddp` with 8 GPUs
  and the same permutation."""
  mesh = sharding_lib.make_mesh()
  config = tiny_config(**{"moco.bn_group_size": 0})
  groups = moco.num_bn_groups(config, mesh.size)
  assert groups == mesh.size == 8
  assert moco.num_bn_groups(tiny_config(**{"moco.shuffle_bn": False}), 8) == 0
  assert moco.num_bn_groups(tiny_config(**{"moco.bn_group_size": 4}), 8) == BATCH // 4
  assert moco.num_bn_groups(tiny_config(**{"moco.bn_group_size": 64}), 8) == 1
  enc, rng = BatchNormOnly(), jax.random.PRNGKey(7)
  x = np.random.default_rng(1).normal(size=(BATCH, 3)).astype(np.float32) * [1, 5, 9]
  sharded_x = sharding_lib.global_batch(x, mesh)
  keys, _ = jax.jit(
    functools.partial(moco.compute_keys, enc, shuffle_bn_groups=groups, shuffle_rng=rng)
  )(enc.init(3), sharded_x)
  perm = np.asarray(jax.random.permutation(rng, BATCH))
  official = official_shuffled_keys(
    x, perm, lambda share: normalise_per_group(share, 1), world_size=groups
  )
  np.testing.assert_allclose(keys[0], official, atol=1e-4)


def test_shuffle_bn_step_is_the_same_on_one_and_eight_devices(tmp_path):
  """Groups of `bn_group_size` images (2 groups here) do not depend on the device count;
  the step trains, and shuffle_bn=False compiles today's global-BN step."""
  c = tiny_config(**{"moco.bn_group_size": BATCH // 2})
  eight = jobs.build(c, str(tmp_path / "eight"))
  one = jobs.build(c, str(tmp_path / "one"), mesh=sharding_lib.make_mesh(jax.devices()[:1]))
  assert eight.task.bn_groups == one.task.bn_groups == 2
  batch = next(iter(eight.batches()))[1]
  a, b = jax.device_get(eight.step(batch)), jax.device_get(one.step(batch))
  assert np.isfinite(a["loss"]) and a["embed_cosine"].shape == (2,)
  np.testing.assert_allclose(a["contrastive_vs_chance"], a["ce"] / np.log(1 + QUEUE), rtol=1e-5)
  np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  assert_trees_close(
    jax.device_get(eight.state.key_batch_stats),
    jax.device_get(one.state.key_batch_stats),
    atol=1e-5,
  )
  assert_trees_close(
    jax.device_get(eight.state.params), jax.device_get(one.state.params), atol=1e-5
  )
  off = jobs.build(tiny_config(**{"moco.shuffle_bn": False}), str(tmp_path / "off"))
  assert off.task.bn_groups == 0


def test_bn_groups_must_tile_the_global_batch():
  from mcl_jax import config_lib
  from mcl_jax.errors import ConfigError

  for size in (0, 2, 8, BATCH, 4 * BATCH):  # per device, tiles, one group, one group
    config_lib.validate(tiny_config(**{"moco.bn_group_size": size}))
  config_lib.validate(tiny_config(**{"moco.bn_group_size": 3, "moco.shuffle_bn": False}))
  for size in (1, 3, 12, -8):
    with pytest.raises(ConfigError, match=f"config.moco.bn_group_size={size} "):
      config_lib.validate(tiny_config(**{"moco.bn_group_size": size}))
