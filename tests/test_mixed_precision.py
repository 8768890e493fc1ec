"""model.dtype='bfloat16': bf16 compute; float32 params, optimizer state, BN statistics,
logits, embeddings and contrastive logits (docs/DESIGN.md, Cohort contract).

One real train step (`supervised.train_step`) of the tiny architecture in float32 and in
bfloat16 from the same initial state.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import optim
from mcl_jax import sharding as sharding_lib
from mcl_jax import supervised
from mcl_jax import train_state
from mcl_jax.configs import default
from mcl_jax.data import augment

BATCH, SIZE, CLASSES, MEMBERS = 16, 8, 10, 2


def tiny_config(dtype: str):
  c = default.get_config()
  c.model.arch, c.model.num_classes, c.model.dtype = "tiny", CLASSES, dtype
  c.cohort.num_members = MEMBERS
  c.input.global_batch_size, c.input.image_size = BATCH, SIZE
  return c


def batch():
  rng = np.random.default_rng(0)
  return {
    "image": jnp.asarray(rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), np.uint8)),
    "label": jnp.asarray((np.arange(BATCH) // 2) % CLASSES, jnp.int32),  # class pairs
    "index": jnp.arange(BATCH, dtype=jnp.int32),
  }


def preprocess(rng, images):
  del rng  # No random augmentation: both runs must see the same pixels.
  return augment.normalize(images, augment.CIFAR_MEAN, augment.CIFAR_STD)


@functools.cache
def one_step(dtype: str):
  """(state before, state after, metrics, model) of one step from the shared initial state."""
  config = tiny_config(dtype)
  model = train_state.build_model(config, CLASSES)
  tx, _ = optim.make_optimizer(config, steps_per_epoch=10)
  mesh = sharding_lib.make_mesh(jax.devices()[:1])
  # The initial variables are float32 whatever the compute dtype: same RNG, same values.
  state = train_state.create_train_state(model, tx, (SIZE, SIZE, 3), jax.random.PRNGKey(0), mesh)
  step = jax.jit(
    functools.partial(
      supervised.train_step, model=model, tx=tx, loss_cfg=config.loss, preprocess=preprocess
    )
  )
  new_state, metrics = step(state, batch(), {})
  return state, new_state, jax.device_get(metrics), model


def float_leaves(tree):
  return [
    (jax.tree_util.keystr(path), leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    if jnp.issubdtype(leaf.dtype, jnp.floating)
  ]


def test_bf16_step_losses_match_float32():
  _, _, m32, _ = one_step("float32")
  _, _, m16, _ = one_step("bfloat16")
  names = {"loss", "ce", "vcl", "icl", "soft_vcl", "soft_icl"}
  assert set(m16) == set(m32) >= names
  for name in names:  # Losses only: an argmax tie may flip an accuracy either way.
    assert np.all(np.isfinite(m16[name])), name
    np.testing.assert_allclose(m16[name], m32[name], rtol=5e-2, atol=2e-2, err_msg=name)


def test_bf16_step_update_matches_float32():
  """The parameter update (lr x SGD direction) of a bf16 step is the float32 one, up to
  bf16 rounding of the activations: relative L2 error of the whole update well under 10%."""
  before, after32, _, _ = one_step("float32")
  _, after16, _, _ = one_step("bfloat16")
  d32 = jnp.concatenate(
    [
      (a - b).ravel()
      for a, b in zip(jax.tree.leaves(after32.params), jax.tree.leaves(before.params))
    ]
  )
  d16 = jnp.concatenate(
    [
      (a - b).ravel()
      for a, b in zip(jax.tree.leaves(after16.params), jax.tree.leaves(before.params))
    ]
  )
  assert float(jnp.linalg.norm(d32)) > 0
  assert float(jnp.linalg.norm(d16 - d32) / jnp.linalg.norm(d32)) < 0.1


def test_bf16_step_keeps_state_float32():
  _, state, _, _ = one_step("bfloat16")
  for part in ("params", "opt_state", "batch_stats"):
    leaves = float_leaves(getattr(state, part))
    assert leaves, part
    bad = [(path, leaf.dtype) for path, leaf in leaves if leaf.dtype != jnp.float32]
    assert not bad, f"state.{part} not float32 after a bf16 step: {bad[:5]}"


@functools.cache
def bf16_outputs():
  """The bf16 cohort's outputs in train and in eval mode, {True: ..., False: ...}."""
  state, _, _, model = one_step("bfloat16")
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  @jax.jit
  def apply(x):
    return {
      True: model.apply(variables, x, train=True, mutable=["batch_stats"])[0],
      False: model.apply(variables, x, train=False),
    }

  return apply(preprocess(None, batch()["image"]))


@pytest.mark.parametrize("train_mode", [True, False])
def test_bf16_outputs(train_mode):
  """Logits and embeddings float32 (the contrastive logits are built from them); the
  backbone really computes in bf16 (its pooled features are bf16)."""
  out = bf16_outputs()[train_mode]
  assert out["logits"].dtype == jnp.float32
  assert out["embeddings"].dtype == jnp.float32
  assert out["features"].dtype == jnp.bfloat16
  norms = jnp.linalg.norm(out["embeddings"], axis=-1)
  np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
  assert out["logits"].shape == (MEMBERS, BATCH, CLASSES)


def test_contrastive_logits_float32_from_bf16_embeddings_path():
  """batch_mcl on the float32 embeddings of a bf16 cohort: every term float32 (its
  similarities are float32 einsums at HIGHEST precision inside mcl_jax.losses)."""
  from mcl_jax import losses

  out = bf16_outputs()[False]
  jaxpr = jax.make_jaxpr(functools.partial(losses.batch_mcl, tau=0.1, kd_temperature=3.0))(
    out["embeddings"], batch()["label"]
  )
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert dots and all(v.aval.dtype == jnp.float32 for e in dots for v in e.outvars)
  assert all(aval.dtype == jnp.float32 for aval in jaxpr.out_avals)  # the four terms
