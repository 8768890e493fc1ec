"""Orbax checkpoints of the whole train state, with automatic resume from the workdir.

The state (params, BN statistics, optimizer state, step, RNG, and the memory bank or MoCo
queues when the trainer has them) is one pytree saved under `<workdir>/checkpoints/<step>`.
Restoring targets the abstract state *with its shardings*, so a sharded bank comes back
sharded on every host without ever being gathered on one. Saves are asynchronous; the
manager writes to a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous checkpoint as the latest complete one; the next run's manager
deletes the half-written directory (tests/test_multihost.py kills a run mid-save).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _directory(workdir: str) -> str:
  if "://" in workdir:
    return workdir.rstrip("/") + "/checkpoints"
  # Orbax's TensorStore writer rejects a relative path, and only at the first save.
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """Keep-N async checkpoints of a train state; `restore_latest` resumes where a run stopped."""

  def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True):
    # cleanup_tmp_directories: without it a half-written step directory stays until that
    # same step is saved again, which never happens if the save schedule changed.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        _directory(workdir), options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any] | None = None, *,
           force: bool = True) -> None:
    self._manager.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})),
        force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """`abstract_state`: a pytree of jax.ShapeDtypeStruct with shardings (or real arrays)."""
    target = jax.tree.map(_as_abstract, abstract_state)
    restored = self._manager.restore(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"] or {})

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    step = self.latest_step()
    if step is None:
      return None
    return self.restore(step, abstract_state)

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _as_abstract(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
