"""PyTorch <-> Flax weights: round trips without torch, and eval-mode parity with torch.

The torch networks below are written here, with the official key names (the official MCL
single-network classes for CIFAR, torchvision's for ImageNet); no torchvision needed.
"""

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import convert
from mcl_jax import models


def _random_variables(arch, num_classes, seed=0):
  """Random float32 numpy variables shaped like create(arch) (no init, no compile)."""
  rng = np.random.default_rng(seed)
  shapes = convert.variable_shapes(arch, num_classes)
  flat = {p: rng.standard_normal(s).astype(np.float32) for p, s in shapes.items()}
  return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize(
  "arch,num_classes", [("tiny", 10), ("resnet110", 100), ("wrn_16_2", 100), ("resnet18", 1000)]
)
def test_round_trip_without_torch(arch, num_classes):
  v = _random_variables(arch, num_classes)
  sd = convert.to_torch(arch, v)
  assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in sd.values())
  back = convert.from_torch(arch, sd)  # num_classes read off the classifier
  jax.tree.map(np.testing.assert_array_equal, back, v)
  assert convert.to_torch(arch, back).keys() == sd.keys()


def test_layouts_and_names():
  sd = convert.to_torch("tiny", _random_variables("tiny", 10))
  assert sd["conv1.weight"].shape == (8, 3, 3, 3)  # OIHW
  assert sd["layer1.0.downsample.0.weight"].shape == (16, 8, 1, 1)
  assert sd["classifier.weight"].shape == (10, 16)  # (out, in)
  assert {
    "bn1.weight",
    "bn1.bias",
    "bn1.running_mean",
    "bn1.running_var",
    "layer1.0.downsample.1.running_var",
  } <= set(sd)


def test_errors_name_the_keys():
  sd = convert.to_torch("tiny", _random_variables("tiny", 10))
  sd["layer1.0.bn1.num_batches_tracked"] = np.array(3)  # ignored
  convert.from_torch("tiny", sd)
  with pytest.raises(ValueError, match="layer9.conv.weight"):
    convert.from_torch("tiny", {**sd, "layer9.conv.weight": np.zeros(3)})
  missing = dict(sd)
  del missing["layer1.0.conv2.weight"]
  with pytest.raises(ValueError, match="lacks 1 tensors: layer1.0.conv2.weight"):
    convert.from_torch("tiny", missing)
  with pytest.raises(ValueError, match="wrong shape.*layer1.0.conv2.weight"):
    convert.from_torch("tiny", {**sd, "layer1.0.conv2.weight": np.zeros((16, 16, 1, 1))})
  with pytest.raises(ValueError, match="prefix"):
    convert.from_torch("tiny", sd, prefix="module.")
  with pytest.raises(ValueError, match="lacks"):
    v = _random_variables("tiny", 10)
    del v["params"]["conv1"]
    convert.to_torch("tiny", v)


def test_prefix_and_safetensors(tmp_path):
  v = _random_variables("tiny", 10)
  sd = convert.to_torch("tiny", v)
  path = str(tmp_path / "tiny.safetensors")
  convert.save_safetensors(path, {f"module_list.1.{k}": a for k, a in sd.items()})
  loaded = convert.load_safetensors(path)
  back = convert.from_torch("tiny", loaded, prefix="module_list.1.")
  jax.tree.map(np.testing.assert_array_equal, back, v)


# ---------------------------------------------------------------- torch parity


def _torch_nets():
  torch = pytest.importorskip("torch")
  nn = torch.nn

  class Block(nn.Module):  # torchvision / official BasicBlock
    def __init__(self, cin, planes, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.downsample = None
      if stride != 1 or cin != planes:
        self.downsample = nn.Sequential(
          nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
        )

    def forward(self, x):
      out = torch.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      return torch.relu(out + (x if self.downsample is None else self.downsample(x)))

  def layer(cin, planes, n, stride):
    return nn.Sequential(
      *[Block(cin if i == 0 else planes, planes, stride if i == 0 else 1) for i in range(n)]
    )

  class CifarResNet(nn.Module):  # official models/resnet.py ResNet, BasicBlock
    def __init__(self, n, num_classes):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(16)
      self.layer1, self.layer2, self.layer3 = (
        layer(16, 16, n, 1),
        layer(16, 32, n, 2),
        layer(32, 64, n, 2),
      )
      self.classifier = nn.Linear(64, num_classes)

    def forward(self, x):
      x = torch.relu(self.bn1(self.conv1(x)))
      f = self.layer3(self.layer2(self.layer1(x))).mean((2, 3))
      return self.classifier(f), f

  class ImageNetResNet(nn.Module):  # torchvision resnet18
    def __init__(self, num_classes):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      self.layer1, self.layer2 = layer(64, 64, 2, 1), layer(64, 128, 2, 2)
      self.layer3, self.layer4 = layer(128, 256, 2, 2), layer(256, 512, 2, 2)
      self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
      x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
      f = self.layer4(self.layer3(self.layer2(self.layer1(x)))).mean((2, 3))
      return self.fc(f), f

  class WideBlock(nn.Module):  # official models/wrn.py BasicBlock, dropRate 0
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.bn1 = nn.BatchNorm2d(cin)
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.equal = cin == cout
      self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
      pre = torch.relu(self.bn1(x))
      out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
      return out + (x if self.equal else self.convShortcut(pre))

  class NetworkBlock(nn.Module):
    def __init__(self, n, cin, cout, stride):
      super().__init__()
      self.layer = nn.Sequential(
        *[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
      )

    def forward(self, x):
      return self.layer(x)

  class WideResNet(nn.Module):  # official WideResNet(depth, widen_factor)
    def __init__(self, depth, k, num_classes):
      super().__init__()
      n = (depth - 4) // 6
      self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      self.block1 = NetworkBlock(n, 16, 16 * k, 1)
      self.block2 = NetworkBlock(n, 16 * k, 32 * k, 2)
      self.block3 = NetworkBlock(n, 32 * k, 64 * k, 2)
      self.bn1 = nn.BatchNorm2d(64 * k)
      self.fc = nn.Linear(64 * k, num_classes)

    def forward(self, x):
      x = self.block3(self.block2(self.block1(self.conv1(x))))
      f = torch.relu(self.bn1(x)).mean((2, 3))
      return self.fc(f), f

  return torch, {
    "resnet32": (lambda: CifarResNet(5, 100), 32),
    "wrn_16_2": (lambda: WideResNet(16, 2, 100), 32),
    "resnet18": (lambda: ImageNetResNet(1000), 64),
  }


@pytest.mark.parametrize("arch", ["resnet32", "wrn_16_2", "resnet18"])
def test_torch_parity(arch):
  torch, nets = _torch_nets()
  build, size = nets[arch]
  torch.manual_seed(0)
  net = build()
  with torch.no_grad():  # random BN affine params and running stats
    for mod in net.modules():
      if isinstance(mod, torch.nn.BatchNorm2d):
        mod.weight.uniform_(0.5, 1.5)
        mod.bias.normal_(0.0, 0.1)
        mod.running_mean.normal_(0.0, 0.1)
        mod.running_var.uniform_(0.5, 1.5)
  net.eval()
  x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    want_logits, want_features = (t.numpy() for t in net(torch.from_numpy(x)))

  sd = {k: t.numpy() for k, t in net.state_dict().items()}
  variables = convert.from_torch(arch, sd)
  flax_net = models.create(arch, want_logits.shape[-1])
  logits, features = jax.jit(lambda v, x: flax_net.apply(v, x, False))(
    variables, jnp.asarray(x.transpose(0, 2, 3, 1))
  )
  assert np.max(np.abs(np.asarray(logits) - want_logits)) < 1e-4
  assert np.max(np.abs(np.asarray(features) - want_features)) < 1e-4

  # to_torch writes exactly torch's keys (num_batches_tracked aside) and loads strictly.
  back = convert.to_torch(arch, variables)
  assert set(back) == {k for k in sd if not k.endswith("num_batches_tracked")}
  fresh = build()
  fresh.load_state_dict({k: torch.from_numpy(a) for k, a in back.items()}, strict=True)
  fresh.eval()
  with torch.no_grad():
    np.testing.assert_array_equal(fresh(torch.from_numpy(x))[0].numpy(), want_logits)
