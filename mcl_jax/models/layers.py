"""Building blocks shared by the ResNet / WRN backbones: PyTorch-faithful conv, BN, linear.

Every helper takes an explicit `name`, the PyTorch attribute name of the layer, so that
`'.'.join(flax_module_path)` is the official state-dict path (docs/DESIGN.md). Padding is
always an explicit symmetric pair, as PyTorch pads: Flax's 'SAME' pads a stride-2 3x3 conv
on an even input by (0, 1), PyTorch by (1, 1), which shifts every output pixel.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def conv(features: int, kernel: int, *, stride: int = 1, padding: int = 0, dtype: Dtype,
         name: str, kernel_init: Callable[..., Array] = kaiming_fan_out) -> nn.Conv:
  """A bias-free Conv2d with PyTorch's symmetric `padding` (never 'SAME')."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=False,
                 dtype=dtype, kernel_init=kernel_init, name=name)


def batch_norm(train: bool, *, dtype: Dtype, name: str) -> nn.BatchNorm:
  """BatchNorm2d with PyTorch's defaults: torch momentum 0.1 is Flax momentum 0.9, eps 1e-5."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      name=name)


def linear(features: int, fan_in: int, *, dtype: Dtype, name: str,
           zero_bias: bool = False) -> nn.Dense:
  """nn.Linear with PyTorch's default init (WRN zeroes the classifier bias: `zero_bias`)."""
  bias_init = nn.initializers.zeros if zero_bias else torch_bias_init(fan_in)
  return nn.Dense(features, dtype=dtype, kernel_init=torch_linear_init, bias_init=bias_init,
                  name=name)


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
    raise ValueError(f"stage_slice {tuple(module.stage_slice)} of {type(module).__name__} must "
                     f"satisfy 0 <= start < stop <= {n} (or stop None).")
  return start, end, stop is None
