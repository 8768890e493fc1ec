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
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

# The module fixture's runs are shared by all three tests: keep them on one xdist worker.
pytestmark = pytest.mark.xdist_group("multihost")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 4  # 64 synthetic examples / global batch 16
EPOCHS = 3
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
NUM_DEVICES = 4  # 2 per process in the two-process runs, so batches split within hosts too
# cifar100_resnet32's smoke run shrunk to the tiny test network on 8x8 images.
# One log line per step (the tests wait for them); eval and checkpoints only at the end
# unless a test asks for more.
CONFIG_FLAGS = (
    "--config=cifar100_resnet32:mcl_x2,smoke",
    "--config.model.arch=tiny",
    "--config.model.num_classes=0",
    "--config.input.image_size=8",
    "--config.input.synthetic_train_size=64",
    "--config.input.global_batch_size=16",
    f"--config.schedule.epochs={EPOCHS}",
    "--config.schedule.num_train_steps=0",
    "--config.log_every_steps=1",
    "--config.eval_every_epochs=1000",
    "--config.checkpoint.every_epochs=1000",
)
RUN_TIMEOUT_S = 300  # a loaded 2-core machine; a run normally takes 10-40 s
# clu's metric line (`[7] train/accuracy/member_0=...`), every step with log_every_steps=1.
STEP_LINE = re.compile(r"\] \[(\d+)\] train/")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(local_devices: int, cache_dir: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  # conftest.py gave this process 8 fake devices through XLA_FLAGS; each child gets its own.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={local_devices}")
  env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
             TF_CPP_MIN_LOG_LEVEL="3",
             # As conftest.py does in-process: compiles take seconds, not tens of seconds.
             # Every run here has it, so compared runs execute the same programs.
             JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             # One compilation cache for the module's runs: only the first run of each
             # topology compiles the step; the others load it.
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


class Job:
  """One training command: a single process, or `num_processes` joined by jax.distributed.

  A context manager: leaving it kills whatever still runs, so a failed assertion never
  leaves a process behind (one waiting for a dead peer would never exit).
  """

  def __init__(self, workdir, cache_dir, *, num_processes: int = 1, extra_flags=(),
               name: str = "run", relative_workdir: bool = False):
    self.workdir = str(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.logs = [os.path.join(self.workdir, f"{name}_process_{i}.log")
                 for i in range(num_processes)]
    self.procs = []
    port = _free_port()
    # The processes run in the repository; launch/local_two_process.sh's default workdir
    # is relative to it.
    workdir_flag = os.path.relpath(self.workdir, REPO) if relative_workdir else self.workdir
    for pid in range(num_processes):
      cmd = [sys.executable, "-m", "mcl_jax.main", *CONFIG_FLAGS, *extra_flags,
             f"--workdir={workdir_flag}"]
      if num_processes > 1:
        cmd += [f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
                f"--process_id={pid}"]
      with open(self.logs[pid], "w") as log:
        self.procs.append(subprocess.Popen(
            cmd, cwd=REPO, env=_env(NUM_DEVICES // num_processes, str(cache_dir)),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.kill()

  def kill(self) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()  # SIGKILL also ends a stopped process
    for proc in self.procs:
      proc.wait()

  def log(self, pid: int = 0) -> str:
    with open(self.logs[pid]) as f:
      return f.read()

  def tails(self) -> str:
    return "\n".join(f"--- process {i} (exit {p.poll()}):\n" + self.log(i)[-4000:]
                     for i, p in enumerate(self.procs))

  def wait(self, timeout: float = RUN_TIMEOUT_S) -> list[int]:
    """Exit codes of all processes; fails at once (killing the rest) if one fails."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in self.procs):
      if any(p.poll() not in (None, 0) for p in self.procs):
        self.kill()
        pytest.fail(f"a process failed:\n{self.tails()}")
      if time.monotonic() > deadline:
        self.kill()
        pytest.fail(f"no exit after {timeout} s:\n{self.tails()}")
      time.sleep(0.05)
    return [p.returncode for p in self.procs]

  def wait_until(self, predicate, what: str, timeout: float = RUN_TIMEOUT_S,
                 poll_s: float = 0.01):
    """Polls `predicate()` until it returns something truthy, which it returns."""
    deadline = time.monotonic() + timeout
    while True:
      result = predicate()
      if result:
        return result
      if any(p.poll() is not None for p in self.procs):
        pytest.fail(f"the run ended before {what}:\n{self.tails()}")
      if time.monotonic() > deadline:
        pytest.fail(f"no {what} after {timeout} s:\n{self.tails()}")
      time.sleep(poll_s)

  def preempt_process_1(self) -> None:
    """SIGTERM to process 1 only (one host of a job preempted), with process 0 held still.

    JAX's preemption notifier looks at its SIGTERM flag once a second; this tiny run could
    finish in that time. Process 0 is stopped meanwhile (SIGSTOP), so no step can complete
    (each needs both processes) until the notice is out; it then takes effect within a
    step or two of SIGCONT, wherever the run was.
    """
    self.procs[0].send_signal(signal.SIGSTOP)
    try:
      self.procs[1].send_signal(signal.SIGTERM)
      time.sleep(2.0)
    finally:
      self.procs[0].send_signal(signal.SIGCONT)


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
      np.testing.assert_allclose(x, y, rtol=0, atol=atol,
                                 err_msg=f"{part}{jax.tree_util.keystr(path)}")


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, jax_cache):
  """Workdirs of the reference runs, started together: one process with all NUM_DEVICES
  devices, and two processes with half of them each."""
  root = tmp_path_factory.mktemp("uninterrupted")
  with (Job(root / "one", jax_cache) as one,
        Job(root / "two", jax_cache, num_processes=2) as two):
    assert one.wait() == [0] and two.wait() == [0, 0]
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
    uninterrupted, jax_cache, tmp_path):
  workdir = tmp_path / "preempted"
  with Job(workdir, jax_cache, num_processes=2, name="first") as job:
    job.wait_until(lambda: max(_logged_steps(job.log(1)), default=0) >= 2,
                   "two training steps")
    job.preempt_process_1()  # JAX's preemption service must stop process 0 at that step too
    assert job.wait() == [0, 0]
    logs = [job.log(0), job.log(1)]
  steps = _committed_steps(workdir)
  assert len(steps) == 1 and 2 <= steps[0] < TOTAL_STEPS - 1, steps
  saved = steps[0]
  for log in logs:
    assert f"Preemption signal: saved step {saved} " in log and "Finished" not in log

  # Preempted again while the restarted run starts (restored, first step compiling): it
  # must stop after its first step, not miss the notice and train on.
  with Job(workdir, jax_cache, num_processes=2, name="second") as job:
    job.wait_until(lambda: "Resumed from" in job.log(1), "the restore")
    job.preempt_process_1()
    assert job.wait() == [0, 0]
    for log in (job.log(0), job.log(1)):
      assert f"at step {saved}." in log
      assert f"Preemption signal: saved step {saved + 1} " in log and "Finished" not in log
  assert max(_committed_steps(workdir)) == saved + 1

  with Job(workdir, jax_cache, num_processes=2, name="third") as job:
    assert job.wait() == [0, 0]
    for log in (job.log(0), job.log(1)):
      assert f"at step {saved + 1}." in log
      assert f"Finished {TOTAL_STEPS - saved - 1} steps" in log
  assert max(_committed_steps(workdir)) == TOTAL_STEPS
  assert_states_equal(read_state(workdir, TOTAL_STEPS),
                      read_state(uninterrupted["two"], TOTAL_STEPS), atol=0)


def test_sigkill_during_a_checkpoint_save_resumes_from_the_last_complete_one(
    uninterrupted, jax_cache, tmp_path):
  workdir = tmp_path / "killed"
  # Saves at steps 4, 8 and 12, into a workdir given as a relative path (Orbax needs an
  # absolute one; checkpointing.py makes it so).
  run_flags = {"extra_flags": ("--config.checkpoint.every_epochs=1",),
               "relative_workdir": True}
  with Job(workdir, jax_cache, **run_flags, name="first") as job:
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

  with Job(workdir, jax_cache, **run_flags, name="second") as job:
    assert job.wait() == [0]
    assert f"at step {resume_step}." in job.log(0)
    assert f"Finished {TOTAL_STEPS - resume_step} steps" in job.log(0)
  assert max(_committed_steps(workdir)) == TOTAL_STEPS
  assert not _tmp_checkpoints(workdir)  # the half-written checkpoint is gone
  assert_states_equal(read_state(workdir, TOTAL_STEPS),
                      read_state(uninterrupted["one"], TOTAL_STEPS), atol=0)
