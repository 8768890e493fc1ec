"""Backbones: docs/SPEC.md 1 parameter counts, the stage contract, names, dtype."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import models
from mcl_jax.models import Cohort
from mcl_jax.models import count_cohort_params
from mcl_jax.models import count_params

# docs/SPEC.md 1: arch -> (classes, official shared stages for M > 2, one net, M=3, M=4).
SPEC_COUNTS = {
  "resnet32": (100, 2, 472_756, 1_370_620, 1_819_552),
  "resnet56": (100, 2, 861_620, 2_499_836, 3_318_944),
  "resnet110": (100, 2, 1_170_868, 3_401_852, 4_517_344),
  "wrn_16_2": (100, 2, 703_284, 2_043_004, 2_712_864),
  "wrn_40_2": (100, 2, 2_255_156, 6_550_140, 8_697_632),
  "wrn_28_4": (100, 2, 5_872_180, 17_077_244, 22_679_776),
  "resnet18": (1000, 3, 11_689_512, 33_702_392, 44_708_832),
  "resnet34": (1000, 3, 21_797_672, 62_697_208, 83_146_976),
}


def _shapes(module, size=32, x=None):
  """Variable shapes without a real init (big nets stay cheap on a 2-core CPU)."""
  x = jnp.zeros((1, size, size, 3)) if x is None else x
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, False))


@pytest.mark.parametrize("arch", list(SPEC_COUNTS))
def test_param_counts_match_spec(arch):
  classes, shared, one, m3, m4 = SPEC_COUNTS[arch]
  assert count_params(_shapes(models.create(arch, classes))["params"]) == one
  # M = 2 is two independent networks (official ResNet_n / WideResNet_n).
  assert count_cohort_params(_shapes(Cohort(arch, classes, 2))) == 2 * one
  assert count_cohort_params(_shapes(Cohort(arch, classes, 3, shared_stages=shared))) == m3
  assert count_cohort_params(_shapes(Cohort(arch, classes, 4, shared_stages=shared))) == m4


def test_other_counts():
  # torchvision's resnet50; tiny is "a few thousand".
  assert count_params(_shapes(models.create("resnet50", 1000))["params"]) == 25_557_032
  assert count_params(_shapes(models.create("tiny", 10))["params"]) == 4_082


def test_heads_are_counted_only_on_request():
  shapes = _shapes(Cohort("tiny", 10, 3, embed_dim=8))
  heads = 3 * (16 * 8 + 8 + 8 * 8 + 8)
  assert count_cohort_params(shapes, heads=True) == count_cohort_params(shapes) + heads


def test_unknown_arch_names_the_known_ones():
  with pytest.raises(ValueError, match="resnet32.*wrn_16_2|wrn_16_2.*resnet32"):
    models.create("resnet31", 100)


def test_bad_stage_slice_raises():
  with pytest.raises(ValueError, match="stage_slice"):
    _shapes(models.create("resnet32", 10, stage_slice=(2, 9)))


@pytest.mark.parametrize(
  "arch", ["tiny", "tiny_imagenet", "resnet32", "resnet110", "wrn_16_2", "resnet18", "resnet50"]
)
def test_trunk_and_branch_names_partition_the_network(arch):
  """Contract: params of (0, s) and (s, None) merge into exactly those of (0, None)."""
  net = models.create(arch, 7)
  full = _shapes(net)
  for s in range(1, net.num_stages):
    trunk_net = models.create(arch, 7, stage_slice=(0, s))
    h, trunk = jax.eval_shape(
      lambda: trunk_net.init_with_output(  # noqa: B023
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), False
      )
    )
    branch = _shapes(models.create(arch, 7, stage_slice=(s, None)), x=jnp.zeros(h.shape))
    for col in ("params", "batch_stats"):
      t, b = trunk.get(col, {}), branch.get(col, {})
      assert not set(t) & set(b)
      merged = {**t, **b}
      assert jax.tree.map(lambda a: a.shape, merged) == jax.tree.map(lambda a: a.shape, full[col])


def test_stage_slices_compose_numerically():
  net = models.create("tiny", 5)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  variables = net.init(jax.random.PRNGKey(1), x, False)
  logits, features = net.apply(variables, x, False)
  h = models.create("tiny", 5, stage_slice=(0, 1)).apply(variables, x, False)
  assert h.shape == (2, 8, 8, 8)  # feature map after the stem
  logits2, features2 = models.create("tiny", 5, stage_slice=(1, None)).apply(variables, h, False)
  np.testing.assert_allclose(logits2, logits, atol=1e-6)
  np.testing.assert_allclose(features2, features, atol=1e-6)
  assert logits.shape == (2, 5) and features.shape == (2, 16)


def test_tiny_imagenet_is_resnet18_with_one_block_per_group():
  """It stands in for resnet18/34 in smoke runs: same stages, a subset of the same layers."""
  flat = lambda arch: {
    k: v.shape
    for k, v in flax.traverse_util.flatten_dict(  # noqa: E731
      _shapes(models.create(arch, 10))["params"], sep="/"
    ).items()
  }
  small, big = flat("tiny_imagenet"), flat("resnet18")
  assert models.create("tiny_imagenet", 10).num_stages == models.create("resnet18", 10).num_stages
  assert small == {k: big[k] for k in small}
  assert sorted({k.split(".")[0] for k in small}) == sorted({k.split(".")[0] for k in big})
  assert {k.split("/")[0] for k in small if k.startswith("layer")} == {
    f"layer{g}.0" for g in range(1, 5)
  }


def test_pytorch_names():
  names = lambda arch: set(  # noqa: E731
    _flat_names(_shapes(models.create(arch, 10))["params"])
  )
  assert {
    "conv1/kernel",
    "bn1/scale",
    "layer1.0/conv1/kernel",
    "layer2.0/downsample.0/kernel",
    "layer2.0/downsample.1/bias",
    "fc/kernel",
  } <= names("resnet18")
  assert {"layer1.0/downsample.0/kernel", "layer1.0/conv3/kernel", "classifier/bias"} <= names(
    "resnet110"
  )
  assert {
    "conv1/kernel",
    "block1.layer.0/convShortcut/kernel",
    "block2.layer.1/bn2/scale",
    "bn1/scale",
    "fc/kernel",
  } <= names("wrn_16_2")


def _flat_names(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat_names(v, f"{prefix}{k}/")
    else:
      yield f"{prefix}{k}"


def test_compute_dtype_keeps_float32_params():
  net = models.create("tiny", 3, dtype=jnp.bfloat16)
  x = jnp.ones((2, 8, 8, 3))
  variables = net.init(jax.random.PRNGKey(0), x, False)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  logits, features = net.apply(variables, x, False)
  assert logits.dtype == jnp.bfloat16 and features.dtype == jnp.bfloat16


def test_train_mode_updates_batch_stats_eval_does_not():
  net = models.create("tiny", 3)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
  variables = net.init(jax.random.PRNGKey(1), x, False)
  _, upd = net.apply(variables, x, True, mutable=["batch_stats"])
  assert not np.allclose(upd["batch_stats"]["bn1"]["mean"], variables["batch_stats"]["bn1"]["mean"])
  _, upd = net.apply(variables, x, False, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, upd["batch_stats"], variables["batch_stats"])
