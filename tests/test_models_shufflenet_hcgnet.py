"""ShuffleNetV2 and HCGNet backbones: docs/SPEC.md 1 parameter counts, the stage contract,
PyTorch parity.

Counts use jax.eval_shape (no real init of the big nets). Forward checks run the full
ShuffleNetV2s and a small HCGNet (the same code with few, narrow layers: a full HCGNet has
~840 parameter arrays, and initialising or compiling one takes minutes on a 2-core CPU); the
full HCGNets run with --runslow.
"""

from __future__ import annotations

from collections import OrderedDict
import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax.models import hcgnet
from mcl_jax.models import shufflenetv2

ARCHS = {**shufflenetv2.ARCHS, **hcgnet.ARCHS}

# docs/SPEC.md 1: (one network, M=3 official shared trunk, M=4 official shared trunk, pooled width).
EXPECTED = {
  "shufflenetv2_0.5x": (444_292, 1_317_612, 1_754_272, 1024),
  "shufflenetv2_1x": (1_356_104, 4_006_536, 5_331_752, 1024),
  "hcgnet_a1": (1_102_651, 3_072_501, 4_057_426, 414),
  "hcgnet_a2": (3_133_679, 8_490_699, 11_169_209, 716),
}
OFFICIAL_SHARED_STAGES = 2  # stem + first block group (ShuffleNetV2_b, HCGNet_b)
X_SHAPE = (2, 32, 32, 3)


def small_hcgnet(**kwargs) -> hcgnet.HCGNet:
  """Every HCGNet part (SMG, transition, both gates) with few, narrow layers."""
  return hcgnet.HCGNet(num_classes=10, growth_rate=(4, 8, 8), block_config=(2, 2, 2), **kwargs)


def make(arch: str, **kwargs):
  """The module for a docs/SPEC.md arch name (100 classes) or 'small_hcgnet'."""
  return small_hcgnet(**kwargs) if arch == "small_hcgnet" else ARCHS[arch](100, **kwargs)


@functools.cache
def shapes(arch: str, stage_slice=(0, None), x_shape=X_SHAPE, dtype=jnp.float32):
  """(variables, output) of make(arch, ...) as ShapeDtypeStructs: nothing is computed."""
  module = make(arch, stage_slice=stage_slice, dtype=dtype)
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  out, variables = jax.eval_shape(lambda x: module.init_with_output(jax.random.key(0), x, False), x)
  return variables, out


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def _split_shapes(arch: str, split: int):
  """Shapes of the full net's variables, the trunk (0, split)'s and the branch (split, None)'s."""
  trunk, fmap = shapes(arch, (0, split))
  return shapes(arch)[0], trunk, shapes(arch, (split, None), fmap.shape)[0]


def _merge(a: dict, b: dict) -> dict:
  """Union of two variable dicts whose top-level modules are disjoint (collection by collection)."""
  out = {}
  for col in set(a) | set(b):
    left, right = dict(a.get(col, {})), dict(b.get(col, {}))
    assert not set(left) & set(right), f"trunk and branch share modules in {col}"
    out[col] = {**left, **right}
  return out


def _split_variables(variables: dict, trunk_like: dict) -> tuple[dict, dict]:
  """Splits a full net's variables by the top-level modules that `trunk_like` has."""
  trunk, branch = {}, {}
  for col, tree in variables.items():
    names = trunk_like.get(col, {})
    trunk[col] = {k: v for k, v in tree.items() if k in names}
    branch[col] = {k: v for k, v in tree.items() if k not in names}
  return ({c: t for c, t in trunk.items() if t}, {c: t for c, t in branch.items() if t})


def _shapes_tree(tree):
  return jax.tree_util.tree_map(lambda leaf: (tuple(leaf.shape), jnp.dtype(leaf.dtype)), tree)


def random_variables(variable_shapes, seed: int = 0) -> dict:
  """Numpy-random values for a variables tree (a real init of a big net is slow on CPU).

  Kernels U(+-1/sqrt(fan_in)) as PyTorch's default, non-trivial BN scales and running stats.
  """
  rng = np.random.RandomState(seed)

  def value(path, leaf):
    name = path[-1].key
    if name == "kernel":
      bound = 1.0 / math.sqrt(math.prod(leaf.shape[:-1]))
      v = rng.uniform(-bound, bound, leaf.shape)
    elif name in ("scale", "var"):
      v = rng.uniform(0.5, 1.5, leaf.shape)
    else:  # bias, mean
      v = rng.uniform(-0.3, 0.3, leaf.shape)
    return jnp.asarray(v, jnp.float32)

  return jax.tree_util.tree_map_with_path(value, variable_shapes)


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_param_counts_single_and_official_shared_trunk(arch):
  single, m3, m4, _ = EXPECTED[arch]
  full, trunk, branch = _split_shapes(arch, OFFICIAL_SHARED_STAGES)
  n_full, n_trunk, n_branch = (_count(v["params"]) for v in (full, trunk, branch))
  assert n_full == single
  assert n_trunk + n_branch == n_full
  # M = 2 is two independent networks (2 * single); M > 2 shares stages [0, 2).
  assert n_trunk + 3 * n_branch == m3
  assert n_trunk + 4 * n_branch == m4


# Every split of the cheap nets; the full HCGNets (~1 s per trace here) at the official split,
# their other splits being the same code as small_hcgnet's.
SPLITS = [
  (arch, split)
  for arch in ("shufflenetv2_0.5x", "shufflenetv2_1x", "small_hcgnet")
  for split in (1, 2, 3)
]
SPLITS += [("hcgnet_a1", 2), ("hcgnet_a2", 2)]


@pytest.mark.parametrize("arch,split", SPLITS)
def test_stage_split_variables_merge_into_full_net(arch, split):
  assert make(arch).num_stages == 4
  full, trunk, branch = _split_shapes(arch, split)
  assert _shapes_tree(_merge(trunk, branch)) == _shapes_tree(full)


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_full_size_output_shapes(arch):
  _, _, _, width = EXPECTED[arch]
  _, (logits, features) = shapes(arch)
  assert logits.shape == (2, 100) and features.shape == (2, width)
  assert logits.dtype == jnp.float32 and features.dtype == jnp.float32


@pytest.mark.parametrize("arch", ["shufflenetv2_0.5x", "small_hcgnet"])
def test_bfloat16_compute_keeps_float32_variables(arch):
  variables, (logits, features) = shapes(arch, dtype=jnp.bfloat16)
  assert logits.dtype == jnp.bfloat16 and features.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype("float32")}


def test_param_names_are_the_official_state_dict_keys():
  names = {".".join(p) for p in flax.traverse_util.flatten_dict(shapes("shufflenetv2_1x")[0])}
  assert {
    "params.conv1.kernel",
    "params.bn1.scale",
    "params.layer1.0.conv5.kernel",
    "params.layer2.7.bn3.bias",
    "params.layer3.3.conv2.kernel",
    "params.conv2.kernel",
    "batch_stats.bn2.mean",
    "params.linear.kernel",
  } <= names
  names = {".".join(p) for p in flax.traverse_util.flatten_dict(shapes("hcgnet_a1")[0])}
  assert {
    "params.features.conv0.kernel",
    "params.features.HybridBlock1.SMG1.conv1_1x1.norm.scale",
    "params.features.HybridBlock3.SMG8.conv2_3x3.conv.kernel",
    "params.features.HybridBlock2.SMG4.global_context3x3.bias",
    "batch_stats.features.HybridBlock1.SMG2.bn_forget.var",
    "params.features.Transition2.fcall.kernel",
    "params.features.Transition1.bn_attention.bias",
    "params.features.Transition1.conv_5x5.conv.kernel",
    "batch_stats.features.norm5.mean",
    "params.classifier.kernel",
  } <= names


@pytest.mark.parametrize("arch", ["shufflenetv2_0.5x", "small_hcgnet"])
def test_bad_stage_slice_is_refused(arch):
  for bad in [(2, 2), (3, 1), (0, 5), (-1, None), (4, None)]:
    with pytest.raises(ValueError, match="stage_slice"):
      shapes(arch, bad)


# ----------------------------------------------------------------------------- forward


def _check_forward_and_split(arch: str, num_classes: int):
  x = jax.random.normal(jax.random.key(1), X_SHAPE)
  net = make(arch)
  variables = random_variables(shapes(arch)[0])
  logits, features = net.apply(variables, x, False)
  assert logits.shape == (X_SHAPE[0], num_classes)
  assert np.isfinite(np.asarray(logits)).all() and np.isfinite(np.asarray(features)).all()
  (train_logits, _), updates = net.apply(variables, x, True, mutable=["batch_stats"])
  assert np.isfinite(np.asarray(train_logits)).all()
  for split in range(1, net.num_stages):
    trunk, branch = make(arch, stage_slice=(0, split)), make(arch, stage_slice=(split, None))
    trunk_vars, branch_vars = _split_variables(variables, shapes(arch, (0, split))[0])
    h = trunk.apply(trunk_vars, x, False)
    assert h.shape == shapes(arch, (0, split))[1].shape
    split_logits, split_features = branch.apply(branch_vars, h, False)
    np.testing.assert_allclose(split_logits, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(split_features, features, rtol=1e-5, atol=1e-5)
    # Train mode: the same outputs, and the batch-stat updates of both parts are the full net's.
    h, trunk_upd = trunk.apply(trunk_vars, x, True, mutable=["batch_stats"])
    (split_logits, _), branch_upd = branch.apply(branch_vars, h, True, mutable=["batch_stats"])
    np.testing.assert_allclose(split_logits, train_logits, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      _merge(trunk_upd, branch_upd),
      updates,
    )


@pytest.mark.parametrize("arch", ["shufflenetv2_0.5x", "shufflenetv2_1x", "small_hcgnet"])
def test_forward_and_stage_split(arch):
  _check_forward_and_split(arch, 10 if arch == "small_hcgnet" else 100)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["hcgnet_a1", "hcgnet_a2"])
def test_full_hcgnet_forward_and_stage_split(arch):
  _check_forward_and_split(arch, 100)


def test_channel_shuffle_is_pytorch_nchw_shuffle():
  x = np.arange(2 * 3 * 3 * 12, dtype=np.float32).reshape(2, 12, 3, 3)  # NCHW
  n, c, h, w = x.shape
  ref = x.reshape(n, 2, c // 2, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)
  out = shufflenetv2.channel_shuffle(jnp.asarray(x.transpose(0, 2, 3, 1)), 2)
  np.testing.assert_array_equal(np.asarray(out).transpose(0, 3, 1, 2), ref)


# ----------------------------------------------------------------------------- PyTorch parity
# Our own PyTorch definitions with the official module names (models/shufflenetv2.py and
# models/hcgnet.py of winycg/MCL): random init plus random BN statistics, weights copied by
# name, eval-mode outputs compared.


def _torch_to_flax(state_dict, shapes):
  """Maps a PyTorch state dict onto Flax variables by the joined module path; uses every key."""
  names = {
    "kernel": "weight",
    "bias": "bias",
    "scale": "weight",
    "mean": "running_mean",
    "var": "running_var",
  }
  out, used = {}, set()
  for col, tree in shapes.items():
    flat = {}
    for path, leaf in flax.traverse_util.flatten_dict(tree).items():
      key = ".".join(path[:-1]) + "." + names[path[-1]]
      used.add(key)
      value = state_dict[key].detach().numpy()
      if path[-1] == "kernel":
        # conv OIHW -> HWIO, linear (out, in) -> (in, out)
        value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
      assert value.shape == leaf.shape, (path, value.shape, leaf.shape)
      flat[path] = jnp.asarray(value)
    out[col] = flax.traverse_util.unflatten_dict(flat)
  assert used == {k for k in state_dict if not k.endswith("num_batches_tracked")}
  return out


def _randomize_bn(torch, net):
  for m in net.modules():
    if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
      m.running_mean.uniform_(-0.5, 0.5)
      m.running_var.uniform_(0.5, 2.0)
      m.weight.data.uniform_(0.5, 1.5)
      m.bias.data.uniform_(-0.5, 0.5)


def _assert_parity(torch, tnet, arch: str, x_shape=X_SHAPE):
  torch.manual_seed(0)
  _randomize_bn(torch, tnet)
  tnet.eval()
  x = np.random.RandomState(0).randn(*x_shape).astype(np.float32)  # NHWC
  with torch.no_grad():
    t_logits, t_features = tnet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  variables = _torch_to_flax(tnet.state_dict(), shapes(arch)[0])
  assert _count(variables["params"]) == sum(p.numel() for p in tnet.parameters())
  logits, features = make(arch).apply(variables, jnp.asarray(x), False)
  assert np.abs(np.asarray(logits) - t_logits.numpy()).max() < 1e-4
  assert np.abs(np.asarray(features) - t_features.numpy()).max() < 1e-4


def _torch_shufflenet(torch, out_channels, num_blocks, num_classes):
  nn, F = torch.nn, torch.nn.functional

  def shuffle(x):  # NCHW, 2 groups
    n, c, h, w = x.shape
    return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)

  def conv(cin, cout, k, stride=1, groups=1):
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)

  class Basic(nn.Module):
    def __init__(self, c):
      super().__init__()
      h = c // 2
      self.conv1, self.bn1 = conv(h, h, 1), nn.BatchNorm2d(h)
      self.conv2, self.bn2 = conv(h, h, 3, groups=h), nn.BatchNorm2d(h)
      self.conv3, self.bn3 = conv(h, h, 1), nn.BatchNorm2d(h)

    def forward(self, x):
      h = x.shape[1] // 2
      keep, y = x[:, :h], x[:, h:]
      y = F.relu(self.bn1(self.conv1(y)))
      y = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(y)))))
      return shuffle(torch.cat([keep, y], 1))

  class Down(nn.Module):
    def __init__(self, cin, cout):
      super().__init__()
      mid = cout // 2
      self.conv1, self.bn1 = conv(cin, cin, 3, 2, groups=cin), nn.BatchNorm2d(cin)
      self.conv2, self.bn2 = conv(cin, mid, 1), nn.BatchNorm2d(mid)
      self.conv3, self.bn3 = conv(cin, mid, 1), nn.BatchNorm2d(mid)
      self.conv4, self.bn4 = conv(mid, mid, 3, 2, groups=mid), nn.BatchNorm2d(mid)
      self.conv5, self.bn5 = conv(mid, mid, 1), nn.BatchNorm2d(mid)

    def forward(self, x):
      a = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
      b = F.relu(self.bn3(self.conv3(x)))
      b = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(b)))))
      return shuffle(torch.cat([a, b], 1))

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1, self.bn1 = conv(3, 24, 3), nn.BatchNorm2d(24)
      cin = 24
      for i in range(3):
        blocks = [Down(cin, out_channels[i])] + [
          Basic(out_channels[i]) for _ in range(num_blocks[i])
        ]
        setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        cin = out_channels[i]
      self.conv2, self.bn2 = conv(cin, out_channels[3], 1), nn.BatchNorm2d(out_channels[3])
      self.linear = nn.Linear(out_channels[3], num_classes)

    def forward(self, x):
      x = F.relu(self.bn1(self.conv1(x)))
      x = self.layer3(self.layer2(self.layer1(x)))
      x = F.relu(self.bn2(self.conv2(x)))
      features = x.mean((2, 3))
      return self.linear(features), features

  return Net()


def _torch_hcgnet(torch, growth_rate, block_config, num_classes, bn_size=4):
  nn, F = torch.nn, torch.nn.functional

  class BasicConv(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding=0, groups=1, dilation=1):
      super().__init__()
      self.norm = nn.BatchNorm2d(cin)
      self.conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False)

    def forward(self, x):
      return self.conv(F.relu(self.norm(x)))

  def add_gates(m, c, reduction, forget):
    m.conv_3x3 = BasicConv(c, c, 3, padding=1, groups=c)
    m.conv_5x5 = BasicConv(c, c, 3, padding=2, groups=c, dilation=2)
    m.global_context3x3 = nn.Conv2d(c, 1, 1)
    m.global_context5x5 = nn.Conv2d(c, 1, 1)
    m.fcall = nn.Conv2d(2 * c, 2 * c // reduction, 1)
    m.bn_attention = nn.BatchNorm1d(2 * c // reduction)
    m.fc3x3 = nn.Conv2d(2 * c // reduction, c, 1)
    m.fc5x5 = nn.Conv2d(2 * c // reduction, c, 1)
    m.global_forget_context = nn.Conv2d(c, 1, 1)
    m.bn_forget = nn.BatchNorm1d(c // forget)
    m.fc1 = nn.Conv2d(c, c // forget, 1)
    m.fc2 = nn.Conv2d(c // forget, c, 1)

  def pool(x, context):  # spatial-softmax-weighted sum -> [N, C, 1, 1]
    w = F.softmax(context(x).flatten(1), 1).view(x.shape[0], 1, *x.shape[2:])
    return (x * w).sum((2, 3), keepdim=True)

  def gates(m, x):
    fc = lambda layer, v: layer(v.view(v.shape[0], -1, 1, 1)).flatten(1)  # noqa: E731
    keep = torch.tanh(m.bn_forget(fc(m.fc1, pool(x, m.global_forget_context))))
    keep = torch.sigmoid(fc(m.fc2, keep))
    v3 = pool(m.conv_3x3(x), m.global_context3x3).flatten(1)
    v5 = pool(m.conv_5x5(x), m.global_context5x5).flatten(1)
    att = torch.tanh(m.bn_attention(fc(m.fcall, torch.cat([v3, v5], 1))))
    mix = F.softmax(torch.stack([fc(m.fc3x3, att), fc(m.fc5x5, att)]), 0)
    update = mix[0] * v3 + mix[1] * v5
    return x * keep[:, :, None, None] + update[:, :, None, None]

  class SMG(nn.Module):
    def __init__(self, cin, g):
      super().__init__()
      self.conv1_1x1 = BasicConv(cin, bn_size * g, 1)
      self.conv2_3x3 = BasicConv(bn_size * g, g, 3, padding=1, groups=4)
      add_gates(self, g, 2, 2)

    def forward(self, x):
      return torch.cat([x, gates(self, self.conv2_3x3(self.conv1_1x1(x)))], 1)

  class Transition(nn.Module):
    def __init__(self, cin, cout):
      super().__init__()
      mid = cin - (cin - cout) // 2
      self.conv1_1x1 = BasicConv(cin, mid, 1)
      self.conv2_3x3 = BasicConv(mid, cout, 3, stride=2, padding=1)
      add_gates(self, cout, 4, 4)

    def forward(self, x):
      return gates(self, self.conv2_3x3(self.conv1_1x1(x)))

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      c = 2 * growth_rate[0]
      layers = OrderedDict(conv0=nn.Conv2d(3, c, 3, 1, 1, bias=False))
      for i, (g, n) in enumerate(zip(growth_rate, block_config)):
        layers[f"HybridBlock{i + 1}"] = nn.Sequential(
          OrderedDict((f"SMG{j + 1}", SMG(c + g * j, g)) for j in range(n))
        )
        c += g * n
        if i < len(block_config) - 1:
          layers[f"Transition{i + 1}"] = Transition(c, c // 2)
          c //= 2
      layers["norm5"] = nn.BatchNorm2d(c)
      self.features = nn.Sequential(layers)
      self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
      features = F.relu(self.features(x)).mean((2, 3))
      return self.classifier(features), features

  return Net()


def test_shufflenetv2_1x_matches_pytorch():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  tnet = _torch_shufflenet(torch, (116, 232, 464, 1024), (3, 7, 3), 100)
  _assert_parity(torch, tnet, "shufflenetv2_1x")


def test_small_hcgnet_matches_pytorch():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  tnet = _torch_hcgnet(torch, (4, 8, 8), (2, 2, 2), 10)
  _assert_parity(torch, tnet, "small_hcgnet")


@pytest.mark.slow
def test_hcgnet_a1_matches_pytorch():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  tnet = _torch_hcgnet(torch, (12, 24, 36), (8, 8, 8), 100)
  _assert_parity(torch, tnet, "hcgnet_a1")
