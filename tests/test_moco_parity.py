"""MoCo-MCL step parity with the official PyTorch code: 10 steps of resnet32 x2, M = 2.

tests/data/official_moco_trajectory.npz was recorded with the official `moco/builder_mcl.py`
and `models/` (tests/data/record_official_moco_trajectory.py; the official code itself is
never in this repository): from the same starting weights, the same queues and the same
10 batches of two fixed views, the official step (query and key ResNet-32s with the linear
head, the momentum update of the key encoders, keys, the model's VCL / ICL / Soft VCL /
Soft ICL, torch SGD with momentum 0.9 and weight decay 1e-4 at lr 0.03, the enqueue, BN in
train mode, shuffle-BN at world size 1 = BN over the whole batch) and
`mcl_jax.moco.train_step` (the function the trainer jits, with its default global BN) must
give the same per-step losses and, after 10 steps, the same query and key parameters, BN
statistics of both encoders, queues and pointer. The queue of 64 keys takes 4 batches of
16, so the pointer wraps twice and the final queues hold the keys of steps 7 to 10.

Tolerances. Both sides run in float64; the recording shows that a float64-rounding-sized
perturbation of the start stays at rounding size over these 10 steps, so two exact
implementations agree to far below the bounds used: 1e-7 relative on the losses; on a
tensor stored whole (float32, 6e-8 relative), 1e-6 of its largest value, as
tests/test_step_parity.py; on a tensor stored as random projections (float64), 1e-6 of its
L2 norm (a bound on its relative L2 error; see the recording script).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcl_jax import convert
from mcl_jax import moco
from mcl_jax import models
from mcl_jax import optim
from mcl_jax.configs import default

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "data"))
import record_official_moco_trajectory as recording  # noqa: E402

PATH = os.path.join(HERE, "data", "official_moco_trajectory.npz")
MEMBERS = recording.MEMBERS
pytestmark = pytest.mark.xdist_group("moco_parity")


@pytest.fixture(scope="module")
def recorded():
  with np.load(PATH) as f:
    return {k: f[k] for k in f.files}


def _by_prefix(recorded, prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix) :]: v for k, v in recorded.items() if k.startswith(prefix)}


def official_start(recorded) -> dict[str, np.ndarray]:
  """The recorded run's starting state dict, regenerated from the seeds (float32 numpy)."""
  shapes = {k: tuple(v) for k, v in _by_prefix(recorded, "shape/").items()}
  one_net = {k[len("encoder_q_0.") :]: v for k, v in shapes.items() if k.startswith("encoder_q_0.")}
  start = recording.initial_encoders(one_net, int(recorded["init_seed"]))
  start["queue"] = recording.initial_queues(int(recorded["queue_seed"]))
  return start


def encoders_from_official(state_dict, prefix: str, dtype) -> dict:
  """MoCo encoder variables (a head-less Cohort) of `<prefix><m>.` networks."""
  members = [
    convert.from_torch("resnet32", state_dict, prefix=f"{prefix}{m}.") for m in range(MEMBERS)
  ]
  variables = models.cohort_from_members(members, 0, heads={}, arch="resnet32")
  del variables["params"]["members"]["head"]  # MoCo projects with its classifier
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), variables)


def encoders_to_official(variables, prefix: str) -> dict[str, np.ndarray]:
  """The official state-dict entries (float32 numpy) of MoCo encoder variables."""
  out = {}
  for m in range(MEMBERS):
    member = models.extract_member(jax.device_get(variables), m, 0)
    for key, value in convert.to_torch("resnet32", member).items():
      out[f"{prefix}{m}.{key}"] = value
  return out


def run_jax(recorded) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
  """The recorded steps of `moco.train_step` in float64 from the recorded start.

  Returns (losses [steps, 7] in the recording's order, the final state as official
  state-dict entries, the final queue pointer).
  """
  config = default.get_config()
  config.optim.lr = float(recorded["lr"])  # per-epoch schedule: constant within epoch 0
  config.optim.momentum, config.optim.nesterov = recording.MOMENTUM, False
  config.optim.weight_decay = float(recorded["weight_decay"])
  loss_cfg = config.loss  # the four MCL terms with weight 1 (main_moco_mcl.py)
  loss_cfg.vcl_weight = loss_cfg.icl_weight = 1.0
  loss_cfg.soft_vcl_weight = loss_cfg.soft_icl_weight = 1.0
  loss_cfg.tau, loss_cfg.kd_temperature = float(recorded["tau"]), recording.KD_T
  dtype = jnp.float64
  cohort = models.Cohort(
    arch="resnet32",
    num_classes=recording.DIM,
    num_members=MEMBERS,
    shared_stages=0,
    embed_dim=recording.DIM,
    strategy=config.model.strategy,
    head="none",
    dtype=dtype,
  )
  image_shape = (recording.IMAGE, recording.IMAGE, 3)
  encoders = moco.MocoEncoders(cohort, image_shape, dim=recording.DIM, mlp=False)
  tx, _ = optim.make_optimizer(config, steps_per_epoch=1000)
  start = official_start(recorded)
  query = encoders_from_official(start, "encoder_q_", dtype)
  key = encoders_from_official(start, "encoder_k_", dtype)
  # The converted variables are those a real run trains (same tree, same shapes).
  expected = jax.eval_shape(encoders.init, jax.random.PRNGKey(0))
  assert jax.tree.map(lambda x: x.shape, expected) == jax.tree.map(lambda x: x.shape, query)
  queues = jnp.asarray(start["queue"].transpose(0, 2, 1), dtype)  # [M, d, K] -> [M, K, d]
  state = moco.MocoState(
    step=jnp.zeros((), jnp.int32),
    params=query["params"],
    batch_stats=query["batch_stats"],
    opt_state=tx.init(query["params"]),
    rng=jax.random.PRNGKey(0),
    key_params=key["params"],
    key_batch_stats=key["batch_stats"],
    queues=queues,
    queue_ptr=jnp.zeros((), jnp.int32),
  )
  step = jax.jit(
    functools.partial(
      moco.train_step,
      encoders=encoders,
      tx=tx,
      loss_cfg=loss_cfg,
      key_momentum=float(recorded["key_momentum"]),
      views=lambda rng, batch: (batch["image"], batch["image2"]),
    )
  )
  losses = []
  for view1, view2 in zip(recorded["view1"], recorded["view2"]):
    batch = {
      "image": jnp.asarray(np.repeat(view1[..., None], 3, axis=-1), dtype),
      "image2": jnp.asarray(np.repeat(view2[..., None], 3, axis=-1), dtype),
    }
    state, metrics = step(state, batch, {})
    m = jax.device_get(metrics)
    losses.append(
      [m["loss"], m["ce"][0], m["ce"][1], m["vcl"], m["icl"], m["soft_vcl"], m["soft_icl"]]
    )
  final = {
    **encoders_to_official(
      {"params": state.params, "batch_stats": state.batch_stats}, "encoder_q_"
    ),
    **encoders_to_official(
      {"params": state.key_params, "batch_stats": state.key_batch_stats}, "encoder_k_"
    ),
    "queue": np.asarray(jax.device_get(state.queues), np.float64).transpose(0, 2, 1),
  }
  return np.asarray(losses, np.float64), final, int(state.queue_ptr)


@contextlib.contextmanager
def xla_optimizations():
  """XLA's optimisations on, for once, despite the suite's `jax_disable_most_optimizations`.

  Unoptimised, XLA's CPU float64 convolutions make these ten steps cost far more than the
  optimised compile does (figures in docs/TESTING.md).
  """
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def ours(recorded):
  with jax.enable_x64(True), xla_optimizations():
    return run_jax(recorded)


def test_ten_float64_steps_give_the_official_losses(recorded, ours):
  losses, _, _ = ours
  np.testing.assert_allclose(losses, recorded["losses64"], rtol=1e-7, atol=1e-10)


def test_ten_float64_steps_end_in_the_official_state(recorded, ours):
  """Query and key encoders (parameters, BN statistics), queues and pointer."""
  _, final, queue_ptr = ours
  full, sketches = _by_prefix(recorded, "full/"), _by_prefix(recorded, "sketch/")
  norms = _by_prefix(recorded, "norm/")
  assert set(final) == set(full) | set(sketches)
  failures = []
  for key, expected in full.items():
    scale = max(float(np.abs(expected).max()), 1e-3)
    err = float(np.abs(final[key] - expected).max())
    if not err <= 1e-6 * scale:
      failures.append(f"{key}: |ours - official| = {err:.2e} (largest value {scale:.2e})")
  for key, expected in sketches.items():
    err = float(np.abs(recording.sketch(key, final[key]) - expected).max())
    if not err <= 1e-6 * float(norms[key]):
      failures.append(
        f"{key}: projections of ours - official up to {err:.2e} (L2 norm {float(norms[key]):.2e})"
      )
  assert not failures, "\n".join(failures)
  np.testing.assert_array_equal(np.full(MEMBERS, queue_ptr), recorded["queue_ptr"])
