"""One call per training job: `run(config, workdir)` dispatches on `config.trainer`.

The command-line entry point (`mcl_jax.main`), the reproduction runner and the tests all
start jobs through this function; it holds no flags, so any library can import it.
"""
from __future__ import annotations

from typing import Any

import ml_collections


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the job of `config` in `workdir`; returns the trainer's summary."""
  if config.trainer == "supervised":
    from mcl_jax import train
    return train.train_and_evaluate(config, workdir)
  if config.trainer == "moco":
    from mcl_jax import moco
    return moco.train_and_evaluate(config, workdir)
  if config.trainer == "lincls":
    from mcl_jax import lincls
    return lincls.train_and_evaluate(config, workdir)
  raise AssertionError(config.trainer)  # config_lib.validate has rejected anything else.
