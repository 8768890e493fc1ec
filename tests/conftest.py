"""Test set-up: 8 fake CPU devices, fast compiles, TensorFlow kept off accelerators.

XLA_FLAGS must be set before JAX is imported anywhere, which is why it happens at the top
of this file (pytest imports conftest.py before any test module).
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TF (input pipeline only) must not grab GPUs.
# A persistent compilation cache shared by the xdist workers and the subprocesses the
# multi-host tests start (they inherit these variables): many tests compile the same
# programs (the same tiny cohort's step; the op-by-op parameter init, ~0.03 s of compile
# per op, which is most of a smoke run's start-up), and loading is much cheaper than
# compiling. Measured: a tiny_imagenet x2 init 6.8 s cold, 2.2 s from the cache.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(tempfile.gettempdir(), f"mcl_jax_tests_xla_cache_{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

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
