"""Orbax checkpoints of the whole train state, with automatic and elastic resume.

The state (params, BN statistics, optimizer state, step, RNG, and the memory bank or MoCo
queues when the trainer has them) is one pytree saved under `<workdir>/checkpoints/<step>`
with a JSON `meta` item (what export needs, and the config that wrote it). Saves are
asynchronous; the manager writes to a temporary directory and renames it when complete,
so a process killed mid-save leaves the previous checkpoint as the latest complete one and
the next run deletes the half-written directory (tests/test_multihost.py kills a run
mid-save).

Restoring targets the abstract state WITH ITS SHARDINGS, so a run resumes on any number
of devices: every leaf comes back laid out for the current mesh. The one leaf whose SHAPE
depends on the device count, the memory bank (its rows zero-padded to a multiple of the
device count), is read on the host and re-padded (`restore`). A newest checkpoint that
cannot be read (a truncated file) is reported in one sentence and the one before it is
used (`restore_latest`).
"""
from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  if "://" in workdir:
    return workdir.rstrip("/") + "/checkpoints"
  # Orbax's TensorStore writer rejects a relative path, and only at the first save.
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class StateMismatchError(ValueError):
  """A checkpoint whose arrays do not fit the state being restored (another experiment)."""


class Checkpointer:
  """Keep-N async checkpoints of a train state; `restore_latest` resumes where a run stopped."""

  def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True,
               read_only: bool = False):
    # cleanup_tmp_directories: without it a half-written step directory stays until that
    # same step is saved again, which never happens if the save schedule changed.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only, read_only=read_only)
    self.directory = checkpoint_dir(workdir)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any] | None = None, *,
           force: bool = True) -> None:
    self._manager.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})),
        force=force)

  def steps(self) -> list[int]:
    """The complete checkpoints' steps, oldest first."""
    return sorted(self._manager.all_steps())

  def meta(self, step: int) -> dict[str, Any]:
    """The JSON meta item of checkpoint `step` alone (no state is read)."""
    from etils import epath
    path = epath.Path(self.directory) / str(int(step)) / "meta" / "metadata"
    try:  # The file Orbax's JSON handler writes; read directly, the state left alone.
      return dict(json.loads(path.read_text()) or {})
    except (OSError, ValueError):
      restored = self._manager.restore(
          int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return dict(restored["meta"] or {})

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """(state, meta) of checkpoint `step`, laid out as `abstract_state` (a pytree of
    jax.ShapeDtypeStruct with shardings, or of real arrays).

    A leaf stored with another length along one axis than the target's (the memory bank,
    whose rows are zero-padded to a multiple of the device count, restored on another
    device count) is read on the host and zero-padded or cropped to the target, which
    may only drop rows that are zero.
    """
    target = jax.tree.map(_as_abstract, abstract_state)
    stored = self._manager.item_metadata(int(step))["state"]
    stored = getattr(stored, "tree", stored)
    stored_shapes = {_key(p): tuple(m.shape) for p, m in
                     jax.tree_util.tree_flatten_with_path(stored)[0] if hasattr(m, "shape")}
    paths, treedef = jax.tree_util.tree_flatten_with_path(target)
    missing = [_key(p) for p, _ in paths if _key(p) not in stored_shapes]
    if missing or len(stored_shapes) != len(paths):
      raise StateMismatchError(
          f"the checkpoint holds {len(stored_shapes)} arrays, this state {len(paths)}"
          + (f" ({missing[0]} is not in the checkpoint)" if missing else ""))
    resized, leaves = {}, []
    for path, leaf in paths:
      key = _key(path)
      shape = stored_shapes[key]
      if shape != tuple(leaf.shape):
        if len(shape) != len(leaf.shape) or sum(a != b for a, b in zip(shape, leaf.shape)) != 1:
          raise StateMismatchError(f"{key} is {shape} in the checkpoint and {tuple(leaf.shape)} "
                                   "in this state")
        resized[key] = leaf
        leaf = np.zeros(shape, leaf.dtype)  # read this leaf on the host
      leaves.append(leaf)
    restored = self._manager.restore(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.tree.unflatten(treedef, leaves)),
            meta=ocp.args.JsonRestore()))
    state = restored["state"]
    if resized:
      flat, treedef = jax.tree_util.tree_flatten_with_path(state)
      state = jax.tree.unflatten(treedef, [
          _fit(np.asarray(x), resized[_key(p)]) if _key(p) in resized else x
          for p, x in flat])
    return state, dict(restored["meta"] or {})

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """The newest checkpoint that can be read; None when there is none.

    A newest checkpoint that cannot be read (a truncated or corrupted file) is reported
    with one warning and the previous one is tried.
    """
    steps = self.steps()
    for i, step in enumerate(reversed(steps)):
      try:
        return self.restore(step, abstract_state)
      except StateMismatchError:
        raise  # another experiment's state: no older checkpoint would fit either
      except Exception as e:  # noqa: BLE001 -- Orbax/TensorStore raise many kinds
        if i + 1 == len(steps):
          raise RuntimeError(
              f"No checkpoint in {self.directory} could be read (step {step}: "
              f"{type(e).__name__}); move the folder away to start afresh.") from e
        logging.warning("The checkpoint of step %d in %s could not be read (%s); resuming "
                        "from the one before it.", step, self.directory, first_line(e))
    return None

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _key(path: tuple[Any, ...]) -> str:
  """A leaf's path as 'a/b/0', whether its steps are attributes (the live TrainState) or
  dict keys (the tree Orbax stored): the two name the same leaf differently."""
  names = []
  for entry in path:
    for field in ("name", "key", "idx"):
      if hasattr(entry, field):
        names.append(str(getattr(entry, field)))
        break
    else:
      names.append(str(entry))
  return "/".join(names)


def _as_abstract(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _fit(value: np.ndarray, target: jax.ShapeDtypeStruct) -> jax.Array:
  """`value` zero-padded or cropped (zero rows only) to `target`'s shape, then placed with
  its sharding."""
  for axis, (have, want) in enumerate(zip(value.shape, target.shape)):
    if have > want:
      if np.any(np.take(value, np.arange(want, have), axis=axis)):
        raise ValueError(f"A checkpoint leaf of shape {value.shape} cannot be cropped to "
                         f"{target.shape}: the rows it would drop are not padding.")
      value = np.take(value, np.arange(want), axis=axis)
    elif have < want:
      widths = [(0, 0)] * value.ndim
      widths[axis] = (0, want - have)
      value = np.pad(value, widths)
  if target.sharding is None:
    return jax.numpy.asarray(value)
  return jax.make_array_from_callback(target.shape, target.sharding, lambda i: value[i])


def first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__
