"""Data: sources (digits, Fashion-MNIST, CIFAR, synthetic, ImageNet / image folder), samplers,
augmentation and the self-supervised regimes' two views.

Importing this package imports neither TensorFlow nor scikit-learn: each source imports
what it needs when it is built (TensorFlow with GPUs hidden, see `tf_lazy.py`).

Entry points:
  make_source(config.input, two_view_crop_scale=None) -> a `protocol.Source`: the
      data-source protocol every source implements (train_batches, eval_split_names,
      eval_batches, device_arrays, abstract_train_batch, materialize, train_preprocess,
      eval_preprocess, two_views)
  sampler.class_aware_epoch / sampler.shuffled_epoch -> [steps, global_batch] indices
  augment (on-device crop, flip, normalise) and views (the two augmented views)
"""

from mcl_jax.data import augment
from mcl_jax.data import protocol
from mcl_jax.data import sampler
from mcl_jax.data.pipeline import Dataset
from mcl_jax.data.pipeline import eval_batches
from mcl_jax.data.pipeline import eval_indices
from mcl_jax.data.pipeline import local_batch_indices
from mcl_jax.data.pipeline import synthetic
from mcl_jax.data.sources import DATASETS
from mcl_jax.data.sources import IN_MEMORY
from mcl_jax.data.sources import STREAMING
from mcl_jax.data.sources import make_source
from mcl_jax.errors import DatasetNotFoundError

__all__ = [
  "augment",
  "protocol",
  "sampler",
  "DatasetNotFoundError",
  "DATASETS",
  "IN_MEMORY",
  "STREAMING",
  "Dataset",
  "eval_batches",
  "eval_indices",
  "local_batch_indices",
  "make_source",
  "synthetic",
]
