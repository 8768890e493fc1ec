"""Faults a pod meets, with real processes: a process lost mid-training, a full disk.

Every run is `python -m mcl_jax.main` in a subprocess, as a user starts it (the tiny test
network on 64 synthetic 8x8 images, 4 steps of 16 per epoch, 4 CPU devices in all):

1. Two processes joined by jax.distributed; process 1 is killed (SIGKILL) mid-training.
   Process 0 must stop within the bound, not hang, with exit status 4 and one sentence
   naming process 1 and the newest complete checkpoint; restarting both resumes from
   exactly that checkpoint and finishes the run.
2. The checkpoint directory is a small tmpfs on which the third checkpoint does not fit:
   the save fails with ENOSPC (a real one, from TensorStore's writes, surfacing on Orbax's
   background thread), the run stops with exit status 5 and one sentence naming the step
   that failed and the newest complete checkpoint; nothing of the failed step is left;
   with space again, the same command resumes from that checkpoint and finishes.
   (Mounting a tmpfs needs root, as CI has; elsewhere the test is skipped, and the third
   test, in-process, still covers the clean-up and the sentence.)
3. The same in-process, without a mount: an OSError(ENOSPC) injected into the file write of
   Orbax's background save.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

from process_jobs import STEP_LINE
from process_jobs import STEPS_PER_EPOCH
from process_jobs import TINY_RUN_FLAGS
from process_jobs import Job
import pytest

# Like tests/test_multihost.py: these tests start processes that use the whole machine.
pytestmark = pytest.mark.xdist_group("multihost")

NUM_DEVICES = 4
# The bound on noticing a killed peer that the test holds the survivor to. Its socket
# closes with it, so the survivor's next collective fails at once; the heartbeat timeout
# (set lower than the default here) bounds the cases where it would not.
LOST_PEER_BOUND_S = 60
HEARTBEAT_TIMEOUT_S = 30


def _job(workdir, flags, **kwargs) -> Job:
  """A run of TINY_RUN_FLAGS and `flags` on NUM_DEVICES devices, its logs beside `workdir`;
  the compilation cache is conftest.py's."""
  return Job(
    workdir, (*TINY_RUN_FLAGS, *flags), num_devices=NUM_DEVICES, logs_beside_workdir=True, **kwargs
  )


def _checkpoint_entries(workdir) -> list[str]:
  return sorted(os.listdir(os.path.join(str(workdir), "checkpoints")))


def _committed_steps(workdir) -> list[int]:
  path = os.path.join(str(workdir), "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def _error_line(log: str) -> str:
  lines = [line for line in log.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, log[-4000:]
  return lines[0]


def test_a_killed_process_stops_the_other_which_names_it_and_a_restart_resumes(tmp_path):
  workdir = tmp_path / "lost"
  epochs, every = 8, 3  # checkpoints at steps 12, 24 and 32
  total = epochs * STEPS_PER_EPOCH
  flags = (
    f"--config.schedule.epochs={epochs}",
    f"--config.checkpoint.every_epochs={every}",
    f"--heartbeat_timeout_s={HEARTBEAT_TIMEOUT_S}",
  )
  first_save = every * STEPS_PER_EPOCH
  with _job(workdir, flags, num_processes=2, name="first") as job:
    # Kill between saves: the first checkpoint complete and four steps past it (its
    # background finalisation, which ends in a barrier of both processes, long done), the
    # next save still 8 steps away. A kill inside that barrier could hold process 0 in it
    # until JAX's heartbeat timeout ends it, without the sentence.
    def past_the_first_checkpoint():
      steps = STEP_LINE.findall(job.log(1))
      return _committed_steps(workdir) and steps and int(steps[-1]) >= first_save + 4

    job.wait_until(past_the_first_checkpoint, "the first checkpoint")
    job.procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    while job.procs[0].poll() is None and time.monotonic() - killed_at < LOST_PEER_BOUND_S:
      time.sleep(0.05)
    took = time.monotonic() - killed_at
    print(f"process 0 exited {took:.1f} s after process 1 was killed")
    assert job.procs[0].poll() is not None, (
      f"process 0 still runs {took:.0f} s after process 1 was killed:\n{job.tails()}"
    )
    assert job.procs[0].returncode == 4, job.tails()
    error = _error_line(job.log(0))
  saved = _committed_steps(workdir)
  assert saved and saved[-1] == first_save, saved  # the kill came before the next save
  assert error.startswith("error: process 1 of this 2-process run was lost ("), error
  assert (
    f"the newest complete checkpoint is step {first_save} in "
    f"{workdir}{os.sep}checkpoints, which a restart resumes from"
  ) in error, error
  assert error.endswith("restart all 2 processes with the same command."), error

  with _job(workdir, flags, num_processes=2, name="second") as job:
    assert job.wait(fail_fast=False) == [0, 0], job.tails()
    for pid in (0, 1):
      assert f"Resumed from {workdir}{os.sep}checkpoints at step {first_save}." in job.log(pid)
      assert f"Finished {total - first_save} steps" in job.log(pid)
  assert _committed_steps(workdir)[-1] == total


def _mount_tmpfs(path: str, size_kib: int) -> bool:
  """A tmpfs of `size_kib` at `path`; False where mounting is not allowed (not root)."""
  result = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", path],
    capture_output=True,
    text=True,
  )
  return result.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
  """A workdir whose checkpoint directory is a tmpfs holding two of the test's
  checkpoints (about 500 KiB each, in whole pages) but not three."""
  if shutil.which("mount") is None:
    pytest.skip("no mount command")
  workdir = tmp_path / "full"
  checkpoints = workdir / "checkpoints"
  checkpoints.mkdir(parents=True)
  if not _mount_tmpfs(str(checkpoints), 1300):
    pytest.skip("mounting a tmpfs needs root (CI runs as root)")
  try:
    yield workdir
  finally:
    subprocess.run(["umount", str(checkpoints)], check=True)


def test_a_save_that_runs_out_of_space_keeps_the_previous_checkpoint_and_a_rerun_resumes(
  small_disk,
):
  workdir = small_disk
  epochs = 5  # checkpoints every epoch: 4 and 8 fit, 12 does not
  flags = (
    f"--config.schedule.epochs={epochs}",
    "--config.checkpoint.every_epochs=1",
    "--config.checkpoint.keep=2",
  )
  with _job(workdir, flags, name="first") as job:
    assert job.wait(fail_fast=False) == [5], job.tails()
    error = _error_line(job.log())
  # The save of step 12 fails on Orbax's background thread; it surfaces when the save of
  # step 16 waits for it, and is reported with its own step.
  assert error == (
    f"error: no space left on device while saving the checkpoint of step 12 in "
    f"{workdir}{os.sep}checkpoints; its partial files are removed and the newest "
    "complete checkpoint is step 8, which a rerun resumes from; free some space and "
    "rerun the same command."
  ), error
  assert _checkpoint_entries(workdir) == ["4", "8"]  # no temporary or final 12, no 16

  subprocess.run(["mount", "-o", "remount,size=8m", str(workdir / "checkpoints")], check=True)
  with _job(workdir, flags, name="second") as job:
    assert job.wait(fail_fast=False) == [0], job.tails()
    log = job.log()
  assert f"Resumed from {workdir}{os.sep}checkpoints at step 8." in log, log[-4000:]
  assert f"Finished {epochs * STEPS_PER_EPOCH - 8} steps" in log
  assert _checkpoint_entries(workdir) == ["16", "20"]


def test_an_enospc_in_the_background_write_removes_the_step_and_names_it(tmp_path, monkeypatch):
  """The same clean-up and sentence without a mount (so it runs anywhere): the JSON item's
  file write, inside Orbax's background save, raises OSError(ENOSPC)."""
  import errno

  from etils import epath
  import jax
  import jax.numpy as jnp
  import numpy as np

  from mcl_jax import checkpointing

  state = {"w": jnp.arange(4.0), "step": jnp.int32(1)}
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.save(1, state, {"step": 1})
  ckpt.wait()

  path_type = type(epath.Path(str(tmp_path)))
  real_write_text = path_type.write_text

  def write_text_on_a_full_disk(self, *args, **kwargs):
    if "orbax-checkpoint-tmp" in str(self):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return real_write_text(self, *args, **kwargs)

  monkeypatch.setattr(path_type, "write_text", write_text_on_a_full_disk)
  with pytest.raises(checkpointing.DiskFullError) as failed:
    ckpt.save(2, jax.tree.map(lambda x: x + 1, state), {"step": 2})
    ckpt.wait()
  ckpt.close()  # the failure is reported once; closing afterwards is quiet
  monkeypatch.undo()
  directory = checkpointing.checkpoint_dir(str(tmp_path))
  assert str(failed.value) == (
    f"no space left on device while saving the checkpoint of step 2 in {directory}; its "
    "partial files are removed and the newest complete checkpoint is step 1, which a rerun "
    "resumes from; free some space and rerun the same command."
  )
  assert sorted(os.listdir(directory)) == ["1"]

  reopened = checkpointing.Checkpointer(str(tmp_path))
  restored, meta = reopened.restore_latest(state)
  reopened.close()
  assert meta == {"step": 1}
  np.testing.assert_array_equal(restored["w"], np.arange(4.0))


def test_the_lost_process_is_named_from_the_error_and_other_errors_are_left_alone(
  tmp_path, monkeypatch
):
  """The sentence's parts that the two-process run above does not reach: a process named
  by JAX's error in a larger run, and errors that are not a lost peer."""
  import jax

  from mcl_jax import main

  monkeypatch.setattr(jax, "process_count", lambda: 4)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  heartbeat = jax.errors.JaxRuntimeError(
    "UNAVAILABLE: Task 2 heartbeat timeout. This indicates that the remote task has failed"
  )
  sentence = main.lost_process_sentence(heartbeat, str(tmp_path))
  assert sentence == (
    "process 2 of this 4-process run was lost (UNAVAILABLE: Task 2 heartbeat timeout. This "
    "indicates that the remote task has failed), so process 0 stopped; no checkpoint has "
    "been saved yet, so a restart begins afresh; restart all 4 processes with the same "
    "command."
  )
  out_of_memory = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating")
  assert main.lost_process_sentence(out_of_memory, str(tmp_path)) is None
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  assert main.lost_process_sentence(heartbeat, str(tmp_path)) is None
