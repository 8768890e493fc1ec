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

A save that runs out of disk space (ENOSPC, or a quota: on a background thread, so it
surfaces when the next save or the end of the run waits for it) removes what it had
written of its step and raises `DiskFullError`, one sentence naming that step and the
newest complete checkpoint, which a rerun resumes from (tests/test_faults.py).
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import errno
import json
import os
import threading
import time
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


class DiskFullError(RuntimeError):
  """A checkpoint could not be written for lack of space; its partial files are removed and
  the message names the newest complete checkpoint, which a rerun resumes from."""


# How long a failed save's files are given to stop changing, and how long they must have
# stayed removed (docs in Checkpointer._discard).
_DISCARD_WAIT_S = 60.0
_DISCARD_SETTLE_S = 0.5
_DISK_FULL_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def disk_full_reason(error: BaseException) -> str | None:
  """'no space left on device' (or 'disk quota exceeded') when `error` or an error it was
  raised from is one; None otherwise. TensorStore, which writes the arrays, reports it as a
  ValueError whose text carries the OS's message and `os_error_code='28'`."""
  seen = set()
  current: BaseException | None = error
  while current is not None and id(current) not in seen:
    seen.add(id(current))
    if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
      return _DISK_FULL_ERRNOS[current.errno]
    text = str(current)
    for code, reason in _DISK_FULL_ERRNOS.items():
      if os.strerror(code) in text or f"os_error_code='{code}'" in text:
        return reason
    current = current.__cause__ or current.__context__
  return None


def newest_complete_step(directory: str) -> int | None:
  """The newest step in the checkpoint `directory` that was completely written, read from the
  directory names alone (no CheckpointManager: in a multi-process run that has lost a
  process, creating one would wait for it). On object stores, where Orbax does not
  rename, a step counts only with its commit marker."""
  from etils import epath

  path = epath.Path(directory)
  try:
    names = [p.name for p in path.iterdir()]
  except (OSError, ValueError):
    return None
  steps = [int(n) for n in names if n.isdigit()]
  if "://" in directory:
    steps = [s for s in steps if (path / str(s) / "commit_success.txt").exists()]
  return max(steps, default=None)


class Checkpointer:
  """Keep-N async checkpoints of a train state; `restore_latest` resumes where a run stopped."""

  def __init__(
    self, workdir: str, *, keep: int = 2, async_save: bool = True, read_only: bool = False
  ):
    self._saving_step: int | None = None  # the step of the save last started
    self._failed = False  # a save ran out of space (already reported)
    self._closed = False
    # cleanup_tmp_directories: without it a half-written step directory stays until that
    # same step is saved again, which never happens if the save schedule changed.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=not read_only,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only,
      read_only=read_only,
    )
    self.directory = checkpoint_dir(workdir)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(
    self, step: int, state: Any, meta: dict[str, Any] | None = None, *, force: bool = True
  ) -> None:
    """Starts writing checkpoint `step` in the background.

    Raises DiskFullError when this save, or the previous one (whose background write
    Orbax waits for first), runs out of space."""
    # Orbax waits for the previous save inside save() anyway; waiting here first lets a
    # failure of that save be reported with its own step.
    self.wait()
    self._saving_step = int(step)
    with self._disk_full_as_error():
      self._manager.save(
        int(step),
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})
        ),
        force=force,
      )

  @contextlib.contextmanager
  def _disk_full_as_error(self) -> Iterator[None]:
    """Turns running out of space during the save of `self._saving_step` into
    DiskFullError, after removing what that save wrote: its temporary directory (and the
    step's final directory, should one exist), so that the next run neither trips over
    it nor takes it for a checkpoint."""
    try:
      yield
    except Exception as e:
      reason = disk_full_reason(e)
      if reason is None or self._saving_step is None:
        raise
      step = self._saving_step
      self._failed = True
      self._close_manager()  # Orbax's threads stop first: none may write into what goes next
      self._discard(step)
      newest = newest_complete_step(self.directory)
      where = (
        "there is no complete checkpoint yet, so a rerun starts afresh"
        if newest is None
        else f"the newest complete checkpoint is step {newest}, which a rerun resumes from"
      )
      raise DiskFullError(
        f"{reason} while saving the checkpoint of step {step} in {self.directory}; its "
        f"partial files are removed and {where}; free some space and rerun the same "
        "command."
      ) from e

  def _discard(self, step: int) -> None:
    """Removes step `step`'s directories, temporary or final (process 0 only: the
    checkpoint directory is shared).

    The first failed write ends the save, but its other writes go on for a while (Orbax's
    threads, and TensorStore's, which Python cannot wait for) and may recreate what was
    removed: Orbax's threads are waited for, then the directory is removed until it has
    stayed away for a moment (both bounded in time)."""
    if jax.process_index() != 0:
      return
    from etils import epath

    deadline = time.monotonic() + _DISCARD_WAIT_S
    for thread in threading.enumerate():
      if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax."):
        try:  # Orbax's threads re-raise their own failure when joined
          thread.join(max(0.0, deadline - time.monotonic()))
        except Exception as e:  # noqa: BLE001 -- another write of the same failed save
          logging.info("A writer of the failed save: %s", first_line(e))
    directory = epath.Path(self.directory)
    try:
      doomed = [
        p
        for p in directory.iterdir()
        if p.name == str(step) or p.name.startswith(f"{step}.orbax-checkpoint-tmp")
      ]
    except OSError:
      return
    for path in doomed:
      absent_since = None
      while absent_since is None or time.monotonic() - absent_since < _DISCARD_SETTLE_S:
        if path.exists():
          absent_since = None
          if time.monotonic() > deadline:  # the next run's Orbax clean-up removes it
            logging.warning("Could not remove %s; a rerun removes it.", path)
            break
          try:
            path.rmtree(missing_ok=True)
          except OSError:  # a file being written meanwhile: try again
            pass
        elif absent_since is None:
          absent_since = time.monotonic()
        time.sleep(0.05)

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
        int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore())
      )
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
    stored_shapes = {
      _key(p): tuple(m.shape)
      for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]
      if hasattr(m, "shape")
    }
    paths, treedef = jax.tree_util.tree_flatten_with_path(target)
    missing = [_key(p) for p, _ in paths if _key(p) not in stored_shapes]
    if missing or len(stored_shapes) != len(paths):
      raise StateMismatchError(
        f"the checkpoint holds {len(stored_shapes)} arrays, this state {len(paths)}"
        + (f" ({missing[0]} is not in the checkpoint)" if missing else "")
      )
    resized, leaves = {}, []
    for path, leaf in paths:
      key = _key(path)
      shape = stored_shapes[key]
      if shape != tuple(leaf.shape):
        if len(shape) != len(leaf.shape) or sum(a != b for a, b in zip(shape, leaf.shape)) != 1:
          raise StateMismatchError(
            f"{key} is {shape} in the checkpoint and {tuple(leaf.shape)} in this state"
          )
        resized[key] = leaf
        leaf = np.zeros(shape, leaf.dtype)  # read this leaf on the host
      leaves.append(leaf)
    restored = self._manager.restore(
      int(step),
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(jax.tree.unflatten(treedef, leaves)),
        meta=ocp.args.JsonRestore(),
      ),
    )
    state = restored["state"]
    if resized:
      flat, treedef = jax.tree_util.tree_flatten_with_path(state)
      state = jax.tree.unflatten(
        treedef,
        [_fit(np.asarray(x), resized[_key(p)]) if _key(p) in resized else x for p, x in flat],
      )
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
            f"{type(e).__name__}); move the folder away to start afresh."
          ) from e
        logging.warning(
          "The checkpoint of step %d in %s could not be read (%s); resuming "
          "from the one before it.",
          step,
          self.directory,
          first_line(e),
        )
    return None

  def wait(self) -> None:
    """Blocks until pending async saves are on disk; DiskFullError if one ran out of space."""
    with self._disk_full_as_error():
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the pending save, then releases Orbax's threads."""
    try:
      if not self._failed:
        self.wait()
    finally:
      self._close_manager()

  def _close_manager(self) -> None:
    """Closes Orbax's manager once. After a save that ran out of space (reported already
    as DiskFullError) its own complaints about that save are moot and only logged."""
    if self._closed:
      return
    self._closed = True
    try:
      self._manager.close()
    except Exception as e:  # noqa: BLE001 -- the failed save's error, reported once already
      if not self._failed:
        raise
      logging.info("Closing the checkpointer after a failed save: %s", first_line(e))


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
        raise ValueError(
          f"A checkpoint leaf of shape {value.shape} cannot be cropped to "
          f"{target.shape}: the rows it would drop are not padding."
        )
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
