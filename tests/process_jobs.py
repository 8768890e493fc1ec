"""Training runs as real processes, for the tests that start `python -m mcl_jax.main`.

tests/test_multihost.py and tests/test_faults.py run the trainer as a user starts it: one
process, or several joined by jax.distributed on localhost, each with its own fake CPU
devices and its own log file. `Job` starts such a run and waits on it, `child_env` is the
environment each process gets, `TINY_RUN_FLAGS` the small run they train, and
`STEP_LINE` reads the steps from a log.

Not a test module (the name does not start with `test_`): the test modules import it
(`import process_jobs`), which works because pytest puts tests/ on sys.path.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# cifar100_resnet32's smoke run shrunk to the tiny test network on 64 synthetic 8x8 images,
# one log line per step (the tests wait for them), evaluation only at the end. The test
# modules add the schedule and checkpoint flags they need.
TINY_RUN_FLAGS = (
  "--config=cifar100_resnet32:mcl_x2,smoke",
  "--config.model.arch=tiny",
  "--config.model.num_classes=0",
  "--config.input.image_size=8",
  "--config.input.synthetic_train_size=64",
  "--config.input.global_batch_size=16",
  "--config.schedule.num_train_steps=0",
  "--config.log_every_steps=1",
  "--config.eval_every_epochs=1000",
)
STEPS_PER_EPOCH = 4  # 64 synthetic examples / global batch 16
RUN_TIMEOUT_S = 300  # a loaded 2-core machine; a run normally takes 10-40 s
# clu's metric line (`[7] train/accuracy/member_0=...`), every step with log_every_steps=1.
STEP_LINE = re.compile(r"\] \[(\d+)\] train/")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def child_env(local_devices: int, cache_dir: str | None = None) -> dict[str, str]:
  """The environment of one training process with `local_devices` CPU devices."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  # conftest.py gave this process 8 fake devices through XLA_FLAGS; each child gets its own.
  flags = [
    f
    for f in env.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  flags.append(f"--xla_force_host_platform_device_count={local_devices}")
  env.update(
    XLA_FLAGS=" ".join(flags),
    JAX_PLATFORMS="cpu",
    CUDA_VISIBLE_DEVICES="",
    TF_CPP_MIN_LOG_LEVEL="3",
    # As conftest.py does in-process: compiles take seconds, not tens of seconds.
    # Every run has it, so compared runs execute the same programs.
    JAX_DISABLE_MOST_OPTIMIZATIONS="1",
  )
  # Without `cache_dir`, the compilation cache conftest.py set up is inherited. With it,
  # one cache for a module's runs: only the first run of each topology compiles the step;
  # the others load it.
  if cache_dir is not None:
    env.update(
      JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"
    )
  return env


class Job:
  """One training command: a single process, or `num_processes` joined by jax.distributed,
  with `num_devices` CPU devices in all (split evenly), each process logging to its own file.

  `flags` is the whole flag list except --workdir and the jax.distributed ones. The logs go
  inside the workdir (created here) as `{name}_process_{i}.log`, or with
  `logs_beside_workdir` next to it as `{workdir}_{name}_{i}.log` (the workdir is then left
  to the run to create). `relative_workdir` passes the workdir relative to the repository,
  where the processes run.

  A context manager: leaving it kills whatever still runs, so a failed assertion never
  leaves a process behind (one waiting for a dead peer would never exit).
  """

  def __init__(
    self,
    workdir,
    flags,
    *,
    num_devices: int,
    num_processes: int = 1,
    name: str = "run",
    logs_beside_workdir: bool = False,
    cache_dir=None,
    relative_workdir: bool = False,
  ):
    self.workdir = str(workdir)
    if logs_beside_workdir:
      self.logs = [
        os.path.join(
          os.path.dirname(self.workdir), f"{os.path.basename(self.workdir)}_{name}_{i}.log"
        )
        for i in range(num_processes)
      ]
    else:
      os.makedirs(self.workdir, exist_ok=True)
      self.logs = [
        os.path.join(self.workdir, f"{name}_process_{i}.log") for i in range(num_processes)
      ]
    self.procs = []
    port = free_port()
    # The processes run in the repository; launch/local_two_process.sh's default workdir
    # is relative to it.
    workdir_flag = os.path.relpath(self.workdir, REPO) if relative_workdir else self.workdir
    for pid in range(num_processes):
      cmd = [sys.executable, "-m", "mcl_jax.main", *flags, f"--workdir={workdir_flag}"]
      if num_processes > 1:
        cmd += [
          f"--coordinator_address=localhost:{port}",
          f"--num_processes={num_processes}",
          f"--process_id={pid}",
        ]
      with open(self.logs[pid], "w") as log:
        self.procs.append(
          subprocess.Popen(
            cmd,
            cwd=REPO,
            env=child_env(num_devices // num_processes, cache_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
          )
        )

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
    return "\n".join(
      f"--- process {i} (exit {p.poll()}):\n" + self.log(i)[-4000:]
      for i, p in enumerate(self.procs)
    )

  def wait(self, timeout: float = RUN_TIMEOUT_S, *, fail_fast: bool) -> list[int]:
    """Exit codes of all processes. With `fail_fast`, fails at once (killing the rest) when
    one exits non-zero; without, waits for all, whatever their codes."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in self.procs):
      if fail_fast and any(p.poll() not in (None, 0) for p in self.procs):
        self.kill()
        pytest.fail(f"a process failed:\n{self.tails()}")
      if time.monotonic() > deadline:
        self.kill()
        pytest.fail(f"no exit after {timeout} s:\n{self.tails()}")
      time.sleep(0.05)
    return [p.returncode for p in self.procs]

  def wait_until(self, predicate, what: str, timeout: float = RUN_TIMEOUT_S, poll_s: float = 0.01):
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
