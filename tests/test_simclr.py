"""The in-batch self-supervised regime (SimCLR-MCL): NT-Xent semantics, global-batch
negatives on any device count, the task contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import config_lib
from mcl_jax import jobs
from mcl_jax import losses
from mcl_jax import sharding as sharding_lib
from mcl_jax import simclr
from mcl_jax.configs import moco_r18_x2

pytestmark = pytest.mark.xdist_group("simclr")


def tiny_config(num_members=2):
  """The MoCo smoke config turned into the SimCLR regime: tiny arch, 8x8 synthetic images."""
  c = moco_r18_x2.make(version=2, num_members=num_members, arg="smoke")
  c.trainer = c.loss.regime = "simclr"
  c.loss.tau = 0.5
  c.input.image_size = 8
  c.input.synthetic_train_size = 64
  c.input.synthetic_eval_size = 20
  c.input.global_batch_size = 16
  c.input.eval_batch_size = 16
  c.ssl.views = "fashion_mnist"
  return c


def np_nt_xent(z, tau):
  """SimCLR's NT-Xent over 2B views where rows 2i and 2i + 1 are the two views of image i
  (float64, written from Chen et al. 2020, Eq. 1: the anchor itself left out)."""
  z = np.asarray(z, np.float64)
  n = z.shape[0]
  sims = z @ z.T / tau
  total = 0.0
  for i in range(n):
    partner = i ^ 1
    others = [k for k in range(n) if k != i]
    total += -(sims[i, partner] - np.log(np.sum(np.exp(sims[i, others]))))
  return total / n


def test_interleave_keeps_the_two_views_of_an_image_adjacent():
  x1 = jnp.arange(3.0)[:, None] * jnp.ones((3, 2))
  views, ids = simclr.interleave(x1, x1 + 10)
  np.testing.assert_array_equal(views[:, 0], [0, 10, 1, 11, 2, 12])
  np.testing.assert_array_equal(ids, [0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_one_member_vcl_is_nt_xent(tau):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(1, 12, 5))
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  ids = np.repeat(np.arange(6), 2)
  terms = losses.batch_mcl(
    jnp.asarray(z, jnp.float32), jnp.asarray(ids), tau=tau, kd_temperature=3.0
  )
  np.testing.assert_allclose(terms["vcl"], np_nt_xent(z[0], tau), rtol=1e-5)
  for name in ("icl", "soft_vcl", "soft_icl"):  # no pairs of members with M = 1
    assert float(terms[name]) == 0.0


def test_config_validates_and_the_regime_must_match_the_trainer():
  c = tiny_config()
  config_lib.validate(c, num_devices=8)
  c.loss.regime = "moco"
  with pytest.raises(config_lib.ConfigError, match="trainer"):
    config_lib.validate(c, num_devices=8)


def test_one_and_eight_devices_give_the_same_losses(tmp_path):
  """Negatives come from the global batch: the 8-device step, each device holding 2 images,
  equals the 1-device step over all 16."""
  c = tiny_config()
  eight = jobs.build(c, str(tmp_path / "eight"))
  one = jobs.build(c, str(tmp_path / "one"), mesh=sharding_lib.make_mesh(jax.devices()[:1]))
  assert eight.setup.mesh.size == 8
  m8, m1 = eight.train_steps(2), one.train_steps(2)
  for a, b in zip(m8, m1):
    for name in ("loss", "vcl", "icl", "soft_vcl", "soft_icl", "instance_accuracy"):
      np.testing.assert_allclose(
        np.asarray(a[name]), np.asarray(b[name]), rtol=2e-5, atol=1e-6, err_msg=name
      )
  assert float(m8[0]["vcl"]) > 0 and float(m8[0]["icl"]) > 0
  for x, y in zip(jax.tree.leaves(eight.state.params), jax.tree.leaves(one.state.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5)
  # One trace per shape: the step compiled once for its two calls.
  assert eight.task.compiled_train_step._cache_size() == 1


def test_icl_warmup_epochs_reaches_the_first_step(tmp_path):
  """Same seed, batch and state: with loss.icl_warmup_epochs the first step's ICL and Soft
  ICL weights are 1 / ramp steps (the tiny config's weights are all 1)."""
  plain = jobs.build(tiny_config(), str(tmp_path / "plain"))
  c = tiny_config()
  c.loss.icl_warmup_epochs = 25.0
  ramped = jobs.build(c, str(tmp_path / "ramp"))
  a, r = plain.train_steps(1)[0], ramped.train_steps(1)[0]
  for name in losses.MCL_TERMS:
    np.testing.assert_allclose(float(r[name]), float(a[name]), rtol=1e-6, err_msg=name)
  scale = 1.0 / (25.0 * ramped.setup.steps_per_epoch)
  alone = float(r["vcl"]) + float(r["soft_vcl"])
  np.testing.assert_allclose(
    float(r["loss"]), alone + scale * (float(r["icl"]) + float(r["soft_icl"])), rtol=1e-6
  )
  assert float(a["loss"]) - float(r["loss"]) > 0.5 * float(a["icl"])


def test_fit_monitors_knn_and_writes_an_exportable_checkpoint(tmp_path):
  from mcl_jax import export

  c = tiny_config()
  c.ssl.knn_every_epochs = 1
  result = jobs.run(c, str(tmp_path / "run"))
  knn = result["eval"]["test"]
  assert set(knn) == {"knn_top1", "knn_top1_k20"}
  top1 = knn["knn_top1"]
  assert top1.shape == (2,) and np.all((0 <= top1) & (top1 <= 1))
  assert np.isfinite(result["train"]["loss"])
  # The logged collapse signals: each member's own NT-Xent over log(2B - 1) (the other
  # views of the global batch); summed over members and times that log, VCL.
  train = result["train"]
  ratios = [train[f"contrastive_vs_chance/member_{m}"] for m in range(2)]
  np.testing.assert_allclose(
    sum(ratios) * np.log(2 * c.input.global_batch_size - 1), train["vcl"], rtol=1e-5
  )
  assert "embed_cosine/member_1" in train and "head_dead_units/member_1" in train
  assert result["collapsed"] is None or result["collapsed"]["member"] in (0, 1)
  info = export.export_member(str(tmp_path / "run"), 1, str(tmp_path / "member1"))
  assert info["source"]["trainer"] == "simclr"
