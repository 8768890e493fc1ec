"""Tests of mcl_jax.memory_bank: init and momentum update (docs/SPEC.md 2.2), on-device sampling of
positives and negatives, and the bank split along N over the 'data' mesh axis or replicated
(bank.layout)."""

import functools
import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from mcl_jax import memory_bank


def unit(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_update(bank, own_idx, z, momentum):
  """docs/SPEC.md 2.2 row by row: V_a[o_i] <- normalize(m V_a[o_i] + (1 - m) z_a[i])."""
  bank = bank.copy()
  for a in range(bank.shape[0]):
    for i, o in enumerate(own_idx):
      row = momentum * bank[a, o] + (1 - momentum) * z[a, i]
      bank[a, o] = row / np.linalg.norm(row)
  return bank


# -------------------------------------------------------------------------------------
# init and update
# -------------------------------------------------------------------------------------


def test_init_range_and_dtype():
  bank = memory_bank.init(jax.random.key(0), 2, 50, 12)
  s = 1 / math.sqrt(12 / 3)
  assert bank.shape == (2, 50, 12) and bank.dtype == jnp.float32
  assert float(jnp.min(bank)) >= -s and float(jnp.max(bank)) <= s
  assert float(jnp.max(jnp.abs(bank))) > 0.9 * s  # spread over the range, not tiny


def test_update_matches_reference(reference):
  bank = jnp.asarray(reference["bank_m2/memory"], jnp.float32)
  z = jnp.asarray(reference["bank_m2/embeddings"], jnp.float32)
  own = jnp.asarray(reference["bank_m2/pos_idx"][:, 0])
  got = jax.jit(memory_bank.update, static_argnums=3)(bank, own, z, 0.5)
  np.testing.assert_allclose(got, reference["bank_m2/memory_after"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("m", [2, 5])
def test_update_matches_numpy_and_detaches(m):
  rng = np.random.default_rng(m)
  bank, z = rng.uniform(-0.5, 0.5, (m, 20, 6)), unit(rng, m, 4, 6)
  own = rng.permutation(20)[:4]
  update = jax.jit(memory_bank.update, static_argnums=3)
  got = update(jnp.asarray(bank, jnp.float32), own, jnp.asarray(z, jnp.float32), 0.3)
  np.testing.assert_allclose(got, np_update(bank, own, z, 0.3), rtol=1e-5, atol=1e-6)
  grad = jax.jit(
    jax.grad(
      lambda z: jnp.sum(memory_bank.update(jnp.asarray(bank, jnp.float32), own, z, 0.3) ** 3)
    )
  )(jnp.asarray(z, jnp.float32))
  assert np.all(np.asarray(grad) == 0.0)


# -------------------------------------------------------------------------------------
# Sampling
# -------------------------------------------------------------------------------------


def test_class_index_table_small():
  labels = np.array([2, 0, 2, 1, 0, 2, 4])
  table = memory_bank.class_index_table(labels)
  np.testing.assert_array_equal(table["sorted_idx"], [1, 4, 3, 0, 2, 5, 6])
  np.testing.assert_array_equal(table["class_start"], [0, 2, 3, 6, 6])
  np.testing.assert_array_equal(table["class_count"], [2, 1, 3, 0, 1])
  assert all(v.dtype == np.int32 for v in table.values())
  with pytest.raises(ValueError, match="num_classes"):
    memory_bank.class_index_table(labels, num_classes=3)


def test_class_index_table_at_imagenet_size():
  labels = np.random.default_rng(0).integers(0, 1000, 1_281_167)
  table = memory_bank.class_index_table(labels)
  c = 123
  block = table["sorted_idx"][table["class_start"][c] :][: table["class_count"][c]]
  np.testing.assert_array_equal(block, np.flatnonzero(labels == c))


def small_dataset():
  """Class sizes 3, 1, 6, 2 (sorted by nothing: labels are shuffled)."""
  labels = np.random.default_rng(1).permutation(np.repeat(np.arange(4), [3, 1, 6, 2]))
  return labels, memory_bank.class_index_table(labels)


def test_sample_indices_classes_and_shapes():
  labels, table = small_dataset()
  own = np.arange(len(labels))
  sample = jax.jit(functools.partial(memory_bank.sample_indices, num_positives=2, num_negatives=50))
  pos_idx, neg_idx = sample(jax.random.key(0), labels[own], own, table)
  assert pos_idx.shape == (12, 3) and neg_idx.shape == (12, 50)
  assert pos_idx.dtype == jnp.int32 and neg_idx.dtype == jnp.int32
  pos_idx, neg_idx = np.asarray(pos_idx), np.asarray(neg_idx)
  np.testing.assert_array_equal(pos_idx[:, 0], own)
  # Positives: same class; distinct when the class has >= 2 examples (drawn without
  # replacement); the single example of class 1 is its own only positive.
  assert np.all(labels[pos_idx[:, 1:]] == labels[own][:, None])
  big = np.bincount(labels)[labels[own]] >= 2
  assert np.all(pos_idx[big, 1] != pos_idx[big, 2])
  # Negatives: any other class, never the own one.
  assert np.all(labels[neg_idx] != labels[own][:, None])


def test_sample_indices_are_uniform():
  labels, table = small_dataset()
  sample = jax.jit(
    functools.partial(memory_bank.sample_indices, num_positives=2, num_negatives=4000)
  )
  own = np.flatnonzero(labels == 2)[:1].repeat(500)  # 500 draws for a class-2 sample
  pos_idx, neg_idx = sample(jax.random.key(1), labels[own], own, table)
  # Negatives: uniform over the 6 examples of other classes (4000 draws, each 1/6).
  counts = np.bincount(np.asarray(neg_idx[0]), minlength=len(labels))
  others = labels != 2
  assert np.all(counts[~others] == 0)
  np.testing.assert_allclose(counts[others] / 4000, 1 / 6, atol=0.03)
  # Positives: every one of the 6 class-2 examples, the sample itself included, is drawn
  # with probability P / 6 = 1/3 per row.
  pos = np.asarray(pos_idx[:, 1:])
  freq = np.array([np.mean(np.any(pos == i, axis=1)) for i in np.flatnonzero(~others)])
  np.testing.assert_allclose(freq, 1 / 3, atol=0.08)


# -------------------------------------------------------------------------------------
# Bank sharded along N
# -------------------------------------------------------------------------------------


def meshes():
  return [Mesh(np.array(jax.devices()[:n]), ("data",)) for n in (1, 8)]


def sharded_inputs(mesh, m=2, n=64, d=4, b=6):
  rng = np.random.default_rng(mesh.size)
  bank = jax.device_put(
    jnp.asarray(rng.normal(size=(m, n, d)), jnp.float32), NamedSharding(mesh, P(None, "data", None))
  )
  return rng, bank


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(compiled):
  return collectives_of(compiled.as_text())


def collectives_of(hlo):
  return {op for op in COLLECTIVES if op in hlo}


@pytest.mark.parametrize("scatter", [False, True])
def test_gather_rows_equals_take(scatter):
  assert len(jax.devices()) == 8
  for mesh in meshes():
    rng, bank = sharded_inputs(mesh)
    idx = rng.integers(0, 64, (8, 9))  # with repeats
    idx[0, :3] = [0, 63, 63]  # first and last rows of the bank
    gather = jax.jit(functools.partial(memory_bank.gather_rows, mesh=mesh, scatter=scatter))
    got = gather(bank, idx)
    np.testing.assert_array_equal(got, np.asarray(bank)[:, idx])
    spec = P(None, "data") if scatter else P()
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, spec), got.ndim)
    if mesh.size == 8:
      # Only the gathered rows travel (one psum or reduce-scatter), never the bank.
      assert collectives(gather.lower(bank, idx).compile()) == (
        {"reduce-scatter"} if scatter else {"all-reduce"}
      )


GATHERS = {
  "sharded": memory_bank.gather_similarities,
  "replicated": memory_bank.gather_similarities_replicated,
}


@pytest.mark.parametrize("layout", memory_bank.LAYOUTS)
def test_gather_similarities_equals_the_unsharded_dot_products_and_gradient(layout):
  for mesh in meshes():
    check_gather_similarities(mesh, layout)


def check_gather_similarities(mesh, layout="sharded"):
  rng, bank = sharded_inputs(mesh)
  bank = jax.device_put(bank, memory_bank.layout_sharding(layout, mesh))
  idx = rng.integers(0, 64, (8, 9))  # with repeats
  idx[0, :3] = [0, 63, 63]  # first and last rows of the bank
  z = jnp.asarray(unit(rng, 2, 8, 4), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(2, 2, 8, 9)), jnp.float32)
  gather = GATHERS[layout]

  def sharded(z, chunk_size=0):
    sims = gather(bank, idx, z, mesh, chunk_size=chunk_size)
    return jnp.sum(weights * sims), sims

  def unsharded(z):
    sims = jnp.einsum(
      "aikd,bid->abik", np.asarray(bank)[:, idx], z, precision=jax.lax.Precision.HIGHEST
    )
    return jnp.sum(weights * sims), sims

  (_, got), got_grad = jax.jit(jax.value_and_grad(sharded, has_aux=True))(z)
  (_, want), want_grad = jax.jit(jax.value_and_grad(unsharded, has_aux=True))(z)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-6)
  assert got.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "data")), 4)
  # In chunks of 4 candidates (9 = 4 + 4 + 1, the last chunk padded): the same values.
  (_, chunked), chunked_grad = jax.jit(
    jax.value_and_grad(lambda z: sharded(z, chunk_size=4), has_aux=True)
  )(z)
  np.testing.assert_allclose(chunked, got, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(chunked_grad, got_grad, rtol=1e-6, atol=1e-6)
  if mesh.size == 8:
    compiled = jax.jit(lambda z: gather(bank, idx, z, mesh)).lower(z).compile()
    if layout == "sharded":
      # Only the [M, M, B, C] similarities travel (reduce-scatter), never rows or the
      # bank; the all-gather is that of the small embeddings z.
      assert collectives(compiled) <= {"reduce-scatter", "all-gather"}
    else:
      # Each device reads its own examples' rows from its copy: nothing travels.
      assert not collectives(compiled)


UPDATES = {"sharded": memory_bank.update_sharded, "replicated": memory_bank.update_replicated}


@pytest.mark.parametrize("layout", memory_bank.LAYOUTS)
def test_update_of_either_layout_equals_update(layout):
  for mesh in meshes():
    rng, bank = sharded_inputs(mesh)
    bank = jax.device_put(bank, memory_bank.layout_sharding(layout, mesh))
    z = jax.device_put(
      jnp.asarray(unit(rng, 2, 8, 4), jnp.float32), NamedSharding(mesh, P(None, "data"))
    )
    own = rng.permutation(64)[:8]
    own[:2] = [0, 63]  # first and last rows of the bank
    update = jax.jit(UPDATES[layout], static_argnums=(3, 4))
    got = update(bank, own, z, 0.5, mesh)
    want = jax.jit(memory_bank.update, static_argnums=3)(np.asarray(bank), own, z, 0.5)
    np.testing.assert_array_equal(got, want)
    assert got.sharding.is_equivalent_to(memory_bank.layout_sharding(layout, mesh), got.ndim)
  # Only the batch's embeddings (split like the batch) are gathered, never bank rows: each
  # device writes the rows it holds (sharded) or all of them to its copy (replicated).
  hlo = update.lower(bank, own, z, 0.5, mesh).compile().as_text()
  assert collectives_of(hlo) == {"all-gather"}
  assert re.findall(r"= f32\[([\d,]+)\]\S* all-gather", hlo) == ["2,8,4"]


def test_sharded_bank_rows_must_split_evenly():
  mesh = meshes()[1]
  with pytest.raises(ValueError, match="multiple of 8"):
    memory_bank.gather_rows(jnp.zeros((2, 60, 4)), np.zeros((2, 3), np.int32), mesh)
  with pytest.raises(ValueError, match="batch size"):
    memory_bank.gather_rows(jnp.zeros((2, 64, 4)), np.zeros((6, 3), np.int32), mesh, scatter=True)


@pytest.mark.parametrize("layout", memory_bank.LAYOUTS)
def test_sharded_bank_step_equals_unsharded(layout):
  """Sample, gather (batch-scattered), loss and update on 8 devices == one device."""
  from mcl_jax import losses

  mesh = meshes()[1]
  labels = np.random.default_rng(2).integers(0, 5, 64)
  table = memory_bank.class_index_table(labels)
  bank = memory_bank.init(jax.random.key(0), 2, 64, 4)
  own = np.random.default_rng(3).permutation(64)[:8]
  z = jnp.asarray(unit(np.random.default_rng(4), 2, 8, 4), jnp.float32)
  kw = dict(tau=0.07, kd_temperature=3.0)

  def step(bank, own, z, sharded):
    pos_idx, neg_idx = memory_bank.sample_indices(
      jax.random.key(5), jnp.asarray(labels)[own], own, table, num_positives=1, num_negatives=7
    )
    if sharded:
      sims = GATHERS[layout](bank, jnp.concatenate([pos_idx, neg_idx], 1), z, mesh)
      out = losses.bank_mcl_from_similarities(sims, num_positives=1, **kw)
      return out, UPDATES[layout](bank, pos_idx[:, 0], z, 0.5, mesh)
    out = losses.bank_mcl(z, bank, pos_idx, neg_idx, **kw)
    return out, memory_bank.update(bank, pos_idx[:, 0], z, 0.5)

  want_out, want_bank = jax.jit(functools.partial(step, sharded=False))(bank, own, z)
  bank = jax.device_put(bank, memory_bank.layout_sharding(layout, mesh))
  z = jax.device_put(z, NamedSharding(mesh, P(None, "data")))
  got_out, got_bank = jax.jit(functools.partial(step, sharded=True))(bank, own, z)
  for key in want_out:
    np.testing.assert_allclose(float(got_out[key]), float(want_out[key]), rtol=1e-6)
  np.testing.assert_array_equal(got_bank, want_bank)
  assert got_bank.sharding.is_equivalent_to(memory_bank.layout_sharding(layout, mesh), 3)
