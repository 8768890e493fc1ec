"""The data-source protocol: what every source implements and every regime relies on.

Two kinds of source implement it: `pipeline.Dataset` (a dataset held whole in host memory
and on every device: digits, Fashion-MNIST, CIFAR, synthetic) and the streaming ImageNet
sources (`imagenet.ImageFolderSource`, `imagenet.TfdsImageNetSource`). A task never asks
which kind it has: the host side hands it `train_batches` and `eval_batches`, and inside
the compiled step the source's own `materialize` turns what the host sent into the batch
the step computes on. Two-view mode (the self-supervised regimes) is chosen when the
source is built (`make_source(..., two_view_crop_scale=...)`), never changed afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np

# The un-augmented training split, as every source's eval_batches serves it (the kNN
# monitor's and the probes' training features).
TRAIN_SPLIT = "train"

Views = Callable[[Any, dict[str, Any]], tuple[Any, Any]]


def as_given(
  consts: dict[str, Any], batch: dict[str, Any], *, labels: bool = True
) -> dict[str, Any]:
  """The `materialize` of a batch that is already what the step computes on (tests and
  tools that call a step directly with images)."""
  del consts, labels
  return batch


@runtime_checkable
class Source(Protocol):
  """A data source (module docstring). Batches are numpy dicts, one process's share."""

  @property
  def name(self) -> str: ...
  @property
  def num_classes(self) -> int: ...
  @property
  def mean(self) -> tuple[float, ...]: ...  # per-channel normalisation mean
  @property
  def std(self) -> tuple[float, ...]: ...  # per-channel normalisation std
  @property
  def image_shape(self) -> tuple[int, ...]: ...
  @property
  def num_train(self) -> int: ...
  @property
  def train_labels(self) -> np.ndarray: ...  # every training label, in index order

  def train_batches(
    self,
    epoch: int,
    *,
    seed: int,
    global_batch_size: int,
    samples_per_class: int = 0,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
  ) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of every training batch of `epoch` from `start_step` on: what
    `materialize` turns into the step's batch (in memory: {'index'}; streamed: decoded
    crops {'image' (, 'image2'), 'label', 'index'}). A pure function of (seed, epoch)."""
    ...

  def eval_split_names(self) -> tuple[str, ...]:
    """The splits results are reported on: 'test', and 'validation' when held out."""
    ...

  def eval_batches(
    self,
    split: str,
    global_batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
  ) -> Iterator[dict[str, np.ndarray]]:
    """Padded batches {'image', 'label', 'index', 'mask'} covering `split` once, in order,
    un-augmented: any of `eval_split_names()` or TRAIN_SPLIT."""
    ...

  def device_arrays(self) -> dict[str, np.ndarray]:
    """Arrays the compiled step reads on every device (`materialize`'s `consts`)."""
    ...

  def abstract_train_batch(self, global_batch_size: int) -> dict[str, Any]:
    """Shapes and dtypes (jax.ShapeDtypeStruct) of a global training batch as
    `train_batches` yields it: what an ahead-of-time compile (`mcl-plan`) feeds the step."""
    ...

  def materialize(
    self, consts: dict[str, Any], batch: dict[str, Any], *, labels: bool = True
  ) -> dict[str, Any]:
    """On device, inside the step: the batch it computes on, {'image', 'label', 'index'}
    ('label' left out with labels=False; two-view sources add 'image2' where the host
    made the second crop). Images are raw (uint8 or [0, 1]); `train_preprocess` or
    `two_views` augments and normalises them."""
    ...

  def train_preprocess(self, rng: Any, images: Any, dtype: Any = None) -> Any:
    """On device: the training augmentation the host did not do, then normalisation."""
    ...

  def eval_preprocess(self, images: Any, dtype: Any = None) -> Any:
    """On device: normalisation of un-augmented images."""
    ...

  def two_views(self, spec: Any, dtype: Any) -> Views:
    """`views(rng, batch) -> (query, key)`: the two normalised views of a materialised
    batch under `spec` (`data.views.ViewSpec`), on device."""
    ...
