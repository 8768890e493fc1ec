"""Helpers shared by the TPU and GPU compile tests (tests/test_plan.py, test_plan_gpu.py;
`import plan_checks` works because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import math

import jax

from mcl_jax import losses
from mcl_jax import plan


def shrunk(name: str, **overrides) -> object:
  """A shipped config (its smoke variant) at the smallest shapes: 16 px, batch 8."""
  c = plan.load_config(name)
  c.input.image_size = 16
  c.input.global_batch_size = c.input.eval_batch_size = 8
  for key, value in overrides.items():
    section, field = key.split("__")
    c[section][field] = value
  return c


def assert_gradients_reduced_once(planned, result) -> None:
  """The all-reduced elements cover every trained parameter's gradient once: at least as
  many as those parameters have (the gradients are reduced at all) and under twice (not
  once per member). Elements, not bytes: a bfloat16 step reduces bfloat16 gradients.
  Without MCL terms the projection head gets no gradient, so it is not counted."""
  trained = [
    leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(planned.state.params)[0]
    if any(losses.mcl_weights(planned.config.loss).values())
    or "head" not in [getattr(k, "key", None) for k in path]
  ]
  params = sum(math.prod(x.shape) for x in trained)
  reduced = result["collectives"]["all-reduce"]["elements"]
  assert params <= reduced < 2 * params, (params, reduced)


def compile_train(config, topology: str, num_chips: int, **analyse_kwargs):
  """(planned, the plan's result, the compiled program) of `config`'s train step compiled
  for `topology`'s compile-only devices, as `mcl-plan` compiles it."""
  planned = plan.build(config, topology)
  result, compiled = plan.compile_and_analyse(
    planned.task.compiled_train_step,
    (planned.state, planned.batch, planned.task.consts),
    plan.chip_spec(topology),
    num_chips=num_chips,
    batch_size=config.input.global_batch_size,
    **analyse_kwargs,
  )
  return planned, result, compiled
