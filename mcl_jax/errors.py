"""Errors for people: each message is one sentence that names the field or path and the fix.

The command-line tools print it after `error: ` and exit with status 2 (`mcl_jax.main`).
"""

from __future__ import annotations

from typing import NoReturn


class ConfigError(ValueError):
  """A config value that cannot work."""


class DatasetNotFoundError(FileNotFoundError):
  """The dataset is not on disk and could not (or may not) be downloaded."""


def exit_with(message: str, status: int = 2) -> NoReturn:
  """The command-line tools' way out: `error: <message>` on stderr, then exit `status`
  (2: bad input; other statuses are documented where they are used)."""
  import sys

  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)
