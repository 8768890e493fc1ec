"""Data: sources (digits, CIFAR, synthetic, ImageNet / image folder), samplers, augmentation.

Importing this package imports neither TensorFlow nor scikit-learn: each source imports
what it needs when it is built (TensorFlow with GPUs hidden, see `_tf.py`).

Entry points for the trainer:
  make_source(config.input) -> Dataset (in memory) | imagenet.*Source (streaming)
  sampler.class_aware_epoch / sampler.shuffled_epoch -> [steps, global_batch] indices
  local_batch_indices(global_indices, process_index, process_count)
  eval_batches(images, labels, batch_size) -> padded batches with a mask
  augment.train_augment / augment.normalize (on device, jit-able)
"""
from mcl_jax.data import augment, sampler
from mcl_jax.data.errors import DatasetNotFoundError
from mcl_jax.data.pipeline import (DATASETS, Dataset, eval_batches, eval_indices,
                                   local_batch_indices, make_source, synthetic)

__all__ = ["augment", "sampler", "DatasetNotFoundError", "DATASETS", "Dataset", "eval_batches",
           "eval_indices", "local_batch_indices", "make_source", "synthetic"]
