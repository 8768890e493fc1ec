"""What the benchmark scripts share: fake CPU devices and JSON-lines output."""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def request_cpu_devices(count: int) -> None:
  """Ask XLA:CPU for `count` fake devices and put the repository on sys.path; call before
  the first `import jax` (XLA reads its flags once, when the backend starts)."""
  if "jax" not in sys.modules and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if REPO not in sys.path:
    sys.path.insert(0, REPO)


def append_json_line(path: str | None, record: dict) -> None:
  """Append `record` as one JSON line to `path` (nothing when path is empty)."""
  if path:
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")
