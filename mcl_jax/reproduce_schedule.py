"""The reproduction scheduler: trains a suite's pending (row, seed) runs, several at once.

`run_all(..., workers=N)` runs N trainings at a time, each a child process
(`python -m mcl_jax.reproduce --run_one=ROW:SEED`, which calls `reproduce_eval.train_one`)
pinned to its own share of the CPU cores: small convolutions do not use several threads
well, so separate processes on separate cores train more steps per second than one
process on all of them. Each child writes its log to `log.txt` in its run folder, and the
scheduler prints each finished run with an estimate of the time left (`minutes_left`).
`workers=0` trains in this process, one run after another (tests).

A run whose result.json exists is finished and not trained again (`pending_runs`); an
interrupted one resumes from its newest checkpoint (`jobs.run`).
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import os
import subprocess
import sys
import time
from typing import Any

from mcl_jax import reproduce_eval
from mcl_jax import suites
from mcl_jax.suites import Row


def pending_runs(workdir: str, rows: Sequence[Row], seeds: Sequence[int]) -> list[tuple[Row, int]]:
  """Unfinished (row, seed) pairs, one per run folder (rows sharing a config train once)."""
  todo, seen = [], set()
  for row in rows:
    for seed in seeds:
      directory = suites.run_dir(workdir, row, seed)
      if directory not in seen and not os.path.exists(os.path.join(directory, suites.RESULT_FILE)):
        todo.append((row, seed))
      seen.add(directory)
  return todo


def _core_sets(workers: int) -> list[set[int]]:
  """The cores this process may use, split into `workers` disjoint sets."""
  cores = sorted(os.sched_getaffinity(0))
  per = max(1, len(cores) // workers)
  return [set(cores[i * per : (i + 1) * per]) or set(cores) for i in range(workers)]


def run_all(
  suite: str, rows: Sequence[Row], seeds: Sequence[int], workdir: str, *, workers: int, smoke: bool
) -> None:
  """Trains every pending (row, seed), `workers` at a time (0: in this process); a
  RuntimeError naming the runs that failed, after the others have finished."""
  config_module, _, _ = suites.load_suite(suite)
  todo = pending_runs(workdir, rows, seeds)
  print(f"{suite}: {len(todo)} runs to train (workdir {workdir}).", flush=True)
  t0 = time.time()
  if workers == 0:
    for i, (row, seed) in enumerate(todo):
      print(f"[{i + 1}/{len(todo)}] {row.name} seed {seed}", flush=True)
      reproduce_eval.train_one(config_module, row, seed, workdir, smoke)
    return
  running: list[tuple[subprocess.Popen, Row, int, float, set[int], Any]] = []
  free = _core_sets(workers)
  queue = list(todo)
  finished, failed, durations = 0, [], []
  while queue or running:
    while queue and free:
      row, seed = queue.pop(0)
      cores = free.pop(0)
      directory = suites.run_dir(workdir, row, seed)
      os.makedirs(directory, exist_ok=True)
      log = open(os.path.join(directory, "log.txt"), "a")
      cmd = [
        sys.executable,
        "-m",
        "mcl_jax.reproduce",
        f"--suite={suite}",
        f"--workdir={workdir}",
        f"--run_one={row.name}:{seed}",
        f"--smoke={'true' if smoke else 'false'}",
      ]
      proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=functools.partial(os.sched_setaffinity, 0, cores),
      )
      running.append((proc, row, seed, time.time(), cores, log))
      print(
        f"  start {row.name} seed {seed} on cores {sorted(cores)} "
        f"(log: {os.path.join(directory, 'log.txt')})",
        flush=True,
      )
    time.sleep(2)
    for item in list(running):
      proc, row, seed, started, cores, log = item
      if proc.poll() is None:
        continue
      running.remove(item)
      log.close()
      free.append(cores)
      finished += 1
      minutes = (time.time() - started) / 60
      if proc.returncode == 0:
        durations.append(minutes)
        left = minutes_left(
          durations, len(queue), [(time.time() - r[3]) / 60 for r in running], workers
        )
        print(
          f"  [{finished}/{len(todo)}] {row.name} seed {seed} done in {minutes:.1f} min; "
          f"{(time.time() - t0) / 60:.1f} min so far, about {left:.0f} min left",
          flush=True,
        )
      else:
        failed.append(f"{row.name} seed {seed}")
        print(
          f"  [{finished}/{len(todo)}] {row.name} seed {seed} FAILED (exit "
          f"{proc.returncode}); see its log.txt",
          flush=True,
        )
  if failed:
    raise RuntimeError(
      f"{len(failed)} run(s) failed: {', '.join(failed)}; their log.txt "
      "says why, and rerunning the same command retries them."
    )


def minutes_left(
  durations: Sequence[float], queued: int, running_for: Sequence[float], workers: int
) -> float:
  """Wall minutes until every run is done, assuming each takes the mean finished duration.

  Runs go `workers` at a time, so the queued runs' work is shared among the workers (a
  plain elapsed / done * left would count them one after another).
  """
  mean = sum(durations) / len(durations)
  running_rest = [max(0.0, mean - elapsed) for elapsed in running_for]
  work = queued * mean + sum(running_rest)
  return max(max(running_rest, default=0.0), work / max(1, workers))
