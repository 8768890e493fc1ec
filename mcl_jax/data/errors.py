"""Errors of the data layer: one sentence for a person, naming the path and the fix."""
from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
  """The dataset is not on disk and could not (or may not) be downloaded."""
