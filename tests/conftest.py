"""Test set-up: 8 fake CPU devices, fast compiles, TensorFlow kept off accelerators.

XLA_FLAGS must be set before JAX is imported anywhere, which is why it happens at the top
of this file (pytest imports conftest.py before any test module).
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TF (input pipeline only) must not grab GPUs.

import jax  # noqa: E402
import pytest  # noqa: E402

# A tiny cohort's compile drops from ~11 s to ~1 s with this; tests check semantics, not speed.
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_threefry_partitionable", True)


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip_slow)


@pytest.fixture
def reference():
  """Inputs and outputs of the official loss code (a copy of shared/reference), as a dict."""
  import numpy as np

  path = os.path.join(os.path.dirname(__file__), "data", "official_mcl_losses.npz")
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(autouse=True)
def _release_compiled_programs():
  """Drops JAX's compiled programs after every test.

  A worker runs many tests; without this the executables and traces of every cohort it
  ever compiled stay alive (several GB after a dozen smoke runs), and two workers on a
  24 GB machine ran out of memory.
  """
  yield
  import gc
  jax.clear_caches()
  gc.collect()
