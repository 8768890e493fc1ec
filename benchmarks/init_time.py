"""Time to initialise a cohort's state: op by op (eager) against one jitted function
with XLA's backend optimisations off (`train_state.INIT_COMPILER_OPTIONS`), in one fresh
process, and how far apart the two initial states are (docs/PERFORMANCE.md).

  .venv/bin/python benchmarks/init_time.py [--config=cifar100_resnet32:mcl_x4]
"""

import importlib
import sys
import time

import jax
import numpy as np

from mcl_jax import optim
from mcl_jax import sharding
from mcl_jax import train_state


def main(name: str) -> None:
  module, _, arg = name.partition(":")
  config = importlib.import_module(f"mcl_jax.configs.{module}").get_config(arg or None)
  model = train_state.build_model(config, config.model.num_classes or 100)
  tx, _ = optim.make_optimizer(config, 390)
  mesh = sharding.make_mesh()
  shape = (config.input.image_size, config.input.image_size, 3)

  def init(rng):
    return train_state.TrainState(
      step=jax.numpy.zeros((), jax.numpy.int32),
      rng=rng,
      **train_state.init_variables(model, tx, shape, rng),
    )

  rng = jax.random.PRNGKey(0)
  start = time.time()
  eager = jax.device_get(init(rng))
  eager_s = time.time() - start
  start = time.time()
  shardings = train_state.state_shardings(jax.eval_shape(init, rng), mesh)
  jitted = jax.device_get(train_state.initialise(init, rng, shardings))
  jitted_s = time.time() - start
  diffs = [
    float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted))
  ]
  print(
    f"{name}: eager (first call) {eager_s:.1f} s, jitted without backend optimisations "
    f"{jitted_s:.1f} s (compile included), ratio {eager_s / jitted_s:.1f}x; max "
    f"|difference| {max(diffs):.2g}, {sum(d == 0 for d in diffs)}/{len(diffs)} leaves "
    "identical"
  )


if __name__ == "__main__":
  flag = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")]
  main(flag[0] if flag else "cifar100_resnet32:mcl_x4")
