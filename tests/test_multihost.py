"""Multi-process training, preemption and crash recovery, with real processes.

Every run here is `python -m mcl_jax.main` in a subprocess, as a user starts it: one process
with 4 CPU devices, or two processes with 2 devices each joined by jax.distributed on
localhost (CPU collectives over Gloo), the same global batch either way. The tiny
architecture on synthetic data keeps a run to its start-up (imports, ~10 s here) and a
few seconds of compiling, which a compilation cache shared by the module's runs cuts
further. The uninterrupted runs that the checks compare against are made once per module.

1. Two processes end with the parameters of one process (up to the order of reductions),
   and only process 0 writes metric files.
2. SIGTERM to one of two processes mid-training: both save at the same step and exit 0.
   SIGTERM again while the restarted run is still starting: it stops after its first step.
   The third start finishes with the parameters of a run that never stopped, bit for bit.
3. SIGKILL while Orbax is writing a checkpoint: the half-written one is ignored (and
   removed); the restart resumes from the last complete one and ends like the
   uninterrupted run, bit for bit. (This run's workdir is a relative path.)
"""

import os
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from process_jobs import STEP_LINE
from process_jobs import STEPS_PER_EPOCH
from process_jobs import TINY_RUN_FLAGS
from process_jobs import Job
import pytest

# The module fixture's runs are shared by all three tests: keep them on one xdist worker.
pytestmark = pytest.mark.xdist_group("multihost")

EPOCHS = 3
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
NUM_DEVICES = 4  # 2 per process in the two-process runs, so batches split within hosts too
# process_jobs.TINY_RUN_FLAGS for 3 epochs; checkpoints only at the end unless a test asks
# for more.
CONFIG_FLAGS = (
  *TINY_RUN_FLAGS,
  f"--config.schedule.epochs={EPOCHS}",
  "--config.checkpoint.every_epochs=1000",
)


def _job(workdir, cache_dir, *, extra_flags=(), **kwargs) -> Job:
  """A run of CONFIG_FLAGS and `extra_flags` on NUM_DEVICES devices, its logs in `workdir`.

  Every run here shares the module's compilation cache `cache_dir`: only the first run of
  each topology compiles the step; the others load it.
  """
  return Job(
    workdir, (*CONFIG_FLAGS, *extra_flags), num_devices=NUM_DEVICES, cache_dir=cache_dir, **kwargs
  )


def preempt_process_1(job: Job) -> None:
  """SIGTERM to process 1 only (one host of a job preempted), with process 0 held still.

  JAX's preemption notifier looks at its SIGTERM flag once a second; this tiny run could
  finish in that time. Process 0 is stopped meanwhile (SIGSTOP), so no step can complete
  (each needs both processes) until the notice is out; it then takes effect within a
  step or two of SIGCONT, wherever the run was.
  """
  job.procs[0].send_signal(signal.SIGSTOP)
  try:
    job.procs[1].send_signal(signal.SIGTERM)
    time.sleep(2.0)
  finally:
    job.procs[0].send_signal(signal.SIGCONT)


def _checkpoint_dir(workdir) -> str:
  return os.path.join(str(workdir), "checkpoints")


def _committed_steps(workdir) -> list[int]:
  return sorted(int(n) for n in os.listdir(_checkpoint_dir(workdir)) if n.isdigit())


def _tmp_checkpoints(workdir) -> list[str]:
  return [n for n in os.listdir(_checkpoint_dir(workdir)) if ".orbax-checkpoint-tmp" in n]


def _logged_steps(log: str) -> list[int]:
  return [int(s) for s in STEP_LINE.findall(log)]


def read_state(workdir, step: int) -> dict:
  """The train state saved at `step` as host NumPy arrays: no target shardings needed, so
  checkpoints written by any number of processes read back the same way."""
  path = os.path.join(_checkpoint_dir(workdir), str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def assert_states_equal(got: dict, want: dict, atol: float) -> None:
  assert int(got["step"]) == int(want["step"]) == TOTAL_STEPS
  for part in ("params", "batch_stats", "opt_state", "rng"):
    got_leaves = jax.tree.leaves_with_path(got[part])
    want_leaves = jax.tree.leaves(want[part])
    assert len(got_leaves) == len(want_leaves) > 0, part
    for (path, x), y in zip(got_leaves, want_leaves):
      np.testing.assert_allclose(
        x, y, rtol=0, atol=atol, err_msg=f"{part}{jax.tree_util.keystr(path)}"
      )


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, jax_cache):
  """Workdirs of the reference runs, started together: one process with all NUM_DEVICES
  devices, and two processes with half of them each."""
  root = tmp_path_factory.mktemp("uninterrupted")
  with _job(root / "one", jax_cache) as one, _job(root / "two", jax_cache, num_processes=2) as two:
    assert one.wait(fail_fast=True) == [0] and two.wait(fail_fast=True) == [0, 0]
  return {"one": root / "one", "two": root / "two"}


def test_the_module_stays_on_one_xdist_worker(request):
  """The reference runs are shared only if xdist keeps this module's tests together.

  pytest 9.2.0 silently broke that for pytest-xdist 3.8 (the group never reached the node
  id): the module fixture then ran once per worker, a minute each.
  """
  if not getattr(request.config.option, "loadgroup", False):
    pytest.skip("not running under --dist loadgroup")
  assert request.node.nodeid.endswith("@multihost"), request.node.nodeid


def test_two_processes_train_like_one(uninterrupted):
  one, two = uninterrupted["one"], uninterrupted["two"]
  assert _committed_steps(one) == _committed_steps(two) == [TOTAL_STEPS]
  # Each process fed its half of every global batch: the same updates as one process,
  # up to the order of the cross-device sums.
  assert_states_equal(read_state(two, TOTAL_STEPS), read_state(one, TOTAL_STEPS), atol=1e-5)
  # Only process 0 writes metric files; process 1 only logs.
  events = [n for n in os.listdir(two) if n.startswith("events.out.tfevents")]
  assert len(events) == 1, os.listdir(two)
  with open(os.path.join(two, "run_process_1.log")) as f:
    log = f.read()
  assert f"JAX process 1/2, {NUM_DEVICES // 2} local / {NUM_DEVICES} global devices" in log
  assert _logged_steps(log) == list(range(1, TOTAL_STEPS + 1))


def test_sigterm_saves_and_the_restart_equals_an_uninterrupted_run(
  uninterrupted, jax_cache, tmp_path
):
  workdir = tmp_path / "preempted"
  with _job(workdir, jax_cache, num_processes=2, name="first") as job:
    job.wait_until(lambda: max(_logged_steps(job.log(1)), default=0) >= 2, "two training steps")
    preempt_process_1(job)  # JAX's preemption service must stop process 0 at that step too
    assert job.wait(fail_fast=True) == [0, 0]
    logs = [job.log(0), job.log(1)]
  steps = _committed_steps(workdir)
  assert len(steps) == 1 and 2 <= steps[0] < TOTAL_STEPS - 1, steps
  saved = steps[0]
  for log in logs:
    assert f"Preemption signal: saved step {saved} " in log and "Finished" not in log

  # Preempted again while the restarted run starts (restored, first step compiling): it
  # must stop after its first step, not miss the notice and train on.
  with _job(workdir, jax_cache, num_processes=2, name="second") as job:
    job.wait_until(lambda: "Resumed from" in job.log(1), "the restore")
    preempt_process_1(job)
    assert job.wait(fail_fast=True) == [0, 0]
    for log in (job.log(0), job.log(1)):
      assert f"at step {saved}." in log
      assert f"Preemption signal: saved step {saved + 1} " in log and "Finished" not in log
  assert max(_committed_steps(workdir)) == saved + 1

  with _job(workdir, jax_cache, num_processes=2, name="third") as job:
    assert job.wait(fail_fast=True) == [0, 0]
    for log in (job.log(0), job.log(1)):
      assert f"at step {saved + 1}." in log
      assert f"Finished {TOTAL_STEPS - saved - 1} steps" in log
  assert max(_committed_steps(workdir)) == TOTAL_STEPS
  assert_states_equal(
    read_state(workdir, TOTAL_STEPS), read_state(uninterrupted["two"], TOTAL_STEPS), atol=0
  )


def test_sigkill_during_a_checkpoint_save_resumes_from_the_last_complete_one(
  uninterrupted, jax_cache, tmp_path
):
  workdir = tmp_path / "killed"
  # Saves at steps 4, 8 and 12, into a workdir given as a relative path (Orbax needs an
  # absolute one; checkpointing.py makes it so).
  run_flags = {"extra_flags": ("--config.checkpoint.every_epochs=1",), "relative_workdir": True}
  with _job(workdir, jax_cache, **run_flags, name="first") as job:
    # Orbax writes step N into `N.orbax-checkpoint-tmp` and renames it when complete (tens
    # to hundreds of ms here). Kill while a later save than the first is being written, so
    # that a complete checkpoint exists to resume from.
    def later_save_in_progress():
      if not os.path.isdir(_checkpoint_dir(workdir)):
        return False
      return [n for n in _tmp_checkpoints(workdir) if not n.startswith(f"{STEPS_PER_EPOCH}.")]

    job.wait_until(later_save_in_progress, "a second checkpoint being written", poll_s=0.002)
    job.procs[0].send_signal(signal.SIGKILL)
    job.procs[0].wait()
  left_over = _tmp_checkpoints(workdir)
  complete = _committed_steps(workdir)
  assert left_over, "the kill came after the save had finished; nothing was tested"
  killed_step = int(left_over[0].split(".")[0])
  assert complete and max(complete) < killed_step, (complete, left_over)
  resume_step = max(complete)

  with _job(workdir, jax_cache, **run_flags, name="second") as job:
    assert job.wait(fail_fast=True) == [0]
    assert f"at step {resume_step}." in job.log(0)
    assert f"Finished {TOTAL_STEPS - resume_step} steps" in job.log(0)
  assert max(_committed_steps(workdir)) == TOTAL_STEPS
  assert not _tmp_checkpoints(workdir)  # the half-written checkpoint is gone
  assert_states_equal(
    read_state(workdir, TOTAL_STEPS), read_state(uninterrupted["one"], TOTAL_STEPS), atol=0
  )
