"""The supervised trainer: loss composition, the step, eval, resume, shardings."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mcl_jax import checkpointing
from mcl_jax import jobs
from mcl_jax import losses
from mcl_jax import optim
from mcl_jax import sharding as sharding_lib
from mcl_jax import supervised
from mcl_jax.configs import cifar100_common
from mcl_jax.configs import common
from mcl_jax.configs import default


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The tiny test architecture on synthetic 8x8 data: a jitted step in a second or two."""
  c = common.smoke(cifar100_common.set_variant(cifar100_common.base("tiny"), "mcl_x2"))
  c.model.num_classes = 0
  c.input.image_size = 8
  c.input.synthetic_train_size = 64
  c.input.synthetic_eval_size = 20
  c.input.global_batch_size = 16
  c.input.eval_batch_size = 8
  c.schedule.epochs = 3
  c.schedule.num_train_steps = 0
  c.checkpoint.every_epochs = 1
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def leaves_close(a, b, atol=0.0):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def cohort_outputs(seed: int, members: int):
  """Random logits [M, 8, 5], unit embeddings [M, 8, 4] and 4 classes x 2 labels."""
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=(members, 8, 5)), jnp.float32)
  z = rng.normal(size=(members, 8, 4))
  z = jnp.asarray(z / np.linalg.norm(z, axis=-1, keepdims=True), jnp.float32)
  return logits, z, jnp.asarray(np.repeat(np.arange(4), 2), jnp.int32)


def test_total_loss_weights_each_term():
  logits, z, labels = cohort_outputs(0, members=3)
  cfg = default.get_config().loss
  cfg.logit_kd_weight = 0.5
  cfg.logit_kd_targets = "last"
  total, metrics = supervised.total_loss({"logits": logits, "embeddings": z}, labels, cfg)
  terms = losses.batch_mcl(z, labels, tau=cfg.tau, kd_temperature=cfg.kd_temperature)
  kd = losses.logit_kd(logits, temperature=3.0, targets="last")
  ce = supervised.cross_entropy(logits, labels).sum()
  expected = (
    ce + 0.1 * terms["vcl"] + 0.1 * terms["icl"] + terms["soft_vcl"] + terms["soft_icl"] + 0.5 * kd
  )
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  assert metrics["ce"].shape == (3,) and metrics["accuracy"].shape == (3,)


def test_interactive_scale_weights_icl_and_soft_icl_only():
  logits, z, labels = cohort_outputs(1, members=2)
  cfg = default.get_config().loss
  outputs = {"logits": logits, "embeddings": z}
  full, metrics = supervised.total_loss(outputs, labels, cfg, soft_scale=0.5)
  scaled, _ = supervised.total_loss(outputs, labels, cfg, soft_scale=0.5, interactive_scale=0.01)
  interactive = 0.1 * metrics["icl"] + 0.5 * metrics["soft_icl"]
  np.testing.assert_allclose(full - scaled, 0.99 * interactive, rtol=1e-5)
  alone = metrics["ce"].sum() + 0.1 * metrics["vcl"] + 0.5 * metrics["soft_vcl"]
  np.testing.assert_allclose(scaled, alone + 0.01 * interactive, rtol=1e-6)


def test_icl_warmup_epochs_reaches_the_first_step(tmp_path):
  """Same seed, batch and state: with loss.icl_warmup_epochs the first step's ICL and Soft
  ICL weights are 1 / ramp steps, every other term is weighted as in the plain run."""
  plain = jobs.build(tiny_config(), str(tmp_path / "plain"))
  ramped = jobs.build(tiny_config(**{"loss.icl_warmup_epochs": 25.0}), str(tmp_path / "ramp"))
  a, r = plain.train_steps(1)[0], ramped.train_steps(1)[0]
  for name in ("vcl", "icl", "soft_vcl", "soft_icl"):
    np.testing.assert_allclose(float(r[name]), float(a[name]), rtol=1e-6, err_msg=name)
  scale = 1.0 / (25.0 * ramped.setup.steps_per_epoch)
  w = ramped.setup.config.loss
  assert w.soft_warmup_epochs == 0.0 and w.icl_weight > 0 and w.soft_icl_weight > 0
  interactive = w.icl_weight * float(r["icl"]) + w.soft_icl_weight * float(r["soft_icl"])
  np.testing.assert_allclose(
    float(a["loss"]) - float(r["loss"]), (1 - scale) * interactive, rtol=1e-4
  )


def test_baseline_computes_no_mcl_terms():
  cfg = default.get_config().loss
  cfg.vcl_weight = cfg.icl_weight = cfg.soft_vcl_weight = cfg.soft_icl_weight = 0.0
  logits = jnp.zeros((2, 4, 3))
  total, metrics = supervised.total_loss(
    {"logits": logits, "embeddings": jnp.full((2, 4, 2), jnp.nan)}, jnp.zeros(4, jnp.int32), cfg
  )
  assert "vcl" not in metrics and np.isfinite(total)  # NaN embeddings never reached the loss
  np.testing.assert_allclose(total, 2 * np.log(3), rtol=1e-6)


@pytest.mark.parametrize(
  "kind,boundaries,expected",
  [
    ("cosine", (), [0.1, 0.1, 0.05, 0.05, 0.0]),
    ("step", (1, 2), [0.1, 0.1, 0.01, 0.01, 0.001]),
  ],
)
def test_schedule_is_set_once_per_epoch(kind, boundaries, expected):
  c = default.get_config()
  c.schedule.kind, c.schedule.epochs, c.schedule.boundaries = kind, 2, boundaries
  schedule = optim.learning_rate_schedule(c, steps_per_epoch=2)
  got = [float(schedule(s)) for s in range(5)]
  np.testing.assert_allclose(got, expected, atol=1e-7)


def test_smoke_run_trains_and_reports_every_member(tmp_path):
  c = tiny_config()
  c.schedule.num_train_steps = 6
  result = jobs.run(c, str(tmp_path))
  top1 = result["eval"]["test"]["top1"]
  assert top1.shape == (3,)  # 2 members + ensemble
  assert np.all((0 <= top1) & (top1 <= 1))
  for name in ("loss", "vcl", "icl", "soft_vcl", "soft_icl", "ce/member_0", "ce/member_1"):
    assert np.isfinite(result["train"][name]), name
  assert (tmp_path / "checkpoints").is_dir()


def test_resume_equals_uninterrupted_run(tmp_path):
  """Stop after 3 steps (mid-epoch: 4 steps per epoch), restart the same command: the final
  state equals that of a run that never stopped, bit for bit."""
  c = tiny_config()
  c.schedule.num_train_steps = 6
  full = jobs.build(c, str(tmp_path / "full"))
  full.train_steps()

  interrupted = tiny_config()
  interrupted.schedule.num_train_steps = 3
  jobs.run(interrupted, str(tmp_path / "resumed"))
  resumed_cfg = tiny_config()
  resumed_cfg.schedule.num_train_steps = 6
  result = jobs.run(resumed_cfg, str(tmp_path / "resumed"))
  assert result["steps"] == 6
  restarted = jobs.build(resumed_cfg, str(tmp_path / "resumed"))
  assert restarted.restore(checkpointing.Checkpointer(str(tmp_path / "resumed")))
  assert int(restarted.state.step) == 6
  leaves_close(restarted.state.params, full.state.params)
  leaves_close(restarted.state.batch_stats, full.state.batch_stats)
  leaves_close(restarted.state.opt_state, full.state.opt_state)


def test_sharded_step_equals_single_device(tmp_path):
  c = tiny_config()
  eight = jobs.build(c, str(tmp_path / "a"))
  one = jobs.build(c, str(tmp_path / "b"), mesh=sharding_lib.make_mesh(jax.devices()[:1]))
  assert eight.setup.mesh.size == 8
  m8 = eight.train_steps(2)
  m1 = one.train_steps(2)
  np.testing.assert_allclose(m8[-1]["loss"], m1[-1]["loss"], rtol=1e-5)
  leaves_close(eight.state.params, one.state.params, atol=1e-5)


def test_state_is_replicated_and_step_compiles_once(tmp_path):
  c = tiny_config()
  trainer = jobs.build(c, str(tmp_path))
  for leaf in jax.tree.leaves(trainer.state):
    assert leaf.sharding.is_fully_replicated
  trainer.train_steps(3)
  assert trainer.task.compiled_train_step._cache_size() == 1


def test_eval_is_exact_with_fixed_logits_and_a_padded_last_batch(tmp_path):
  """Zero classifier weights make every member's logits its bias, the same for every image:
  the expected accuracies follow from the labels alone. 21 test images over an eval
  batch of 8 leave a padded last batch, which must not count."""
  c = tiny_config()
  c.input.synthetic_eval_size = 21
  run = jobs.build(c, str(tmp_path))
  params = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), run.state.params)
  classifier = params["members"]["backbone"]["classifier"]
  classifier["kernel"][:] = 0.0
  ranking = np.zeros((2, 10))
  ranking[0] = np.arange(10)[::-1]  # member 0: class 0 first, then 1, 2, ...
  ranking[1, [3, 0, 1, 2, 4, 5, 6, 7, 8, 9]] = 4.0 * np.arange(10)[::-1]  # 3, then 0, 1...
  classifier["bias"][:] = ranking
  run.state = run.state.replace(
    params=jax.device_put(params, jax.tree.map(lambda x: x.sharding, run.state.params))
  )
  acc = run.evaluate()["test"]
  labels = np.asarray(run.setup.source.eval_splits()["test"][1])
  assert labels.shape == (21,)
  in_top = lambda classes: np.isin(labels, classes).mean()
  ensemble = ranking.mean(0)  # the mean of the members' logits
  top5_ensemble = np.argsort(-ensemble)[:5]
  assert np.argmax(ensemble) == 3 and np.unique(ensemble).size == 10  # no ties
  np.testing.assert_allclose(
    acc["top1"], [in_top([0]), in_top([3]), in_top([3])], rtol=0, atol=1e-7
  )
  np.testing.assert_allclose(
    acc["top5"],
    [in_top([0, 1, 2, 3, 4]), in_top([3, 0, 1, 2, 4]), in_top(top5_ensemble)],
    rtol=0,
    atol=1e-7,
  )


def test_eval_step_compiles_once_for_a_padded_split(tmp_path):
  c = tiny_config()
  c.input.synthetic_eval_size = 21
  run = jobs.build(c, str(tmp_path))
  run.evaluate()
  run.evaluate()
  assert run.task.compiled_eval_step._cache_size() == 1  # the padded last batch keeps the shape


def test_members_see_the_same_batch_but_differ(tmp_path):
  trainer = jobs.build(tiny_config(), str(tmp_path))
  history = trainer.train_steps(1)
  ce = np.asarray(history[0]["ce"])
  assert ce.shape == (2,) and ce[0] != ce[1]  # different inits, same data


def tiny_bank_config() -> ml_collections.ConfigDict:
  """imagenet_r18_x3's smoke recipe (memory bank) on two tiny float32 members."""
  from mcl_jax.configs import imagenet_r18_x3

  c = imagenet_r18_x3.get_config("smoke")
  c.model.arch, c.model.shared_stages, c.input.image_size = "tiny", 1, 8
  c.cohort.num_members, c.model.dtype = 2, "float32"
  c.input.synthetic_train_size = 64
  return c


@pytest.mark.parametrize("regime", ["batch", "bank"])
def test_step_logs_each_members_collapse_signals(regime, tmp_path):
  """embed_cosine, head_dead_units and contrastive_vs_chance [M]: the member's own VCL
  over log(candidates), B - 1 in the batch, P + K in the bank; summed over members and
  times that log, the ratios give back VCL."""
  c = tiny_config() if regime == "batch" else tiny_bank_config()
  trainer = jobs.build(c, str(tmp_path))
  metrics = jax.device_get(trainer.train_steps(1)[0])
  members = c.cohort.num_members
  for name in ("embed_cosine", "head_dead_units", "contrastive_vs_chance"):
    assert metrics[name].shape == (members,) and np.all(np.isfinite(metrics[name])), name
  candidates = (
    c.input.global_batch_size - 1
    if regime == "batch"
    else c.bank.num_positives + c.bank.num_negatives
  )
  np.testing.assert_allclose(
    metrics["contrastive_vs_chance"].sum() * np.log(candidates), metrics["vcl"], rtol=1e-4
  )


def test_bn_groups_normalise_each_group_by_its_own_statistics():
  """layers.apply_in_bn_groups == the cohort applied to each group of consecutive images on
  its own (outputs in batch order), running statistics the mean of the groups' updates."""
  from mcl_jax import train_state
  from mcl_jax.models import layers

  c = tiny_config()
  model = train_state.build_model(c, 10)
  images = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(0), images, train=False)

  def forward(x):
    out, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return out, mutated["batch_stats"]

  grouped, stats = layers.apply_in_bn_groups(forward, images, 2)
  (first, stats_a), (second, stats_b) = forward(images[:4]), forward(images[4:])
  for key in ("logits", "embeddings"):
    want = np.concatenate([first[key], second[key]], axis=1)  # cohort-first [M, B, ...]
    np.testing.assert_allclose(grouped[key], want, rtol=1e-5, atol=1e-6)
  leaves_close(stats, jax.tree.map(lambda a, b: (a + b) / 2, stats_a, stats_b), atol=1e-6)
  whole, _ = forward(images)
  assert not np.allclose(whole["logits"], grouped["logits"], atol=1e-3)


def test_bn_groups_follow_the_config_not_the_devices_and_need_no_bn_collectives(tmp_path):
  """model.bn_group_size: the same step on 1 and 8 devices (the groups are the config's);
  with one group per device the compiled step drops the per-layer BN all-reduces."""
  grouped = tiny_config(**{"model.bn_group_size": 2})  # 16 images: one group per device
  eight = jobs.build(grouped, str(tmp_path / "a"))
  one = jobs.build(grouped, str(tmp_path / "b"), mesh=sharding_lib.make_mesh(jax.devices()[:1]))
  global_bn = jobs.build(tiny_config(), str(tmp_path / "c"))

  def all_reduces(trainer):
    ((_, batch),) = [next(iter(trainer.batches()))]
    task = trainer.task
    hlo = task.compiled_train_step.lower(trainer.state, batch, task.consts).compile().as_text()
    return len(re.findall(r"\ball-reduce(-start)?\(", hlo))

  fewer, more = all_reduces(eight), all_reduces(global_bn)
  m8, m1, mg = eight.train_steps(2), one.train_steps(2), global_bn.train_steps(2)
  np.testing.assert_allclose(m8[-1]["loss"], m1[-1]["loss"], rtol=1e-5)
  leaves_close(eight.state.params, one.state.params, atol=1e-5)
  leaves_close(eight.state.batch_stats, one.state.batch_stats, atol=1e-5)
  assert abs(float(m8[0]["loss"]) - float(mg[0]["loss"])) > 1e-4  # groups of 2 != global BN
  assert fewer < more, (fewer, more)


@pytest.mark.parametrize("size", [-2, 1, 3, 6])
def test_bn_group_size_must_tile_the_batch(size):
  from mcl_jax import config_lib

  with pytest.raises(config_lib.ConfigError, match=f"config.model.bn_group_size={size}"):
    config_lib.validate(tiny_config(**{"model.bn_group_size": size}))
  config_lib.validate(tiny_config(**{"model.bn_group_size": 64}))  # >= the batch: one group
