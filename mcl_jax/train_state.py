"""The cohort's train state and how it is built: the model from the config, the state
initialised already sharded (or only its shapes, for planning and restores), and where each
part of it lives on the mesh. Every regime whose members are `models.Cohort` networks
(supervised, SimCLR, and the linear probe's frozen encoder) builds its state here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mcl_jax import memory_bank
from mcl_jax import models
from mcl_jax import sharding as sharding_lib
from mcl_jax.errors import ConfigError


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key: checkpoints as a plain array.
  bank: jax.Array | None = None  # [M, N, d] memory bank (loss.regime == "bank"), see bank.layout.


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """The activations' dtype `config.model.dtype` names (parameters stay float32)."""
  return jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> models.Cohort:
  return models.Cohort(
    arch=config.model.arch,
    num_classes=num_classes,
    num_members=config.cohort.num_members,
    shared_stages=config.model.shared_stages,
    embed_dim=config.model.embed_dim,
    strategy=config.model.strategy,  # 'auto': see models.resolve_strategy
    dtype=compute_dtype(config),
    head=config.model.head,
    head_norm=config.model.head_norm,
  )


def init_variables(
  model: models.Cohort,
  tx: optax.GradientTransformation,
  image_shape: tuple[int, ...],
  rng: jax.Array,
) -> dict[str, Any]:
  """Params, BN statistics and optimiser state of a freshly initialised cohort."""
  variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  return {
    "params": variables["params"],
    "batch_stats": variables.get("batch_stats", {}),
    "opt_state": tx.init(variables["params"]),
  }


def _init_bank(
  model: models.Cohort, bank_rows: int, bank_dtype: str, num_devices: int, rng: jax.Array
) -> jax.Array:
  """The bank drawn for exactly `bank_rows` rows, zero-padded to split over the devices."""
  bank = memory_bank.init(rng, model.num_members, bank_rows, model.embed_dim, bank_dtype)
  padding = round_up(bank_rows, num_devices) - bank_rows
  return jnp.pad(bank, ((0, 0), (0, padding), (0, 0)))


def state_init(
  model: models.Cohort,
  tx: optax.GradientTransformation,
  image_shape: tuple[int, ...],
  num_devices: int,
  *,
  bank_rows: int = 0,
  bank_dtype: str = "float32",
) -> Callable[[jax.Array], TrainState]:
  """rng -> the initial state (pure; `create_train_state` compiles it, and
  `abstract_train_state` traces it)."""

  def init(rng):
    init_rng, bank_rng, state_rng = jax.random.split(rng, 3)
    bank = _init_bank(model, bank_rows, bank_dtype, num_devices, bank_rng) if bank_rows else None
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      rng=state_rng,
      bank=bank,
      **init_variables(model, tx, image_shape, init_rng),
    )

  return init


def abstract_train_state(
  model: models.Cohort,
  tx: optax.GradientTransformation,
  image_shape: tuple[int, ...],
  mesh: jax.sharding.Mesh,
  *,
  bank_rows: int = 0,
  bank_dtype: str = "float32",
) -> TrainState:
  """Shapes and dtypes of the state without allocating it (memory planning, restores)."""
  init = state_init(model, tx, image_shape, mesh.size, bank_rows=bank_rows, bank_dtype=bank_dtype)
  return jax.eval_shape(init, jax.random.PRNGKey(0))


# The state is initialised by one jitted function with output shardings (every regime the
# same way). It runs once, so XLA's backend optimisations buy nothing there, and with them
# compiling the init of M deep networks (a random-bits kernel per parameter) took longer
# than running it op by op; without them it is the faster of the two (docs/PERFORMANCE.md,
# "Initialisation"), and the values agree to one float32 ulp.
INIT_COMPILER_OPTIONS = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
}


def initialise(init: Callable[[jax.Array], Any], rng: jax.Array, shardings: Any) -> Any:
  """`init(rng)` compiled once (INIT_COMPILER_OPTIONS) and run with `shardings` as its
  output shardings: the state is created where it lives, no device ever holding more."""
  compiled = (
    jax.jit(init, out_shardings=shardings)
    .lower(rng)
    # JAX annotates option values as str | bool; XLA takes the int level as well.
    .compile(compiler_options=INIT_COMPILER_OPTIONS)  # type: ignore[arg-type]
  )
  return compiled(rng)


def create_train_state(
  model: models.Cohort,
  tx: optax.GradientTransformation,
  image_shape: tuple[int, ...],
  rng: jax.Array,
  mesh: jax.sharding.Mesh,
  *,
  bank_rows: int = 0,
  bank_layout: str = "sharded",
  bank_dtype: str = "float32",
) -> TrainState:
  """The state, created already sharded (params replicated, the bank placed as
  `bank_layout` says: split along its rows, or replicated).

  bank_rows: the number of training examples (0: no bank). The bank is drawn for exactly
  those rows, then zero-padded to a multiple of the device count so it splits evenly: the
  same seed gives the same bank on any number of devices, and padding rows are never
  sampled (indices come from the class table of the real examples). bank_dtype: its
  storage dtype (memory_bank.DTYPES).
  """

  init = state_init(model, tx, image_shape, mesh.size, bank_rows=bank_rows, bank_dtype=bank_dtype)
  shardings = state_shardings(jax.eval_shape(init, rng), mesh, bank_layout=bank_layout)
  return initialise(init, rng, shardings)


def state_shardings(
  state: TrainState, mesh: jax.sharding.Mesh, *, bank_layout: str = "sharded"
) -> TrainState:
  """Everything replicated but the bank, which `bank_layout` (memory_bank.LAYOUTS) places."""
  replicated = sharding_lib.replicated(mesh)
  shardings = jax.tree.map(lambda _: replicated, state)
  if state.bank is not None:
    shardings = shardings.replace(bank=memory_bank.layout_sharding(bank_layout, mesh))
  return shardings


def num_classes(config: ml_collections.ConfigDict, source: Any) -> int:
  """config.model.num_classes, or the dataset's when 0; fewer than the dataset has is an
  error (labels beyond the classifier would index outside its logits)."""
  n = config.model.num_classes or source.num_classes
  if n < source.num_classes:
    raise ConfigError(
      f"config.model.num_classes={n} but {config.input.dataset} has "
      f"{source.num_classes} classes (labels up to {source.num_classes - 1}); "
      "set it to 0 to take the dataset's."
    )
  return n


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple
