"""Launch scripts: syntax, the commands they print with DRY_RUN=1, and their control flow
(waiting, failure, SIGTERM, requeue) with fake `python`, `srun`, `squeue` and `scontrol`.

No gcloud, TPU or SLURM is needed: DRY_RUN=1 prints every command instead of running it,
and each printed line is parsed back with shlex, so it is also checked to be valid shell.
"""

import os
import re
import shlex
import shutil
import stat
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = [
  "tpu_pod.sh",
  "gpu_single_node.sh",
  "slurm_multinode.sbatch",
  "local_two_process.sh",
  "lib.sh",
]
# The variables the scripts read; cleared so the caller's shell cannot change the result.
_SCRIPT_VARS = (
  "DRY_RUN NAME ZONE PROJECT ACCELERATOR VERSION CONFIG WORKDIR SOURCE REPO_URL "
  "GIT_REF REMOTE_DIR REMOTE_PYTHON JAX_VERSION DETACH DELETE_AFTER PYTHON "
  "INSTALL PORT NUM_PROCESSES DEVICES_PER_PROCESS LOG_DIR MAX_REQUEUES "
  "REQUEUE_MARGIN SLURM_JOB_ID SLURM_SUBMIT_DIR SLURM_RESTART_COUNT SLURM_NTASKS "
  "SLURM_PROCID SLURM_LOCALID SLURM_GPUS_ON_NODE SLURM_NTASKS_PER_NODE"
).split()


def _script_env(env):
  full_env = {k: v for k, v in os.environ.items() if k not in _SCRIPT_VARS}
  full_env.update(env or {})
  return full_env


def _run(script, *args, env=None, timeout=30, cwd=REPO):
  return subprocess.run(
    ["bash", os.path.join(LAUNCH, script), *args],
    env=_script_env(env),
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _commands(stdout):
  return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax_and_conventions(script):
  path = os.path.join(LAUNCH, script)
  subprocess.run(["bash", "-n", path], check=True)
  text = open(path).read()
  assert "set -euo pipefail" in text or script == "lib.sh"
  if script != "lib.sh":
    assert "Usage" in text and "DRY_RUN=1" in text
    assert os.access(path, os.X_OK), f"{script} is not executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_is_clean():
  paths = [os.path.join(LAUNCH, s) for s in SCRIPTS]
  result = subprocess.run(["shellcheck", "-x", *paths], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


# --- Cloud TPU pod -------------------------------------------------------------------------

TPU_ENV = {
  "DRY_RUN": "1",
  "NAME": "mcl-pod",
  "ZONE": "us-central2-b",
  "PROJECT": "proj",
  "CONFIG": "cifar100_resnet32:mcl_x4",
  "WORKDIR": "gs://bucket/mcl/r32 x4",
}  # A space, to check the quoting.


def test_tpu_pod_dry_run_prints_every_step():
  result = _run(
    "tpu_pod.sh", "all", "--", "--config.optim.lr=0.05", env={**TPU_ENV, "DELETE_AFTER": "1"}
  )
  assert result.returncode == 0, result.stderr
  cmds = _commands(result.stdout)
  gcloud = [c for c in cmds if c[0] == "gcloud"]
  create, rm_old, scp, install, train, delete = gcloud
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "mcl-pod"]
  assert {
    "--zone=us-central2-b",
    "--project=proj",
    "--accelerator-type=v4-32",
    "--version=tpu-ubuntu2204-base",
  } <= set(create)
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert "--recurse" in scp and "--worker=all" in scp and "mcl-pod:~/" in scp
  for c in (rm_old, install, train):
    assert c[4:6] == ["ssh", "mcl-pod"] and "--worker=all" in c
  assert "rm -rf ~/mcl_jax" in rm_old[rm_old.index("--command") + 1]
  install_cmd = install[install.index("--command") + 1]
  assert "pip install -q -r requirements.txt" in install_cmd
  assert "jax[tpu]==0.10.2" in shlex.split(install_cmd.split("&&")[-1])
  remote = shlex.split(train[train.index("--command") + 1])
  assert remote[:3] == ["cd", "~/mcl_jax", "&&"]
  assert remote[3].endswith("/bin/python") and remote[4:6] == ["-m", "mcl_jax.main"]
  assert remote[6:] == [
    "--config=cifar100_resnet32:mcl_x4",
    "--workdir=gs://bucket/mcl/r32 x4",
    "--config.optim.lr=0.05",
  ]
  assert delete[4:6] == ["delete", "mcl-pod"] and "--quiet" in delete
  # The staging commands (local) come between create and scp.
  assert any(c[0] == "bash" and "git ls-files" in c[2] for c in cmds)


def test_tpu_pod_git_clone_and_detached_run():
  env = {**TPU_ENV, "SOURCE": "git", "REPO_URL": "https://example.com/mcl_jax.git", "DETACH": "1"}
  result = _run("tpu_pod.sh", env=env)  # Default steps: create clone install run.
  assert result.returncode == 0, result.stderr
  cmds = _commands(result.stdout)
  remote = [c[c.index("--command") + 1] for c in cmds if "--command" in c]
  assert "git clone https://example.com/mcl_jax.git ~/mcl_jax" in remote[0]
  assert remote[-1].startswith("cd ~/mcl_jax && nohup ")
  assert remote[-1].endswith("> ~/mcl_jax_run.log 2>&1 < /dev/null &")
  assert not any("scp" in c for c in cmds)


def test_tpu_pod_rejects_local_workdir_and_unknown_step():
  result = _run("tpu_pod.sh", "run", env={**TPU_ENV, "WORKDIR": "/tmp/run"})
  assert result.returncode != 0 and "gs://" in result.stderr
  result = _run("tpu_pod.sh", "launch", env=TPU_ENV)
  assert result.returncode != 0 and "unknown step 'launch'" in result.stderr


# --- one GPU node ------------------------------------------------------------------------


def test_gpu_single_node_dry_run():
  env = {
    "DRY_RUN": "1",
    "CONFIG": "cifar100_resnet32:mcl_x2",
    "WORKDIR": "workdirs/r32",
    "PYTHON": "python3",
    "INSTALL": "1",
  }
  result = _run("gpu_single_node.sh", "--config.optim.lr=0.05", env=env)
  assert result.returncode == 0, result.stderr
  install, train = _commands(result.stdout)
  assert install[:4] == ["python3", "-m", "pip", "install"] and "jax[cuda12]==0.10.2" in install
  main = train[train.index("python3") :]
  assert main == [
    "python3",
    "-m",
    "mcl_jax.main",
    "--config=cifar100_resnet32:mcl_x2",
    "--workdir=workdirs/r32",
    "--config.optim.lr=0.05",
  ]
  assert not any("coordinator" in a for a in train)


def test_gpu_single_node_needs_config():
  result = _run("gpu_single_node.sh", env={"DRY_RUN": "1", "WORKDIR": "w"})
  assert result.returncode != 0 and "CONFIG is not set" in result.stderr


# --- local multi-process -----------------------------------------------------------------


def test_local_two_process_dry_run():
  env = {
    "DRY_RUN": "1",
    "CONFIG": "digits:mcl_x2,smoke",
    "WORKDIR": "wd",
    "PORT": "23456",
    "PYTHON": "python3",
  }
  result = _run("local_two_process.sh", env=env)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  launches = [line for line in lines if line.endswith("&")]
  assert len(launches) == 2 and lines[-1] == "wait"
  for i, line in enumerate(launches):
    cmd = shlex.split(line)
    assert cmd[-4:] == [">", f"wd/launch_logs/process_{i}.log", "2>&1", "&"]
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=4" in cmd
    assert "JAX_PLATFORMS=cpu" in cmd
    main = cmd[cmd.index("python3") : -4]
    assert main == [
      "python3",
      "-m",
      "mcl_jax.main",
      "--config=digits:mcl_x2,smoke",
      "--workdir=wd",
      "--coordinator_address=localhost:23456",
      "--num_processes=2",
      f"--process_id={i}",
    ]


_FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python: records its arguments and environment, then exits as told.
id=$(printf '%s\\n' "$@" | sed -n 's/^--process_id=//p')
printf '%s\\n' "$@" > "$FAKE_OUT/args_$id"
printf '%s\\n' "$XLA_FLAGS" "$JAX_PLATFORMS" > "$FAKE_OUT/env_$id"
if [[ "$id" == "${FAIL_ID:-none}" ]]; then exit 3; fi
if [[ "$id" == "${SLOW_ID:-none}" ]]; then exec sleep 60; fi
if [[ -n "${SAVE_ON_TERM:-}" ]]; then  # like the trainer: SIGTERM -> save (1 s) -> exit 0
  trap 'kill "$sleeper"; sleep 1; echo saved > "$FAKE_OUT/saved_$id"; exit 0' TERM
  sleep 60 &
  sleeper=$!
  echo started > "$FAKE_OUT/started_$id"
  wait "$sleeper"
  exit 1
fi
exit 0
"""


def _fake_python(tmp_path):
  path = tmp_path / "fake_python"
  path.write_text(_FAKE_PYTHON)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  out = tmp_path / "out"
  out.mkdir()
  return str(path), out


def test_local_two_process_waits_for_both(tmp_path):
  python, out = _fake_python(tmp_path)
  env = {
    "PYTHON": python,
    "FAKE_OUT": str(out),
    "WORKDIR": str(tmp_path / "wd"),
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
  }
  result = _run("local_two_process.sh", "--extra=1", env=env)
  assert result.returncode == 0, result.stderr
  for i in (0, 1):
    args = (out / f"args_{i}").read_text().split()
    assert args[:2] == ["-m", "mcl_jax.main"]
    assert f"--process_id={i}" in args and "--num_processes=2" in args
    assert args[-1] == "--extra=1"
    # The caller's device count (8, as in conftest) is replaced, not duplicated.
    assert (out / f"env_{i}").read_text().split() == [
      "--xla_force_host_platform_device_count=4",
      "cpu",
    ]
  assert (tmp_path / "wd" / "launch_logs" / "process_1.log").exists()


def test_local_two_process_fails_fast_when_one_fails(tmp_path):
  python, out = _fake_python(tmp_path)
  env = {
    "PYTHON": python,
    "FAKE_OUT": str(out),
    "WORKDIR": str(tmp_path / "wd"),
    "FAIL_ID": "1",
    "SLOW_ID": "0",
  }
  start = time.monotonic()
  result = _run("local_two_process.sh", env=env)
  # Process 1 exits 3 at once; process 0 (asleep for 60 s) is stopped, not waited for.
  assert result.returncode == 3
  assert time.monotonic() - start < 20
  assert "process 1 failed (exit 3)" in result.stderr
  assert "stopping the other processes" in result.stderr


def test_local_two_process_sigterm_waits_for_every_save(tmp_path):
  """SIGTERM to the script reaches every process, and the script exits only once they have
  saved and exited (a preemption drill; tests/test_multihost.py runs the real trainer)."""
  python, out = _fake_python(tmp_path)
  env = {
    "PYTHON": python,
    "FAKE_OUT": str(out),
    "WORKDIR": str(tmp_path / "wd"),
    "SAVE_ON_TERM": "1",
  }
  proc = subprocess.Popen(
    ["bash", os.path.join(LAUNCH, "local_two_process.sh")],
    env=_script_env(env),
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.monotonic() + 20
    while not all((out / f"started_{i}").exists() for i in (0, 1)):
      assert time.monotonic() < deadline and proc.poll() is None, proc.poll()
      time.sleep(0.05)
    proc.terminate()
    _, stderr = proc.communicate(timeout=20)
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == 143, stderr
  assert all((out / f"saved_{i}").exists() for i in (0, 1)), stderr
  assert "every process saves a checkpoint and stops" in stderr


# --- SLURM -------------------------------------------------------------------------------


def test_sbatch_directives():
  text = open(os.path.join(LAUNCH, "slurm_multinode.sbatch")).read()
  directives = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
  names = {d.split("=")[0] for d in directives}
  assert {
    "--nodes",
    "--ntasks-per-node",
    "--gpus-per-node",
    "--time",
    "--requeue",
    "--signal",
    "--open-mode",
  } <= names
  assert "--signal=TERM@120" in directives
  # sbatch stops reading directives at the first command: all must come before it.
  first_command = min(
    i for i, line in enumerate(text.splitlines()) if line.strip() and not line.startswith("#")
  )
  last_directive = max(i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
  assert last_directive < first_command
  assert re.search(r"^run srun ", text, flags=re.M)


def test_sbatch_dry_run_prints_srun():
  env = {"DRY_RUN": "1", "CONFIG": "c", "WORKDIR": "/shared/w", "PYTHON": "python3"}
  result = _run("slurm_multinode.sbatch", "--config.seed=1", env=env)
  assert result.returncode == 0, result.stderr
  (cmd,) = _commands(result.stdout)
  assert cmd[0] == "srun" and "--kill-on-bad-exit=1" in cmd
  assert cmd[cmd.index("python3") :] == [
    "python3",
    "-m",
    "mcl_jax.main",
    "--config=c",
    "--workdir=/shared/w",
    "--config.seed=1",
  ]


def _fake_slurm_bin(tmp_path, time_left, srun_rc):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls"
  fakes = {
    "srun": f'echo "srun $*" >> {log}; exit {srun_rc}',
    "squeue": f'echo "{time_left}"',
    "scontrol": f'echo "scontrol $*" >> {log}',
  }
  for name, body in fakes.items():
    path = bin_dir / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return bin_dir, log


@pytest.mark.parametrize(
  "time_left,srun_rc,requeued,rc",
  [
    ("1:55", 0, True, 0),  # Stopped by --signal=TERM@120: requeue.
    ("1-02:00:00", 0, False, 0),  # Finished with a day left: done.
    ("3:00:00", 1, False, 1),  # Crashed early: no requeue, the error is reported.
  ],
)
def test_sbatch_requeues_only_at_the_time_limit(tmp_path, time_left, srun_rc, requeued, rc):
  bin_dir, log = _fake_slurm_bin(tmp_path, time_left, srun_rc)
  env = {
    "PATH": f"{bin_dir}:{os.environ['PATH']}",
    "CONFIG": "c",
    "WORKDIR": "/shared/w",
    "PYTHON": "python3",
    "SLURM_JOB_ID": "42",
    "SLURM_SUBMIT_DIR": REPO,
    "SLURM_RESTART_COUNT": "0",
  }
  result = _run("slurm_multinode.sbatch", env=env)
  assert result.returncode == rc, result.stderr
  calls = log.read_text().splitlines()
  assert calls[0].startswith("srun --kill-on-bad-exit=1")
  assert ("scontrol requeue 42" in calls) == requeued


def test_sbatch_rejects_tasks_not_matching_gpus():
  env = {
    "DRY_RUN": "1",
    "CONFIG": "c",
    "WORKDIR": "w",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_NTASKS_PER_NODE": "1",
  }
  result = _run("slurm_multinode.sbatch", env=env)
  assert result.returncode != 0 and "one process per GPU" in result.stderr
