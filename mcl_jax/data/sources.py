"""Which source a config names: `make_source(config.input)` and the dataset names.

In memory (`pipeline.Dataset`): digits, fashion_mnist, cifar10, cifar100, synthetic.
Streaming (`imagenet.TfdsImageNetSource`, `imagenet.ImageFolderSource`): imagenet2012,
image_folder. Both implement the data-source protocol of `mcl_jax.data.pipeline`; each
source module is imported only when its dataset is asked for (TensorFlow and scikit-learn
stay unimported otherwise).
"""
from __future__ import annotations

from typing import Any

from mcl_jax.data import augment as augment_lib
from mcl_jax.data.pipeline import (Dataset, hold_out_validation, keep_classes,
                                   per_channel_mean_std, resize_grey, rotation_classes,
                                   synthetic)

IN_MEMORY = ("digits", "fashion_mnist", "cifar10", "cifar100", "synthetic")
STREAMING = ("imagenet2012", "image_folder")
DATASETS = IN_MEMORY + STREAMING


def _get(cfg: Any, key: str, default: Any) -> Any:
  """cfg.key for a ConfigDict, dict or plain object; `default` when absent or None."""
  if isinstance(cfg, dict) or hasattr(cfg, "get"):
    value = cfg.get(key, default)
  else:
    value = getattr(cfg, key, default)
  return default if value is None else value


def make_source(input_cfg: Any):
  """The dataset named by `input_cfg.dataset` (the `config.input` section).

  Fields read: dataset; data_dir (tfds data_dir, an image folder root, or the folder of the
  Fashion-MNIST IDX files); image_size (digits: a multiple of 8; Fashion-MNIST: 28, 14 or
  32; synthetic; ImageNet crop size); synthetic_train_size, synthetic_eval_size,
  synthetic_num_classes (synthetic only); download (tfds datasets, default True);
  classes, validation_size, train_subset and rotation_classes (in-memory datasets:
  `keep_classes`, then `hold_out_validation`, then `rotation_classes`).
  Returns a `Dataset` (in memory) or an `imagenet.ImageFolderSource` /
  `imagenet.TfdsImageNetSource` (streaming).
  """
  name = _get(input_cfg, "dataset", None)
  dataset = _in_memory_source(name, input_cfg)
  if dataset is None:
    return _streaming_source(name, input_cfg)
  classes = tuple(_get(input_cfg, "classes", ()))
  if classes:
    dataset = keep_classes(dataset, classes)
  validation_size = int(_get(input_cfg, "validation_size", 0))
  train_subset = int(_get(input_cfg, "train_subset", 0))
  if validation_size or train_subset:
    dataset = hold_out_validation(dataset, validation_size, train_subset)
  if _get(input_cfg, "rotation_classes", False):
    dataset = rotation_classes(dataset)
  return dataset


def _in_memory_source(name: str, input_cfg: Any) -> Dataset | None:
  data_dir = _get(input_cfg, "data_dir", "") or None
  image_size = int(_get(input_cfg, "image_size", 32))
  if name == "digits":
    from mcl_jax.data import digits
    x_train, y_train, x_test, y_test = digits.load_digits(image_size)
    mean, std = digits.mean_std(x_train)
    # Digits are not left-right symmetric: crop only, a 1/8-of-the-side shift like CIFAR's.
    spec = augment_lib.AugmentSpec(crop_padding=image_size // 8, flip=False)
    return Dataset("digits", x_train, y_train, x_test, y_test, num_classes=digits.NUM_CLASSES,
                   mean=mean, std=std, augment=spec)
  if name in ("cifar10", "cifar100"):
    from mcl_jax.data import cifar
    x_train, y_train, x_test, y_test = cifar.load_cifar(
        name, data_dir, download=bool(_get(input_cfg, "download", True)))
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes=cifar.NUM_CLASSES[name],
                   mean=augment_lib.CIFAR_MEAN, std=augment_lib.CIFAR_STD,
                   augment=augment_lib.AugmentSpec(crop_padding=4, flip=True))
  if name == "fashion_mnist":
    from mcl_jax.data import fashion_mnist
    x_train, y_train, x_test, y_test = fashion_mnist.load(
        data_dir, download=bool(_get(input_cfg, "download", True)))
    x_train, x_test = (resize_grey(x, image_size) for x in (x_train, x_test))
    mean, std = per_channel_mean_std(x_train)
    # Clothes are left-right symmetric; crop shift 1/8 of the side, as CIFAR's 4 of 32.
    spec = augment_lib.AugmentSpec(crop_padding=max(1, image_size // 8), flip=True)
    return Dataset("fashion_mnist", x_train, y_train, x_test, y_test,
                   num_classes=fashion_mnist.NUM_CLASSES, mean=mean, std=std, augment=spec)
  if name == "synthetic":
    return synthetic(num_train=int(_get(input_cfg, "synthetic_train_size", 512)),
                     num_eval=int(_get(input_cfg, "synthetic_eval_size", 128)),
                     num_classes=int(_get(input_cfg, "synthetic_num_classes", 10)),
                     image_size=image_size)
  return None


def _streaming_source(name: str, input_cfg: Any):
  data_dir = _get(input_cfg, "data_dir", "") or None
  image_size = int(_get(input_cfg, "image_size", 32))
  if name == "imagenet2012":
    from mcl_jax.data import imagenet
    return imagenet.TfdsImageNetSource(data_dir=data_dir, image_size=image_size)
  if name == "image_folder":
    from mcl_jax.data import imagenet
    if not data_dir:
      from mcl_jax.errors import ConfigError
      raise ConfigError("config.input.data_dir is empty; the image_folder dataset needs the "
                        "folder that holds train/<class>/*.jpg and val/<class>/*.jpg.")
    return imagenet.ImageFolderSource(data_dir, image_size=image_size)
  from mcl_jax.errors import ConfigError
  raise ConfigError(f"Unknown dataset config.input.dataset={name!r}; choose one of "
                    f"{', '.join(DATASETS)}.")
