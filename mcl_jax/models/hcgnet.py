"""HCGNet for CIFAR, as in the official MCL code (`models/hcgnet.py`).

Yang et al., "Gated Convolutional Networks with Hybrid Connectivity for Image
Classification", AAAI 2020. Hybrid connectivity: inside a hybrid block every SMG module
appends `growth_rate` new channels to its input (dense, global connectivity), while the
module's own output is a gated residual mix (local connectivity). Each SMG / transition has
  * a squeeze cell: pre-activation 1x1 conv then 3x3 conv (groups 4 in the SMG, stride 2
    in the transition);
  * a forget gate: spatial-softmax context pooling (`global_forget_context`), then
    fc1 -> BatchNorm1d -> tanh -> fc2 -> sigmoid, scaling the squeezed map channel-wise;
  * an update gate: depthwise 3x3 and dilated depthwise 3x3 paths (`conv_3x3`, `conv_5x5`),
    each context-pooled to a vector, fused by fcall -> BatchNorm1d -> tanh and a
    two-way softmax (fc3x3 / fc5x5) into one vector added to every position.
Reduction / forget factors are 2 / 2 in the SMG and 4 / 4 in the transition.

Stages (the backbone contract of docs/DESIGN.md):
  0  stem        features.conv0 (3x3, 2 * growth_rate[0] channels, no BN/ReLU after it)
  1  block 1     features.HybridBlock1, features.Transition1
  2  block 2     features.HybridBlock2, features.Transition2
  3  block 3     features.HybridBlock3, features.norm5, ReLU
  head           global average pool, classifier
The official M > 2 cohort (`HCGNet_b`) shares `features` = conv0, HybridBlock1 and
Transition1 and gives each member its own HybridBlock2, Transition2, HybridBlock3, norm5
and linear: exactly stages [0, 2) shared.

Layout is NHWC; param paths joined with '.' are the official state-dict keys of `HCGNet`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax.models import layers

Array = jax.Array

# The official file keeps PyTorch's default Conv2d init, U(+-1/sqrt(fan_in)) for weights and
# biases: the same formulas as the default nn.Linear init.
_conv_init = layers.torch_linear_init


def _bn(train: bool, dtype: Any, name: str) -> layers.BatchNorm:
  """BatchNorm1d (on [N, C]) or BatchNorm2d (on [N, H, W, C]), PyTorch's defaults."""
  return layers.batch_norm(train, dtype=dtype, name=name)


def _fc(x: Array, features: int, dtype: Any, name: str) -> Array:
  """The official 1x1 Conv2d (with bias) applied to a pooled [N, C] vector -> [N, features].

  Kept a Conv (kernel [1, 1, C, F]) rather than a Dense so the weight converts like every
  other conv (OIHW <-> HWIO).
  """
  conv = nn.Conv(
    features,
    (1, 1),
    padding=((0, 0), (0, 0)),
    use_bias=True,
    dtype=dtype,
    kernel_init=_conv_init,
    bias_init=layers.torch_bias_init(x.shape[-1]),
    name=name,
  )
  return conv(x[:, None, None, :])[:, 0, 0, :]


def _context_pool(x: Array, dtype: Any, name: str) -> Array:
  """Global context pooling: sum over positions of x weighted by a spatial softmax.

  The weights come from a 1x1 conv C -> 1 (with bias); official: global_pool(x * w) * H * W.
  Returns [N, C].
  """
  n, h, w, c = x.shape
  acc = jnp.promote_types(x.dtype, jnp.float32)  # softmax and sum at >= float32
  logits = nn.Conv(
    1,
    (1, 1),
    padding=((0, 0), (0, 0)),
    use_bias=True,
    dtype=dtype,
    kernel_init=_conv_init,
    bias_init=layers.torch_bias_init(c),
    name=name,
  )(x)
  weights = jax.nn.softmax(logits.reshape(n, h * w).astype(acc), axis=-1)
  return jnp.einsum("npc,np->nc", x.reshape(n, h * w, c).astype(acc), weights).astype(x.dtype)


class BasicConv(nn.Module):
  """Pre-activation conv: BN (`norm`), ReLU, bias-free conv (`conv`)."""

  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  groups: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = nn.relu(_bn(train, self.dtype, "norm")(x))
    p = self.padding
    return nn.Conv(
      self.features,
      (self.kernel, self.kernel),
      strides=(self.stride, self.stride),
      padding=((p, p), (p, p)),
      kernel_dilation=(self.dilation, self.dilation),
      feature_group_count=self.groups,
      use_bias=False,
      dtype=self.dtype,
      kernel_init=_conv_init,
      name="conv",
    )(x)


def _gates(x: Array, train: bool, *, reduction: int, forget: int, dtype: Any) -> Array:
  """The forget and update gates shared by the SMG module and the transition.

  Called inside the compact method of its owner so the layers are named directly under it
  (as in the official modules). x: the squeezed map [N, H, W, C]; returns the same shape.
  """
  c = x.shape[-1]
  # Forget gate: decays the squeezed map (the local residual path) channel-wise.
  gate = _fc(_context_pool(x, dtype, "global_forget_context"), c // forget, dtype, "fc1")
  gate = jnp.tanh(_bn(train, dtype, "bn_forget")(gate))
  gate = nn.sigmoid(_fc(gate, c, dtype, "fc2"))
  # Update gate: two depthwise paths (3x3, and 3x3 with dilation 2 = a 5x5 field), each
  # context-pooled to a vector, mixed per channel by a softmax over the two paths.
  x3 = BasicConv(c, 3, padding=1, groups=c, dtype=dtype, name="conv_3x3")(x, train)
  x5 = BasicConv(c, 3, padding=2, groups=c, dilation=2, dtype=dtype, name="conv_5x5")(x, train)
  v3 = _context_pool(x3, dtype, "global_context3x3")
  v5 = _context_pool(x5, dtype, "global_context5x5")
  att = _fc(jnp.concatenate([v3, v5], axis=-1), 2 * c // reduction, dtype, "fcall")
  att = jnp.tanh(_bn(train, dtype, "bn_attention")(att))
  acc = jnp.promote_types(x.dtype, jnp.float32)
  mix = jax.nn.softmax(
    jnp.stack([_fc(att, c, dtype, "fc3x3"), _fc(att, c, dtype, "fc5x5")]).astype(acc), axis=0
  )
  update = (mix[0] * v3 + mix[1] * v5).astype(x.dtype)
  return x * gate[:, None, None, :] + update[:, None, None, :]


class SMG(nn.Module):
  """Official `_SMG`: returns concat([input, gated new features]) (growth_rate more channels)."""

  growth_rate: int
  bn_size: int = 4
  groups: int = 4
  reduction_factor: int = 2
  forget_factor: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    g = self.growth_rate
    y = BasicConv(self.bn_size * g, 1, dtype=self.dtype, name="conv1_1x1")(x, train)
    y = BasicConv(g, 3, padding=1, groups=self.groups, dtype=self.dtype, name="conv2_3x3")(y, train)
    y = _gates(
      y, train, reduction=self.reduction_factor, forget=self.forget_factor, dtype=self.dtype
    )
    return jnp.concatenate([x, y], axis=-1)


class HybridBlock(nn.Module):
  """Official `_HybridBlock`: SMG1 .. SMG{num_layers}, each adding growth_rate channels."""

  num_layers: int
  growth_rate: int
  bn_size: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    for i in range(self.num_layers):
      x = SMG(self.growth_rate, self.bn_size, dtype=self.dtype, name=f"SMG{i + 1}")(x, train)
    return x


class Transition(nn.Module):
  """Official `_Transition`: squeeze to out_channels at stride 2, then the gates (4 / 4)."""

  out_channels: int
  reduction_factor: int = 4
  forget_factor: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    cin = x.shape[-1]
    mid = cin - (cin - self.out_channels) // 2
    y = BasicConv(mid, 1, dtype=self.dtype, name="conv1_1x1")(x, train)
    y = BasicConv(self.out_channels, 3, stride=2, padding=1, dtype=self.dtype, name="conv2_3x3")(
      y, train
    )
    return _gates(
      y, train, reduction=self.reduction_factor, forget=self.forget_factor, dtype=self.dtype
    )


class HCGNet(nn.Module):
  """CIFAR HCGNet following the backbone contract (docs/DESIGN.md)."""

  num_classes: int
  dtype: Any = jnp.float32
  stage_slice: tuple[int, int | None] = (0, None)
  growth_rate: Sequence[int] = (12, 24, 36)
  block_config: Sequence[int] = (8, 8, 8)
  bn_size: int = 4
  theta: float = 0.5  # transition compression

  num_stages: ClassVar[int] = 4  # stem + 3 hybrid blocks; the head is not a stage.

  @nn.compact
  def __call__(self, x: Array, train: bool):
    start, end, with_head = layers.stage_range(self)
    n = self.num_stages - 1
    if len(self.growth_rate) != n or len(self.block_config) != n:
      raise ValueError(
        f"{type(self).__name__} needs {n} hybrid blocks, got "
        f"growth_rate={self.growth_rate}, block_config={self.block_config}."
      )
    x = x.astype(self.dtype)
    for stage in range(start, end):
      if stage == 0:
        x = nn.Conv(
          2 * self.growth_rate[0],
          (3, 3),
          padding=((1, 1), (1, 1)),
          use_bias=False,
          dtype=self.dtype,
          kernel_init=_conv_init,
          name="features.conv0",
        )(x)
        continue
      i = stage - 1
      x = HybridBlock(
        self.block_config[i],
        self.growth_rate[i],
        self.bn_size,
        dtype=self.dtype,
        name=f"features.HybridBlock{stage}",
      )(x, train)
      if stage < self.num_stages - 1:
        x = Transition(
          int(x.shape[-1] * self.theta), dtype=self.dtype, name=f"features.Transition{stage}"
        )(x, train)
      else:
        x = nn.relu(_bn(train, self.dtype, "features.norm5")(x))
    if not with_head:
      return x
    features = layers.global_avg_pool(x)
    logits = layers.linear(
      self.num_classes, features.shape[-1], dtype=self.dtype, name="classifier"
    )(features)
    return logits, features


def hcgnet_a1(
  num_classes: int,
  *,
  dtype: Any = jnp.float32,
  stage_slice: tuple[int, int | None] = (0, None),
  **kwargs,
) -> HCGNet:
  """HCGNet-A1 (official `hcgnet_A1`): 1,102,651 params at 100 classes."""
  return HCGNet(
    num_classes=num_classes,
    dtype=dtype,
    stage_slice=stage_slice,
    growth_rate=(12, 24, 36),
    block_config=(8, 8, 8),
    **kwargs,
  )


def hcgnet_a2(
  num_classes: int,
  *,
  dtype: Any = jnp.float32,
  stage_slice: tuple[int, int | None] = (0, None),
  **kwargs,
) -> HCGNet:
  """HCGNet-A2 (official `hcgnet_A2`): 3,133,679 params at 100 classes."""
  return HCGNet(
    num_classes=num_classes,
    dtype=dtype,
    stage_slice=stage_slice,
    growth_rate=(24, 36, 64),
    block_config=(8, 8, 8),
    **kwargs,
  )


ARCHS = {
  "hcgnet_a1": hcgnet_a1,
  "hcgnet_a2": hcgnet_a2,
}
