"""PyTorch <-> Flax weights for every backbone, as numpy dicts; no torch at run time.

The mapping is generic (docs/DESIGN.md, backbone contract): a Flax variable at module path
p (a tuple of names) is the PyTorch tensor `'.'.join(p) + '.' + suffix`, with
  params     kernel 4-D  <-> weight (conv: Flax HWIO, PyTorch OIHW)
             kernel 2-D  <-> weight (linear: Flax (in, out), PyTorch (out, in))
             scale       <-> weight (BatchNorm)
             bias        <-> bias
  batch_stats mean       <-> running_mean
             var         <-> running_var
BatchNorm's `num_batches_tracked` is ignored on the way in and not written on the way out
(PyTorch's BatchNorm fills it in when loading a state dict without it).

Key names are therefore torchvision's for the ImageNet ResNets and the official MCL
single-network classes' for the CIFAR models (`classifier` for the CIFAR ResNets, `fc` for
WRN, `linear` for ShuffleNetV2). Official cohort checkpoints of independent networks
(`ResNet_n`: `module_list.<m>.`) load one member at a time with `prefix`.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from mcl_jax import models

# (collection, Flax leaf name) -> PyTorch suffix.
_SUFFIX = {
  ("params", "kernel"): "weight",
  ("params", "scale"): "weight",
  ("params", "bias"): "bias",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}
_COLLECTIONS = ("params", "batch_stats")
_IGNORED_SUFFIXES = ("num_batches_tracked",)


def _few(names: Any, n: int = 5) -> str:
  names = sorted(names)
  return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _flax_to_torch_array(leaf: str, a: np.ndarray) -> np.ndarray:
  if leaf == "kernel":
    if a.ndim == 4:
      return a.transpose(3, 2, 0, 1)
    if a.ndim == 2:
      return a.T
    raise ValueError(f"A {a.ndim}-D kernel has no PyTorch layout here (conv 4-D, linear 2-D).")
  return a


def _torch_to_flax_array(leaf: str, a: np.ndarray) -> np.ndarray:
  if leaf == "kernel":
    return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T
  return a


def _torch_keys(flat: Mapping[tuple[str, ...], Any]) -> dict[str, tuple[str, ...]]:
  """PyTorch key for every flattened (collection, *module_path, leaf) Flax variable."""
  keys = {}
  for path, _ in flat.items():
    col, *module_path, leaf = path
    if (col, leaf) not in _SUFFIX:
      raise ValueError(f"No PyTorch name for the Flax variable {'/'.join(path)}.")
    keys[".".join(module_path) + "." + _SUFFIX[(col, leaf)]] = path
  return keys


def variable_shapes(arch: str, num_classes: int) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{(collection, *module_path, leaf): shape} of the Flax variables of
  `models.create(arch, num_classes)`, the layout `from_torch` returns and `to_torch` takes
  (flattened with `flax.traverse_util`; jax.eval_shape, no real init)."""
  return dict(_variable_shapes(arch, num_classes))  # a copy: the cached one stays intact


@functools.lru_cache(maxsize=32)
def _variable_shapes(arch: str, num_classes: int) -> dict[tuple[str, ...], tuple[int, ...]]:
  net = models.create(arch, num_classes)
  shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), False))
  flat = traverse_util.flatten_dict({c: shapes[c] for c in _COLLECTIONS if c in shapes})
  return {k: tuple(v.shape) for k, v in flat.items()}


def _infer_num_classes(arch: str, flax_shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> int:
  """num_classes from the classifier: the variables whose shapes depend on it."""
  one, two = variable_shapes(arch, 1), variable_shapes(arch, 2)
  for path in one:
    if one[path] != two[path] and path in flax_shapes:
      axis = next(i for i, (a, b) in enumerate(zip(one[path], two[path])) if a != b)
      return flax_shapes[path][axis]
  raise ValueError(f"Cannot find the classifier of {arch} among the given weights.")


def _checked_template(
  arch: str, flat: Mapping[tuple[str, ...], np.ndarray], num_classes: int | None, what: str
) -> None:
  """Raises ValueError unless `flat` has exactly the variables and shapes of `arch`."""
  shapes = {k: tuple(v.shape) for k, v in flat.items()}
  if num_classes is None:
    num_classes = _infer_num_classes(arch, shapes)
  template = variable_shapes(arch, num_classes)
  missing, unexpected = set(template) - set(shapes), set(shapes) - set(template)
  tkeys = _torch_keys(template)
  by_path = {p: k for k, p in tkeys.items()}
  if missing:
    raise ValueError(
      f"{what} for {arch} lacks {len(missing)} tensors: {_few(by_path[p] for p in missing)}."
    )
  if unexpected:
    names = (".".join(p[1:-1]) + "." + _SUFFIX.get((p[0], p[-1]), p[-1]) for p in unexpected)
    raise ValueError(f"{what} has {len(unexpected)} tensors that {arch} does not: {_few(names)}.")
  wrong = [
    f"{by_path[p]} {shapes[p]} != {template[p]}" for p in template if shapes[p] != template[p]
  ]
  if wrong:
    raise ValueError(
      f"{what} has {len(wrong)} tensors of the wrong shape for {arch} "
      f"(Flax layout, got != expected): {_few(wrong, 3)}."
    )


def from_torch(
  arch: str, state_dict: Mapping[str, Any], *, prefix: str = "", num_classes: int | None = None
) -> dict[str, Any]:
  """Flax variables {'params', 'batch_stats'} of `create(arch, num_classes)` from a state dict.

  Values are numpy arrays (or anything np.asarray takes); the result holds float32 numpy
  arrays. Only keys starting with `prefix` are read, with the prefix removed (e.g.
  'module.' of DataParallel, 'module_list.0.' for member 0 of an official ResNet_n).
  `num_classes` defaults to the classifier's width. Unknown, missing or mis-shaped
  tensors raise ValueError naming a few.
  """
  sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
  if not sd:
    raise ValueError(f"No tensor in the state dict starts with prefix {prefix!r}.")
  if num_classes is None:
    # The classifier is the variable whose shape depends on num_classes (probe 1 vs 2).
    probe = variable_shapes(arch, 1)
    shapes = {}
    for key, path in _torch_keys(probe).items():
      if key in sd:
        shapes[path] = _torch_to_flax_array(path[-1], np.asarray(sd[key])).shape
    num_classes = _infer_num_classes(arch, shapes)
  known = _torch_keys(variable_shapes(arch, num_classes))
  unexpected = [k for k in sd if k not in known and not k.endswith(_IGNORED_SUFFIXES)]
  if unexpected:
    raise ValueError(
      f"The state dict has {len(unexpected)} keys that {arch} does not: {_few(unexpected)}."
    )
  flat = {}
  for key, path in known.items():
    if key in sd:
      flat[path] = np.ascontiguousarray(
        _torch_to_flax_array(path[-1], np.asarray(sd[key], dtype=np.float32))
      )
  _checked_template(arch, flat, num_classes, "The state dict")
  return traverse_util.unflatten_dict(flat)


def to_torch(arch: str, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """PyTorch state dict (contiguous float32 numpy arrays) of a single network's variables.

  Only 'params' and 'batch_stats' are read. Raises ValueError unless the variables are
  exactly those of `create(arch, num_classes)` for some num_classes.
  """
  flat = traverse_util.flatten_dict(
    {c: jax.device_get(variables[c]) for c in _COLLECTIONS if c in variables}
  )
  _checked_template(arch, flat, None, "The variables")
  return {
    key: np.ascontiguousarray(_flax_to_torch_array(path[-1], np.asarray(flat[path], np.float32)))
    for key, path in _torch_keys(flat).items()
  }


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """A state dict from a .safetensors file, as numpy arrays."""
  from safetensors.numpy import load_file

  return load_file(path)


def save_safetensors(path: str, state_dict: Mapping[str, np.ndarray]) -> None:
  """Writes a state dict of numpy arrays to a .safetensors file."""
  from safetensors.numpy import save_file

  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path)
