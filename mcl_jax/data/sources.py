"""Which source a config names: `make_source(config.input)` and the dataset names.

In memory (`pipeline.Dataset`): digits, fashion_mnist, cifar10, cifar100, synthetic.
Streaming (`imagenet.TfdsImageNetSource`, `imagenet.ImageFolderSource`): imagenet2012,
image_folder. All implement the data-source protocol (`mcl_jax.data.protocol.Source`); each
source module is imported only when its dataset is asked for (TensorFlow and scikit-learn
stay unimported otherwise).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from mcl_jax.data import augment as augment_lib
from mcl_jax.data import protocol
from mcl_jax.data.pipeline import Dataset
from mcl_jax.data.pipeline import hold_out_validation
from mcl_jax.data.pipeline import keep_classes
from mcl_jax.data.pipeline import per_channel_mean_std
from mcl_jax.data.pipeline import resize_grey
from mcl_jax.data.pipeline import rotation_classes
from mcl_jax.data.pipeline import synthetic
from mcl_jax.errors import ConfigError

IN_MEMORY = ("digits", "fashion_mnist", "cifar10", "cifar100", "synthetic")
STREAMING = ("imagenet2012", "image_folder")
DATASETS = IN_MEMORY + STREAMING


def input_config(fields: Any) -> Any:
  """`config.input` of the default config with `fields` (a config's input section, or a
  dict of some of its fields, as tools and tests pass) over it: every field the sources
  read has its one default, in `mcl_jax/configs/default.py`."""
  from mcl_jax.configs import default

  cfg = default.get_config().input
  if isinstance(fields, ml_collections.ConfigDict):
    fields = fields.to_dict()
  fields = dict(fields)
  unknown = sorted(set(fields) - set(cfg))
  if unknown:
    raise ConfigError(
      f"Unknown input field(s) {', '.join(unknown)}; known: {', '.join(sorted(cfg))}."
    )
  cfg.update(fields)
  return cfg


def make_source(
  input_fields: Any, *, two_view_crop_scale: tuple[float, float] | None = None
) -> protocol.Source:
  """The dataset named by `input_fields.dataset` (`config.input`, or a dict of its fields).

  Fields read: dataset; data_dir (tfds data_dir, an image folder root, or the folder of the
  Fashion-MNIST IDX files); image_size (digits: a multiple of 8; Fashion-MNIST: 28, 14 or
  32; synthetic; ImageNet crop size); synthetic_train_size, synthetic_eval_size,
  synthetic_num_classes (synthetic only); download (tfds datasets); classes,
  validation_size, train_subset and rotation_classes (in-memory datasets: `keep_classes`,
  then `hold_out_validation`, then `rotation_classes`).
  two_view_crop_scale: build the source for two views per image (the self-supervised
  regimes): streaming sources then crop twice on the host with this RandomResizedCrop
  scale; in-memory sources crop both views on device and need nothing.
  Returns a `Dataset` (in memory) or an `imagenet.ImageFolderSource` /
  `imagenet.TfdsImageNetSource` (streaming).
  """
  cfg = input_config(input_fields)
  dataset = _in_memory_source(cfg.dataset, cfg)
  if dataset is None:
    return _streaming_source(cfg.dataset, cfg, two_view_crop_scale)
  classes = tuple(cfg.classes)
  if classes:
    dataset = keep_classes(dataset, classes)
  if cfg.validation_size or cfg.train_subset:
    dataset = hold_out_validation(dataset, int(cfg.validation_size), int(cfg.train_subset))
  if cfg.rotation_classes:
    dataset = rotation_classes(dataset)
  return dataset


def _in_memory_source(name: str, input_cfg: Any) -> Dataset | None:
  data_dir = input_cfg.data_dir or None
  image_size = int(input_cfg.image_size)
  if name == "digits":
    from mcl_jax.data import digits

    x_train, y_train, x_test, y_test = digits.load_digits(image_size)
    mean, std = digits.mean_std(x_train)
    # Digits are not left-right symmetric: crop only, a 1/8-of-the-side shift like CIFAR's.
    spec = augment_lib.AugmentSpec(crop_padding=image_size // 8, flip=False)
    return Dataset(
      "digits",
      x_train,
      y_train,
      x_test,
      y_test,
      num_classes=digits.NUM_CLASSES,
      mean=mean,
      std=std,
      augment=spec,
    )
  if name in ("cifar10", "cifar100"):
    from mcl_jax.data import cifar

    x_train, y_train, x_test, y_test = cifar.load_cifar(
      name, data_dir, download=bool(input_cfg.download)
    )
    return Dataset(
      name,
      x_train,
      y_train,
      x_test,
      y_test,
      num_classes=cifar.NUM_CLASSES[name],
      mean=augment_lib.CIFAR_MEAN,
      std=augment_lib.CIFAR_STD,
      augment=augment_lib.AugmentSpec(crop_padding=4, flip=True),
    )
  if name == "fashion_mnist":
    from mcl_jax.data import fashion_mnist

    x_train, y_train, x_test, y_test = fashion_mnist.load(
      data_dir, download=bool(input_cfg.download)
    )
    x_train, x_test = (resize_grey(x, image_size) for x in (x_train, x_test))
    mean, std = per_channel_mean_std(x_train)
    # Clothes are left-right symmetric; crop shift 1/8 of the side, as CIFAR's 4 of 32.
    spec = augment_lib.AugmentSpec(crop_padding=max(1, image_size // 8), flip=True)
    return Dataset(
      "fashion_mnist",
      x_train,
      y_train,
      x_test,
      y_test,
      num_classes=fashion_mnist.NUM_CLASSES,
      mean=mean,
      std=std,
      augment=spec,
    )
  if name == "synthetic":
    return synthetic(
      num_train=int(input_cfg.synthetic_train_size),
      num_eval=int(input_cfg.synthetic_eval_size),
      num_classes=int(input_cfg.synthetic_num_classes),
      image_size=image_size,
    )
  return None


def _streaming_source(
  name: str, input_cfg: Any, two_view_crop_scale: tuple[float, float] | None
) -> protocol.Source:
  data_dir = input_cfg.data_dir or None
  image_size = int(input_cfg.image_size)
  if name == "imagenet2012":
    from mcl_jax.data import imagenet

    return imagenet.TfdsImageNetSource(
      data_dir=data_dir, image_size=image_size, two_view_crop_scale=two_view_crop_scale
    )
  if name == "image_folder":
    from mcl_jax.data import imagenet

    if not data_dir:
      raise ConfigError(
        "config.input.data_dir is empty; the image_folder dataset needs the "
        "folder that holds train/<class>/*.jpg and val/<class>/*.jpg."
      )
    return imagenet.ImageFolderSource(
      data_dir, image_size=image_size, two_view_crop_scale=two_view_crop_scale
    )
  raise ConfigError(
    f"Unknown dataset config.input.dataset={name!r}; choose one of {', '.join(DATASETS)}."
  )
