"""The optimiser and its learning-rate schedule (docs/SPEC.md 4), shared by every trainer.

SGD with momentum (Nesterov optional) and COUPLED weight decay on every parameter, as
torch.optim.SGD over model.parameters(): the decay is added to the gradient before the
momentum, so it is scaled by the learning rate and accumulated in the momentum buffer
(tests/test_step_parity.py checks 20 steps against the official code). Durations are in
epochs; the schedule turns them into steps with the run's steps per epoch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

# The LR at a step (a Python int on the host, a traced array inside optax's update).
Schedule = Callable[[int | jax.Array], jax.Array]


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Schedule:
  """LR as a function of the step; epochs are whole (official) or fractional (per step).

  `schedule.kind`: 'cosine' to 0 over `schedule.epochs`, or 'step' (x `decay_factor` at
  each of `boundaries`, bisect_right as the official adjust_lr). `schedule.per_epoch`: the
  official once-per-epoch updates, else every step. `schedule.warmup_epochs` > 0
  multiplies it by a linear ramp (step + 1) / warm-up steps, updated every step.
  """
  sched, base_lr = config.schedule, config.optim.lr
  boundaries = sorted(sched.boundaries) or [sched.epochs + 1]
  warmup_steps = sched.get("warmup_epochs", 0.0) * steps_per_epoch

  def schedule(step):
    # The default float dtype: float32, or float64 under jax.enable_x64 (a float32 LR would
    # round 0.01 by 2e-8, which tests/test_step_parity.py sees in float64).
    step = jnp.asarray(step, jnp.result_type(float))
    epoch = step / steps_per_epoch
    if sched.per_epoch:
      epoch = jnp.floor(epoch)
    if sched.kind == "cosine":
      lr = base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / sched.epochs))
    else:
      lr = base_lr * sched.decay_factor ** jnp.sum(epoch >= jnp.asarray(boundaries, step.dtype))
    if warmup_steps > 0:
      lr = lr * jnp.minimum(1.0, (step + 1) / warmup_steps)
    return lr

  return schedule


def make_optimizer(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, Schedule]:
  """(SGD with coupled weight decay, its LR schedule) of `config.optim` / `config.schedule`."""
  schedule = learning_rate_schedule(config, steps_per_epoch)
  tx = optax.chain(
    optax.add_decayed_weights(config.optim.weight_decay),
    optax.sgd(schedule, momentum=config.optim.momentum or None, nesterov=config.optim.nesterov),
  )
  return tx, schedule
