"""One call per training job: validate the config once, set up, build the task, fit.

`run(config, workdir)` is what `python -m mcl_jax.main` (`mcl-train`), the reproduction
runner and the demo call; `build(config, workdir)` stops before training and returns the
`loop.Run` (tests and tools drive it a step at a time). The regime is the one
`config.trainer` names in the registry (`mcl_jax.regimes`); its module builds the task (the
contract is in `mcl_jax.loop`).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from mcl_jax import config_lib
from mcl_jax import loop
from mcl_jax import regimes
from mcl_jax import sharding


def build(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  mesh: jax.sharding.Mesh | None = None,
  **task_options: Any,
) -> loop.Run:
  """The validated job of `config`, its state freshly initialised (not yet resumed).

  `task_options` go to the regime's build_task (e.g. MoCo's `views`).
  """
  mesh = mesh or sharding.make_mesh()
  config_lib.validate(config, num_devices=mesh.size, workdir=workdir)
  setup = loop.prepare(config, workdir, mesh)
  task = regimes.get(config.trainer).build_task(setup, **task_options)
  return loop.Run(task)


def run(config: ml_collections.ConfigDict, workdir: str, **task_options: Any) -> dict[str, Any]:
  """Trains (or resumes) the job of `config` in `workdir`; returns `loop.fit`'s summary."""
  return loop.fit(build(config, workdir, **task_options))
