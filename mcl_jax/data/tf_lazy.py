"""Lazy TensorFlow import for the input pipeline.

TensorFlow is used only to read and decode data. Importing it at module import time would
cost seconds for in-memory datasets (digits, synthetic) and, on a GPU host, TF would grab
the accelerator memory JAX needs; so every TF user in `mcl_jax.data` calls `tf()` inside a
function, and the first call hides all GPUs from TensorFlow.
"""

from __future__ import annotations

import os
from typing import Any

_TF: Any = None


def tf() -> Any:
  """The `tensorflow` module, with GPUs hidden from it (idempotent)."""
  global _TF
  if _TF is None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow  # pylint: disable=g-import-not-at-top

    try:
      tensorflow.config.set_visible_devices([], "GPU")
    except RuntimeError:
      # Already initialised by someone else: it keeps whatever devices it was given.
      pass
    _TF = tensorflow
  return _TF


def tfds() -> Any:
  """The `tensorflow_datasets` module (TensorFlow set up first, see `tf()`)."""
  tf()
  import tensorflow_datasets  # pylint: disable=g-import-not-at-top

  return tensorflow_datasets
