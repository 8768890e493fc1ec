"""One call per training job: validate the config once, set up, build the task, fit.

`run(config, workdir)` is what `python -m mcl_jax.main` (`mcl-train`), the reproduction
runner and the demo call; `build(config, workdir)` stops before training and returns the
`loop.Run` (tests and tools drive it a step at a time). The trainer is chosen by
`config.trainer`: each regime module exports `build_task(setup)` (the contract is in
`mcl_jax.loop`), and adding a regime is adding one entry to `TASKS`.
"""
from __future__ import annotations

import importlib
from typing import Any

import jax
import ml_collections

from mcl_jax import config_lib
from mcl_jax import loop

# config.trainer -> the module whose build_task(setup) makes its task.
TASKS = {"supervised": "mcl_jax.supervised", "moco": "mcl_jax.moco", "simclr": "mcl_jax.simclr",
         "lincls": "mcl_jax.lincls"}


def build(config: ml_collections.ConfigDict, workdir: str, *,
          mesh: jax.sharding.Mesh | None = None, **task_options: Any) -> loop.Run:
  """The validated job of `config`, its state freshly initialised (not yet resumed).

  `task_options` go to the regime's build_task (e.g. MoCo's `views`).
  """
  mesh = mesh or loop.sharding_lib.make_mesh()
  config_lib.validate(config, num_devices=mesh.size, workdir=workdir)
  setup = loop.prepare(config, workdir, mesh)
  task = importlib.import_module(TASKS[config.trainer]).build_task(setup, **task_options)
  return loop.Run(task)


def run(config: ml_collections.ConfigDict, workdir: str, **task_options: Any
        ) -> dict[str, Any]:
  """Trains (or resumes) the job of `config` in `workdir`; returns `loop.fit`'s summary."""
  return loop.fit(build(config, workdir, **task_options))
