"""Errors for people: each message is one sentence that names the field or path and the fix.

The command-line tools print it after `error: ` and exit with status 2 (`mcl_jax.main`).
"""
from __future__ import annotations


class ConfigError(ValueError):
  """A config value that cannot work."""


class DatasetNotFoundError(FileNotFoundError):
  """The dataset is not on disk and could not (or may not) be downloaded."""
