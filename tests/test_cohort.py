"""The Cohort: members vs single networks, BN modes, strategies, member export (docs/SPEC.md 1).

Every check runs on `tiny` with M = 3 and a 4x8x8 batch. Compiles dominate on a 2-core
CPU, so each cached helper below jits one program that gathers everything several tests
look at.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import models
from mcl_jax.models import Cohort
from mcl_jax.models import cohort_from_members
from mcl_jax.models import extract_member

M = 3
X = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
TOL = dict(rtol=1e-5, atol=1e-5)
STRATEGIES = ("vmap", "unroll", "map")


def _cohort(shared_stages, strategy="unroll", **kwargs):
  return Cohort("tiny", 5, M, shared_stages=shared_stages, embed_dim=8, strategy=strategy, **kwargs)


def _assert_trees_close(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **(tol or TOL)), a, b)


@functools.cache
def _variables(shared_stages):
  """(init variables, variables after one train-mode pass): stats non-trivial, eval != train."""
  cohort = _cohort(shared_stages)

  def make(key):
    v = cohort.init(key, X, False)
    _, upd = cohort.apply(v, X * 2.0 + 1.0, True, mutable=["batch_stats"])
    return v, {"params": v["params"], "batch_stats": upd["batch_stats"]}

  return jax.jit(make)(jax.random.PRNGKey(1))


def _scalar(out):
  return jnp.sum(out["logits"] ** 2) + jnp.sum(out["embeddings"][..., 0]) + jnp.sum(out["features"])


@functools.cache
def _run(strategy, shared_stages):
  """Outputs, gradients and batch stats of one strategy, train and eval, in one program."""
  cohort = _cohort(shared_stages, strategy)

  def run(v):
    def train_loss(params):
      out, upd = cohort.apply(
        {"params": params, "batch_stats": v["batch_stats"]}, X, True, mutable=["batch_stats"]
      )
      return _scalar(out), (out, upd["batch_stats"])

    def eval_loss(params):
      out = cohort.apply({"params": params, "batch_stats": v["batch_stats"]}, X, False)
      return _scalar(out), out

    grads, (out, stats) = jax.grad(train_loss, has_aux=True)(v["params"])
    eval_grads, eval_out = jax.grad(eval_loss, has_aux=True)(v["params"])
    mut_out, mut_upd = cohort.apply(v, X, False, mutable=["batch_stats"])
    # A keyword `train` on the cohort itself is fine: only lifted transforms drop keywords.
    kw_out = cohort.apply(v, X, train=False)
    return {
      "train": (out, grads, stats),
      "eval": (eval_out, eval_grads),
      "eval_mutable": (mut_out, mut_upd["batch_stats"]),
      "eval_keyword": kw_out,
    }

  return jax.jit(run)(_variables(shared_stages)[1])


@functools.cache
def _members_alone(shared_stages):
  """Each member as a plain single network (extract_member), train and eval."""
  net = models.create("tiny", 5)

  def run(v):
    outs = []
    for m in range(M):
      single = extract_member(v, m, shared_stages)
      train_out, upd = net.apply(single, X, True, mutable=["batch_stats"])
      outs.append(
        {"train": train_out, "stats": upd["batch_stats"], "eval": net.apply(single, X, False)}
      )
    return outs

  return jax.jit(run)(_variables(shared_stages)[1])


@pytest.mark.parametrize("shared_stages", [0, 1])
def test_variable_layout_and_outputs(shared_stages):
  v = _variables(shared_stages)[1]
  assert set(v["params"]) == ({"trunk", "members"} if shared_stages else {"members"})
  assert set(v["params"]["members"]) == {"backbone", "head"}
  assert all(a.shape[0] == M for a in jax.tree.leaves(v["params"]["members"]))
  assert all(a.shape[0] == M for a in jax.tree.leaves(v["batch_stats"]["members"]))
  out = _run("unroll", shared_stages)["eval"][0]
  assert out["logits"].shape == (M, 4, 5) and out["logits"].dtype == jnp.float32
  assert out["embeddings"].shape == (M, 4, 8) and out["embeddings"].dtype == jnp.float32
  assert out["features"].shape == (M, 4, 16)
  np.testing.assert_allclose(jnp.linalg.norm(out["embeddings"], axis=-1), 1.0, atol=1e-5)


def test_bfloat16_compute_keeps_float32_logits_and_params():
  v = _variables(0)[1]
  out = jax.jit(lambda v: _cohort(0, dtype=jnp.bfloat16).apply(v, X, False))(v)
  assert out["logits"].dtype == jnp.float32 and out["embeddings"].dtype == jnp.float32
  assert out["features"].dtype == jnp.bfloat16
  np.testing.assert_allclose(out["logits"], _run("unroll", 0)["eval"][0]["logits"], atol=0.1)


@pytest.mark.parametrize("shared_stages", [0, 1])
def test_members_differ_at_init(shared_stages):
  v = _variables(shared_stages)[0]
  for leaf in jax.tree.leaves(v["params"]["members"]):
    if jnp.all(leaf == leaf[0]):  # BN scale / bias start at constants
      continue
    for a in range(M):
      for b in range(a + 1, M):
        assert not np.allclose(leaf[a], leaf[b])
  kernels = v["params"]["members"]["backbone"]["classifier"]["kernel"]
  assert not np.allclose(kernels[0], kernels[1])


def test_init_is_the_same_for_every_strategy():
  inits = jax.jit(lambda key: [_cohort(1, s).init(key, X, False) for s in ("unroll", "map")])(
    jax.random.PRNGKey(1)
  )
  for v in inits:
    jax.tree.map(np.testing.assert_array_equal, v, _variables(1)[0])


@pytest.mark.parametrize("shared_stages", [0, 1])
def test_cohort_equals_each_member_alone(shared_stages):
  """Member m of the cohort == create(arch) on extract_member(m), in both BN modes."""
  run, alone = _run("unroll", shared_stages), _members_alone(shared_stages)
  out, _, stats = run["train"]
  for m in range(M):
    np.testing.assert_allclose(out["logits"][m], alone[m]["train"][0], **TOL)
    np.testing.assert_allclose(out["features"][m], alone[m]["train"][1], **TOL)
    np.testing.assert_allclose(run["eval"][0]["logits"][m], alone[m]["eval"][0], **TOL)
    np.testing.assert_allclose(run["eval"][0]["features"][m], alone[m]["eval"][1], **TOL)
    if not shared_stages:  # a shared trunk's stats are updated once, by the whole cohort
      member_stats = extract_member({"batch_stats": stats}, m, 0)["batch_stats"]
      _assert_trees_close(member_stats, alone[m]["stats"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_eval_leaves_batch_stats_unchanged(strategy):
  v, run = _variables(1)[1], _run(strategy, 1)
  out, stats = run["eval_mutable"]
  jax.tree.map(np.testing.assert_array_equal, stats, v["batch_stats"])
  _assert_trees_close(out, run["eval"][0], rtol=0, atol=0)
  _assert_trees_close(out, run["eval_keyword"], rtol=0, atol=0)
  # and train mode is really different: batch statistics and updated running stats.
  train_out, _, train_stats = run["train"]
  assert not np.allclose(train_out["logits"], out["logits"])
  for new, old in zip(jax.tree.leaves(train_stats), jax.tree.leaves(v["batch_stats"])):
    assert not np.allclose(new, old)


def test_strategies_agree():
  """Same outputs, gradients and batch-stat updates, train and eval.

  With a trunk (shared_stages=1), so the trunk's gradient sums over members too; the
  member code path is the same without one (checked against single networks above).
  """
  ref = _run("vmap", 1)
  for strategy in ("unroll", "map"):
    got = _run(strategy, 1)
    _assert_trees_close(got["train"], ref["train"])
    _assert_trees_close(got["eval"], ref["eval"])


def test_train_needs_mutable_batch_stats():
  with pytest.raises(Exception, match="batch_stats"):
    jax.eval_shape(lambda v: _cohort(0).apply(v, X, True), _variables(0)[1])


@pytest.mark.parametrize(
  "backend, arch, expected",
  [
    ("gpu", "resnet32", "vmap"),  # measured faster on an H200 (docs/PERFORMANCE.md)
    ("cuda", "resnet110", "vmap"),  # a compile-only GPU device's platform name
    ("gpu", "resnet18", "unroll"),  # measured: unroll faster at 224 px
    ("gpu", "wrn_16_2", "unroll"),  # measured: a tie
    ("tpu", "resnet32", "unroll"),  # XLA:TPU's estimate: unroll as fast or faster
    ("cpu", "resnet32", "unroll"),
    (None, "resnet32", "unroll"),
  ],
)
def test_auto_strategy_per_backend_and_arch(backend, arch, expected):
  assert models.resolve_strategy("auto", backend, arch) == expected
  assert models.resolve_strategy("map", backend, arch) == "map"  # explicit ones stay


def test_unknown_strategy_and_bad_shared_stages():
  with pytest.raises(ValueError, match="strategy"):
    _cohort(0, "pmap").init(jax.random.PRNGKey(0), X, False)
  with pytest.raises(ValueError, match="shared_stages"):
    _cohort(2).init(jax.random.PRNGKey(0), X, False)


@pytest.mark.parametrize("shared_stages", [0, 1])
def test_export_round_trip(shared_stages):
  v = jax.device_get(_variables(shared_stages)[1])
  singles = [extract_member(v, m, shared_stages) for m in range(M)]
  heads = v["params"]["members"]["head"]
  back = cohort_from_members(singles, shared_stages, heads, arch="tiny")
  jax.tree.map(np.testing.assert_array_equal, back, v)
  # a list of per-member heads, and freshly initialised heads of the right shapes
  head_list = [jax.tree.map(lambda a, m=m: a[m], heads) for m in range(M)]
  jax.tree.map(
    np.testing.assert_array_equal,
    cohort_from_members(singles, shared_stages, head_list, arch="tiny"),
    v,
  )
  fresh = cohort_from_members(singles, shared_stages, arch="tiny", embed_dim=8)
  assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, v)
  fresh_heads = fresh["params"]["members"]["head"]["fc1"]["kernel"]
  assert not np.allclose(fresh_heads[0], fresh_heads[1])


def test_cohort_from_independent_members_takes_trunk_from_the_first():
  alone = jax.device_get(_members_alone(0))  # three different networks
  singles = [extract_member(_variables(0)[1], m, 0) for m in range(M)]
  v = cohort_from_members(singles, 1, _variables(0)[1]["params"]["members"]["head"], arch="tiny")
  _assert_trees_close(v["params"]["trunk"]["conv1"], singles[0]["params"]["conv1"])
  for m in range(M):
    got = extract_member(v, m, 1)
    _assert_trees_close(got["params"]["layer1.0"], singles[m]["params"]["layer1.0"])
    _assert_trees_close(got["params"]["bn1"], singles[0]["params"]["bn1"])
  # member 0 keeps its function exactly; the others now sit on member 0's stem.
  out = jax.jit(lambda v: _cohort(1).apply(v, X, False))(v)
  np.testing.assert_allclose(out["logits"][0], alone[0]["eval"][0], **TOL)


def test_extract_member_checks_its_arguments():
  with pytest.raises(ValueError, match="shared_stages"):
    extract_member(_variables(1)[1], 0, 0)
  with pytest.raises(ValueError, match="out of range"):
    extract_member(_variables(0)[1], M, 0)


@pytest.mark.parametrize(
  "head,head_norm", [("linear", "none"), ("none", "none"), ("mlp", "batchnorm")]
)
def test_projection_head_kinds(head, head_norm):
  """'linear': embeddings = normalise(features W + b) exactly; 'none': no head parameters and
  no embeddings (MoCo brings its own projection); 'batchnorm': a BN on the head's input,
  whose running statistics move in train mode."""
  cohort = _cohort(0, head=head, head_norm=head_norm)
  v = cohort.init(jax.random.PRNGKey(0), X, False)
  out = cohort.apply(v, X, False)
  members = v["params"]["members"]
  if head == "none":
    assert "head" not in members and "embeddings" not in out
    return
  if head == "linear":
    fc = members["head"]["fc1"]
    assert set(members["head"]) == {"fc1"} and "head_hidden" not in out
    h = np.einsum("mbf,mfd->mbd", out["features"], fc["kernel"]) + fc["bias"][:, None]
    np.testing.assert_allclose(
      out["embeddings"], h / np.linalg.norm(h, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6
    )
  if head_norm == "batchnorm":
    _, updated = cohort.apply(v, X, True, mutable=["batch_stats"])
    before = v["batch_stats"]["members"]["head"]["bn"]["mean"]
    after = updated["batch_stats"]["members"]["head"]["bn"]["mean"]
    assert not np.allclose(before, after)
  np.testing.assert_allclose(np.linalg.norm(out["embeddings"], axis=-1), 1.0, rtol=1e-5)


def test_unknown_head_is_one_sentence():
  with pytest.raises(ValueError, match="Unknown projection head 'conv'"):
    _cohort(0, head="conv").init(jax.random.PRNGKey(0), X, False)
