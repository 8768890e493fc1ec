r"""Entry point: `mcl-train --config=<experiment>[:ARG] --workdir=DIR` (or
`python -m mcl_jax.main ...`).

Flags only: the trainers are libraries (`mcl_jax.jobs.run`). `--config` names one of the
package's configs (`fashion_mnist:mcl_x2`, `cifar100_resnet32.py:mcl_x4`) or a config file
of your own; its fields can be overridden on the command line (`--config.optim.lr=0.05`),
and `:ARG` is passed to the config's `get_config` ('variant[,smoke]'). Multi-process runs
(TPU pods, SLURM, explicit coordinator flags) initialise `jax.distributed` before any device
is touched.

Bad input (an unknown field or architecture, an impossible batch split, a workdir that
cannot be written) ends with one sentence on stderr and exit status 2, not a traceback.
Other failures that end in one sentence, each with its own exit status:
  3  the loss diverged (`loop.DivergedError`; nothing non-finite saved);
  4  another process of a multi-process run was lost (killed, its machine gone): the
     sentence names it and the newest complete checkpoint, which a restart of every
     process resumes from;
  5  a checkpoint save ran out of disk space (`checkpointing.DiskFullError`): its partial
     files are removed, the previous checkpoint is intact, and a rerun resumes from it.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command's flags, defined when it runs (importing this module defines none)."""
  config_flags.DEFINE_config_file(
    "config",
    None,
    "An experiment config: NAME[:ARG] of mcl_jax/configs/, or a file.",
    lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for checkpoints and logs.")
  flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for explicit multi-process launches."
  )
  flags.DEFINE_integer("num_processes", None, "Number of processes (explicit launches).")
  flags.DEFINE_integer("process_id", None, "This process's id (explicit launches).")
  flags.DEFINE_integer(
    "heartbeat_timeout_s",
    HEARTBEAT_TIMEOUT_S,
    "Multi-process runs: seconds without a heartbeat after which a process counts as lost "
    "and every other one stops (docs/LAUNCH.md, 'A lost process').",
  )
  flags.mark_flags_as_required(["config", "workdir"])


# jax.distributed's timeouts, explicit so that the bound on a lost process is ours, not a
# library default. A process that stops sending heartbeats (killed, its machine or network
# gone, hung) for HEARTBEAT_TIMEOUT_S is declared dead by the coordinator, and every other
# process is then stopped by JAX itself, even one blocked in a collective that would
# otherwise wait forever. JAX's default is 100 s; heartbeats come from a thread of their
# own, so long compiles or slow steps do not delay them, and 60 s still leaves a loaded
# host's scheduler hiccups far behind. (A peer that dies with its sockets, as a killed
# process does, is usually noticed sooner: the next collective fails at once; see
# `lost_process_sentence`.)
HEARTBEAT_TIMEOUT_S = 60
# How long a process waits at start-up for all the others to join (a pod's hosts may start
# minutes apart), and how long the coordinator waits at the end for all to finish: JAX's
# defaults, stated.
INITIALIZATION_TIMEOUT_S = 300
SHUTDOWN_TIMEOUT_S = 300
EXIT_LOST_PROCESS = 4
EXIT_DISK_FULL = 5
# What a collective or the coordination service says when a peer process is gone: Gloo's
# (CPU) socket errors, NCCL's "remote process exited", gRPC's UNAVAILABLE, the
# coordinator's heartbeat verdicts.
_LOST_PEER = re.compile(
  r"Gloo|[Cc]onnection (reset|closed|refused)|Socket closed|heartbeat|"
  r"unhealthy|UNAVAILABLE|[Pp]eer|remote process exited"
)


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _exit_now(message: str, status: int) -> None:
  """Prints `error: message` and ends the process at once, without Python's exit handlers:
  after a lost process, JAX's would wait for it in a shutdown barrier until the heartbeat
  timeout and then abort; after a failed save, the abandoned writes of Orbax's threads
  would print their own errors after this sentence."""
  from absl import logging as absl_logging

  absl_logging.flush()
  print(f"error: {message}", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def lost_process_sentence(error: Exception, workdir: str) -> str | None:
  """One sentence naming the lost process(es) when `error` (raised by a collective or the
  coordination service of a multi-process run) says a peer is gone; None otherwise."""
  import jax

  from mcl_jax import checkpointing

  text = str(error)
  count, me = jax.process_count(), jax.process_index()
  if count < 2 or not _LOST_PEER.search(text):
    return None
  lost = sorted({int(t) for t in re.findall(r"[Tt]ask (\d+)", text)} - {me})
  if not lost and count == 2:
    lost = [1 - me]  # the one peer there is
  if not lost:
    lost = _processes_not_alive(count)
  who = (
    f"process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))}"
    if lost
    else "another process"
  )
  detail = text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
  newest = checkpointing.newest_complete_step(checkpointing.checkpoint_dir(workdir))
  resume = (
    "no checkpoint has been saved yet, so a restart begins afresh"
    if newest is None
    else f"the newest complete checkpoint is step {newest} in "
    f"{checkpointing.checkpoint_dir(workdir)}, which a restart resumes from"
  )
  return (
    f"{who} of this {count}-process run was lost ({detail}), so process {me} stopped; "
    f"{resume}; restart all {count} processes with the same command."
  )


def _processes_not_alive(count: int) -> list[int]:
  """The processes the coordinator no longer counts as alive. It answers once the lost
  ones have missed their heartbeats, so the question is given that long and a little more;
  [] when it cannot tell."""
  import threading

  try:
    from jax._src import distributed  # the client has no public handle

    client = distributed.global_state.client
  except ImportError:
    return []
  if client is None:
    return []
  answer: dict[str, Any] = {}

  def ask():
    try:
      answer["alive"] = client.get_live_nodes(list(range(count)))
    except Exception:  # noqa: BLE001 -- the coordinator itself may be the lost one
      answer["alive"] = None

  asker = threading.Thread(target=ask, daemon=True)
  asker.start()
  asker.join(FLAGS.heartbeat_timeout_s + 10)
  alive = answer.get("alive")
  return [] if not alive else sorted(set(range(count)) - set(alive))


def _on_cloud_tpu_vm() -> bool:
  try:  # JAX's own detection (it asks the TPU VM's metadata server).
    from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm

    return bool(running_in_cloud_tpu_vm)
  except ImportError:
    return os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")


def initialize_distributed() -> None:
  """jax.distributed for multi-process runs: explicit flags, or auto-detection on Cloud TPU
  VMs (every host of a pod runs this command) and under SLURM with several tasks (one
  process per GPU: JAX gives each task the GPU numbered $SLURM_LOCALID). A plain
  single-process run skips it."""
  import jax

  if FLAGS.coordinator_address or FLAGS.num_processes:
    if not (FLAGS.coordinator_address and FLAGS.num_processes and FLAGS.process_id is not None):
      fail("--coordinator_address, --num_processes and --process_id go together; pass all three.")
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
      **_distributed_timeouts(),
    )
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or _on_cloud_tpu_vm():
    jax.distributed.initialize(**_distributed_timeouts())


def _distributed_timeouts() -> dict[str, Any]:
  if FLAGS.heartbeat_timeout_s < 1:
    fail(f"--heartbeat_timeout_s={FLAGS.heartbeat_timeout_s} must be at least 1.")
  return {
    "initialization_timeout": INITIALIZATION_TIMEOUT_S,
    "heartbeat_timeout_seconds": FLAGS.heartbeat_timeout_s,
    "shutdown_timeout_seconds": SHUTDOWN_TIMEOUT_S,
  }


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {' '.join(argv[1:])}; pass options as --flag=value.")
  # TensorFlow is only the input pipeline: keep it off GPUs/TPUs JAX needs.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from mcl_jax import checkpointing
  from mcl_jax import config_lib
  from mcl_jax import jobs
  from mcl_jax import loop

  loop.quiet_library_logs()
  initialize_distributed()
  import jax

  logging.info(
    "JAX process %d/%d, %d local / %d global devices (%s).",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.default_backend(),
  )
  try:
    jobs.run(FLAGS.config, FLAGS.workdir)
  except (config_lib.ConfigError, FileNotFoundError) as e:
    fail(str(e))
  except loop.DivergedError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  except checkpointing.DiskFullError as e:
    _exit_now(str(e), EXIT_DISK_FULL)
  except jax.errors.JaxRuntimeError as e:
    sentence = lost_process_sentence(e, FLAGS.workdir)
    if sentence is None:
      raise
    _exit_now(sentence, EXIT_LOST_PROCESS)


def _parse_flags(argv):
  """absl's parser, with config-override errors turned into one sentence.

  `--config=NAME[:ARG]` may name a file or one of the package's configs
  (`config_lib.resolve_config_path`)."""
  from mcl_jax import config_lib

  argv = [
    f"--config={config_lib.resolve_config_path(a[len('--config=') :])}"
    if a.startswith("--config=")
    else a
    for a in argv
  ]
  try:
    return FLAGS(argv)
  except flags.Error as e:  # e.g. a config file whose get_config(arg) rejected its argument
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    fail(f"{lines[0]} {lines[-1]}" if len(lines) > 1 else lines[0])
  except (AttributeError, KeyError) as e:  # an override naming a field the config lacks
    text = str(e).replace("\\'", "'")
    field = re.search(r"'([^'\s\\]+)'", text)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    fail(
      f"unknown config field {field.group(1) if field else text!r} in a --config.* override"
      + (f"; did you mean {hint.group(1)!r}?" if hint else ".")
    )


def run_cli() -> None:
  """The `mcl-train` command."""
  _define_flags()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run_cli()
