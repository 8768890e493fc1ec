"""Building blocks shared by the ResNet / WRN backbones: PyTorch-faithful conv, BN, linear.

Every helper takes an explicit `name`, the PyTorch attribute name of the layer, so that
`'.'.join(flax_module_path)` is the official state-dict path (docs/DESIGN.md). Padding is
always an explicit symmetric pair, as PyTorch pads: Flax's 'SAME' pads a stride-2 3x3 conv
on an even input by (0, 1), PyTorch by (1, 1), which shifts every output pixel.
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcl_jax import numerics

Array = jax.Array
Dtype = Any

# Official ResNet / WRN conv init: kaiming_normal_(mode='fan_out', nonlinearity='relu'), i.e.
# N(0, 2 / (k * k * out_channels)), untruncated (WRN writes the same as normal_(0, sqrt(2/n))).
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch's default nn.Linear weight init, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Callable[..., Array]:
  """PyTorch's default nn.Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv(
  features: int,
  kernel: int,
  *,
  stride: int = 1,
  padding: int = 0,
  dtype: Dtype,
  name: str,
  kernel_init: Callable[..., Array] = kaiming_fan_out,
) -> nn.Conv:
  """A bias-free Conv2d with PyTorch's symmetric `padding` (never 'SAME')."""
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((padding, padding), (padding, padding)),
    use_bias=False,
    dtype=dtype,
    kernel_init=kernel_init,
    name=name,
  )


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm1d/2d (momentum 0.1, eps 1e-5, affine) on channels-last input.

  Same variables as flax.linen.BatchNorm (params scale/bias, batch_stats mean/var), and the
  same arithmetic in training (batch mean and biased variance E[x^2] - E[x]^2, computed in
  at least float32 over every axis but the last; over the global batch when the batch is sharded)
  and in evaluation, with one difference that makes it PyTorch's: the running variance is
  updated with the UNBIASED batch variance, var * n / (n - 1), n = elements per channel,
  as torch does (Flax's BatchNorm uses the biased one). Running statistics are not
  updated during `init`.
  """

  use_running_average: bool
  momentum: float = 0.1  # PyTorch's convention: new = (1 - momentum) old + momentum batch
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    accum = numerics.accum_dtype(x.dtype)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      xf = x.astype(accum)
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      if not self.is_initializing():
        n = x.size // features
        m = self.momentum
        ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
        ra_var.value = (1.0 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
    y = (x.astype(accum) - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
    return y.astype(self.dtype)


def batch_norm(train: bool, *, dtype: Dtype, name: str) -> BatchNorm:
  """BatchNorm1d/2d with PyTorch's defaults and running-variance rule (`BatchNorm`)."""
  return BatchNorm(use_running_average=not train, dtype=dtype, name=name)


def num_bn_groups(batch: int, group_size: int) -> int:
  """G, the BatchNorm groups of a batch of `batch` images cut into groups of `group_size`
  consecutive images (0, or a size of at least the batch: one group, i.e. the whole batch)."""
  return 1 if group_size <= 0 or group_size >= batch else batch // group_size


def check_bn_group_size(group_size: int, batch: int, field: str, zero_means: str) -> None:
  """ConfigError (one sentence) unless `group_size` images per BN group tile `batch`."""
  from mcl_jax.errors import ConfigError

  # A group of one image has no variance to normalise by; a size at least the batch is
  # one group (BN over the whole batch); otherwise the groups must tile the batch.
  if group_size < 0 or group_size == 1 or (0 < group_size < batch and batch % group_size):
    raise ConfigError(
      f"config.{field}={group_size} must be 0 ({zero_means}), at least 2 and divide "
      f"the global batch {batch}, or be at least the batch (one group)."
    )


def apply_in_bn_groups(
  apply: Callable[[Array], tuple[Any, Any]], images: Array, num_groups: int
) -> tuple[Any, Any]:
  """`apply(images) -> (outputs, batch_stats)` in training mode with BatchNorm statistics
  per group of B / num_groups consecutive images, as PyTorch computes them on each GPU of
  a data-parallel run without SyncBN; outputs come back in batch order.

  The batch is reshaped to [G, B / G, ...] and `apply` vmapped over the groups, so every
  BN layer normalises each group by its own mean and variance. When the groups follow the
  devices (B / G images per device), a group's statistics never leave its device: no
  collective per BN layer, forward or backward. `outputs` is a pytree of cohort-first
  arrays [M, B / G, ...] (None leaves allowed); the new running statistics are the mean
  over the groups of each group's update. One group is `apply(images)` itself.
  """
  if num_groups <= 1:
    return apply(images)
  batch = images.shape[0]
  if batch % num_groups:
    raise ValueError(f"A batch of {batch} cannot be cut into {num_groups} equal BN groups.")
  grouped = images.reshape(num_groups, batch // num_groups, *images.shape[1:])
  outputs, stats = jax.vmap(apply)(grouped)

  def ungroup(a):  # [G, M, B / G, ...] -> [M, B, ...]
    return jnp.moveaxis(a, 0, 1).reshape(a.shape[1], batch, *a.shape[3:])

  return jax.tree.map(ungroup, outputs), jax.tree.map(lambda v: jnp.mean(v, 0), stats)


def linear(
  features: int, fan_in: int, *, dtype: Dtype, name: str, zero_bias: bool = False
) -> nn.Dense:
  """nn.Linear with PyTorch's default init (WRN zeroes the classifier bias: `zero_bias`)."""
  bias_init = nn.initializers.zeros if zero_bias else torch_bias_init(fan_in)
  return nn.Dense(
    features, dtype=dtype, kernel_init=torch_linear_init, bias_init=bias_init, name=name
  )


def max_pool_3x3_s2(x: Array) -> Array:
  """nn.MaxPool2d(3, stride=2, padding=1): the pad is -inf, as in PyTorch."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def global_avg_pool(x: Array) -> Array:
  """AdaptiveAvgPool2d(1) + flatten on NHWC."""
  return jnp.mean(x, axis=(1, 2))


def stage_range(module: nn.Module) -> tuple[int, int, bool]:
  """Checks `module.stage_slice` and returns (start, end, with_head) for the stage loop.

  Stage contract (docs/DESIGN.md): stages [start, stop) run; `stop=None` means every stage
  and then the head (pool + classifier).
  """
  start, stop = module.stage_slice
  n = module.num_stages
  end = n if stop is None else stop
  if not 0 <= start < end <= n:
    raise ValueError(
      f"stage_slice {tuple(module.stage_slice)} of {type(module).__name__} must "
      f"satisfy 0 <= start < stop <= {n} (or stop None)."
    )
  return start, end, stop is None
