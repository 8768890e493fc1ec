r"""Entry point: `mcl-train --config=<experiment>[:ARG] --workdir=DIR` (or
`python -m mcl_jax.main ...`).

Flags only: the trainers are libraries (`mcl_jax.jobs.run`). `--config` names one of the
package's configs (`fashion_mnist:mcl_x2`, `cifar100_resnet32.py:mcl_x4`) or a config file
of your own; its fields can be overridden on the command line (`--config.optim.lr=0.05`),
and `:ARG` is passed to the config's `get_config` ('variant[,smoke]'). Multi-process runs (TPU pods, SLURM, explicit coordinator flags)
initialise `jax.distributed` before any device is touched.

Bad input (an unknown field or architecture, an impossible batch split, a workdir that
cannot be written) ends with one sentence on stderr and exit status 2, not a traceback.
"""
from __future__ import annotations

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command's flags, defined when it runs (importing this module defines none)."""
  config_flags.DEFINE_config_file(
      "config", None, "An experiment config: NAME[:ARG] of mcl_jax/configs/, or a file.",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for checkpoints and logs.")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, for explicit multi-process launches.")
  flags.DEFINE_integer("num_processes", None, "Number of processes (explicit launches).")
  flags.DEFINE_integer("process_id", None, "This process's id (explicit launches).")
  flags.mark_flags_as_required(["config", "workdir"])


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


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
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or _on_cloud_tpu_vm():
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {' '.join(argv[1:])}; pass options as --flag=value.")
  # TensorFlow is only the input pipeline: keep it off GPUs/TPUs JAX needs.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from mcl_jax import config_lib
  from mcl_jax import jobs
  from mcl_jax import loop
  loop.quiet_library_logs()
  initialize_distributed()
  import jax
  logging.info("JAX process %d/%d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  try:
    jobs.run(FLAGS.config, FLAGS.workdir)
  except (config_lib.ConfigError, FileNotFoundError) as e:
    fail(str(e))
  except loop.DivergedError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


def _parse_flags(argv):
  """absl's parser, with config-override errors turned into one sentence.

  `--config=NAME[:ARG]` may name a file or one of the package's configs
  (`config_lib.resolve_config_path`)."""
  from mcl_jax import config_lib
  argv = [f"--config={config_lib.resolve_config_path(a[len('--config='):])}"
          if a.startswith("--config=") else a for a in argv]
  try:
    return FLAGS(argv)
  except flags.Error as e:  # e.g. a config file whose get_config(arg) rejected its argument
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    fail(f"{lines[0]} {lines[-1]}" if len(lines) > 1 else lines[0])
  except (AttributeError, KeyError) as e:  # an override naming a field the config lacks
    text = str(e).replace("\\'", "'")
    field = re.search(r"'([^'\s\\]+)'", text)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    fail(f"unknown config field {field.group(1) if field else text!r} in a --config.* override"
         + (f"; did you mean {hint.group(1)!r}?" if hint else "."))


def run_cli() -> None:
  """The `mcl-train` command."""
  _define_flags()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run_cli()
