"""ImageNet input: image-folder and tfds sources on tiny synthetic data (no network)."""

import os

import numpy as np
import pytest

from mcl_jax import data
from mcl_jax.data import imagenet
from mcl_jax.data import protocol

pytestmark = [
  pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # TF/tfds internals
  pytest.mark.xdist_group("data_imagenet"),  # one worker builds the module's folder once
]

CLASSES = ("bee", "ant", "cat")  # sorted: ant=0, bee=1, cat=2
VAL_SIZES = {"ant": 2, "bee": 2, "cat": 1}


def _tf():
  from mcl_jax.data import tf_lazy

  return tf_lazy.tf()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """root/{train,val}/<class>/*.jpg: 3 classes x 4 train, 5 val; one PNG named .jpg."""
  tf = _tf()
  root = tmp_path_factory.mktemp("image_folder")
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    for name in CLASSES:
      os.makedirs(root / split / name)
      for i in range(4 if split == "train" else VAL_SIZES[name]):
        h, w = rng.integers(24, 64, 2)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        encoded = tf.io.encode_png(image) if (name, i) == ("cat", 1) else tf.io.encode_jpeg(image)
        tf.io.write_file(str(root / split / name / f"img_{i}.jpg"), encoded)
  return str(root)


def _epoch(source, epoch=0, process_index=0, process_count=1, **kw):
  return list(
    source.train_batches(
      epoch,
      seed=0,
      global_batch_size=4,
      process_index=process_index,
      process_count=process_count,
      **kw,
    )
  )


def test_folder_source_lists_classes_and_labels_without_decoding(folder):
  source = data.make_source({"dataset": "image_folder", "data_dir": folder, "image_size": 32})
  assert isinstance(source, imagenet.ImageFolderSource)
  assert source.class_names == ["ant", "bee", "cat"] and source.num_classes == 3
  assert source.num_train == 12 and source.num_eval == 5
  np.testing.assert_array_equal(imagenet.class_labels(source), np.repeat([0, 1, 2], 4))
  assert source.image_shape == (32, 32, 3) and source.steps_per_epoch(4) == 3


def test_folder_source_fulfils_the_protocol_and_replays_its_training_split(folder):
  """The kNN monitor and export.features read the training split un-augmented through
  eval_batches('train') on a streaming source too: every training image once, in index
  order, the eval transform's pixels (the same as a fixed centre crop, twice)."""
  source = imagenet.ImageFolderSource(folder, image_size=32)
  assert isinstance(source, protocol.Source)
  batches = list(source.eval_batches("train", 5, process_index=0, process_count=1))
  keep = np.concatenate([b["mask"] for b in batches]) > 0
  index = np.concatenate([b["index"] for b in batches])[keep]
  labels = np.concatenate([b["label"] for b in batches])[keep]
  np.testing.assert_array_equal(index, np.arange(12))
  np.testing.assert_array_equal(labels, source.train_labels)
  again = list(source.eval_batches("train", 5, process_index=0, process_count=1))
  np.testing.assert_array_equal(batches[0]["image"], again[0]["image"])
  with pytest.raises(ValueError, match="not 'validation'"):
    list(source.eval_batches("validation", 5, process_index=0, process_count=1))


def test_folder_train_epoch_shapes_labels_and_dense_indices(folder):
  source = imagenet.ImageFolderSource(folder, image_size=32)
  batches = _epoch(source)
  assert len(batches) == 3
  for batch in batches:
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
    np.testing.assert_array_equal(batch["label"], source.train_labels[batch["index"]])
  indices = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(np.sort(indices), np.arange(12))  # each example once
  again = _epoch(source)
  for a, b in zip(batches, again):  # seeded order and crops: the same epoch twice
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_array_equal(a["image"], b["image"])
  other = np.concatenate([b["index"] for b in _epoch(source, epoch=1)])
  assert not np.array_equal(indices, other)


def test_folder_two_processes_read_disjoint_shares_of_the_same_global_batches(folder):
  source = imagenet.ImageFolderSource(folder, image_size=32)
  single = _epoch(source)
  shares = [_epoch(source, process_index=p, process_count=2) for p in range(2)]
  assert len(shares[0]) == len(shares[1]) == 3
  seen = [np.concatenate([b["index"] for b in share]) for share in shares]
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == set(range(12))
  for step, whole in enumerate(single):  # process p feeds rows [2p, 2p + 2) of the batch
    for key in ("index", "label", "image"):
      joined = np.concatenate([shares[0][step][key], shares[1][step][key]])
      np.testing.assert_array_equal(joined, whole[key])


def test_folder_resume_mid_epoch_replays_the_remaining_batches(folder):
  source = imagenet.ImageFolderSource(folder, image_size=32)
  full, resumed = _epoch(source), _epoch(source, start_step=1)
  assert len(resumed) == 2
  for a, b in zip(full[1:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_folder_eval_is_padded_and_masked_on_every_process(folder):
  source = imagenet.ImageFolderSource(folder, image_size=32, output_dtype="float32")
  shares = [
    list(source.eval_batches("test", 4, process_index=p, process_count=2)) for p in range(2)
  ]
  assert len(shares[0]) == len(shares[1]) == 2  # ceil(5 / 4) global batches
  masks = np.concatenate([b["mask"] for share in shares for b in share])
  assert masks.sum() == 5
  real = np.concatenate([b["index"][b["mask"] > 0] for share in shares for b in share])
  np.testing.assert_array_equal(np.sort(real), np.arange(5))
  batch = shares[0][0]
  assert batch["image"].shape == (2, 32, 32, 3) and batch["image"].dtype == np.float32
  np.testing.assert_array_equal(batch["label"], source.eval_labels[batch["index"]])
  assert -2.2 < batch["image"].min() and batch["image"].max() < 2.7  # ImageNet-normalised


def test_random_resized_crop_window_follows_torchvision():
  tf = _tf()
  window = tf.function(lambda h, w, s: imagenet.random_resized_crop_window(tf, h, w, s))
  areas = []
  for i in range(40):
    top, left, h, w = (int(v) for v in window(375, 500, tf.constant([0, i], tf.int64)))
    assert 0 <= top <= 375 - h and 0 <= left <= 500 - w
    assert 0.75 - 0.02 <= w / h <= 4 / 3 + 0.02
    areas.append(h * w / (375 * 500))
  assert 0.07 < min(areas) and max(areas) <= 1.0 and np.ptp(areas) > 0.3
  # No proposal fits a 10 x 1000 strip: torchvision's centre crop with the ratio clamped.
  assert [int(v) for v in window(10, 1000, tf.constant([0, 0], tf.int64))] == [0, 493, 10, 13]


def test_eval_transform_resizes_the_shorter_side_and_centre_crops():
  tf = _tf()
  image = np.zeros((60, 90, 3), np.uint8)
  image[:, 45:] = 200  # right half bright: the centre crop keeps both halves equally
  out = imagenet.eval_transform(tf.io.encode_png(image), image_size=28).numpy()
  assert out.shape == (28, 28, 3) and out.dtype == np.uint8  # resize to 32 x 48, crop 28
  assert out[:, :12].max() < 10 and out[:, -12:].min() > 190


def test_tfds_source_reads_sharded_records_with_dense_indices(tmp_path):
  """A real (not mocked) tfds dataset in 3 files, built offline, through the tfds path."""
  tfds = pytest.importorskip("tensorflow_datasets")
  _tf()

  class McljaxTinyImagenet(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=3),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(14), "validation": self._generate_examples(5)}

    def _generate_examples(self, n):
      rng = np.random.default_rng(n)
      for i in range(n):
        image = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
        yield str(i), {"image": image, "label": i % 3}

  McljaxTinyImagenet(data_dir=str(tmp_path)).download_and_prepare(
    download_config=tfds.download.DownloadConfig(num_shards=3)
  )
  source = imagenet.TfdsImageNetSource(str(tmp_path), image_size=16, name="mcljax_tiny_imagenet")
  assert source.num_train == 14 and source.num_eval == 5 and source.num_classes == 3
  labels = source.train_labels  # one label-only pass, cached beside the data
  assert sorted(np.bincount(labels)) == [4, 5, 5]
  assert os.path.exists(os.path.join(source.builder.data_dir, "train_labels.npy"))
  seen = []
  for p in range(2):
    share = list(
      source.train_batches(0, seed=0, global_batch_size=4, process_index=p, process_count=2)
    )
    assert len(share) == 3  # 14 // 4 on every process
    for batch in share:
      assert batch["image"].shape == (2, 16, 16, 3)
      np.testing.assert_array_equal(batch["label"], labels[batch["index"]])
    seen.append({int(i) for b in share for i in b["index"]})
  assert not seen[0] & seen[1] and seen[0] | seen[1] <= set(range(14))
  evals = [list(source.eval_batches("test", 4, process_index=p, process_count=2)) for p in range(2)]
  assert len(evals[0]) == len(evals[1])
  real = sorted(int(i) for e in evals for b in e for i in b["index"][b["mask"] > 0])
  assert real == list(range(5))


def test_imagenet2012_through_tfds_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    source = data.make_source(
      {"dataset": "imagenet2012", "data_dir": str(tmp_path), "image_size": 24}
    )
    assert isinstance(source, imagenet.TfdsImageNetSource)
    assert source.num_classes == 1000 and source.num_train == 6
    labels = source.train_labels
    batches = list(
      source.train_batches(0, seed=1, global_batch_size=3, process_index=0, process_count=1)
    )
    evals = list(source.eval_batches("test", 4, process_index=0, process_count=1))
  assert len(batches) == 2 and batches[0]["image"].shape == (3, 24, 24, 3)
  indices = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(np.sort(indices), np.arange(6))
  for batch in batches:
    np.testing.assert_array_equal(batch["label"], labels[batch["index"]])
  assert [b["mask"].sum() for b in evals] == [4.0, 2.0]


def test_missing_imagenet_says_how_to_prepare_it(tmp_path):
  with pytest.raises(data.DatasetNotFoundError, match="--manual_dir"):
    imagenet.TfdsImageNetSource(str(tmp_path), image_size=32)
  with pytest.raises(data.DatasetNotFoundError, match="does not exist"):
    imagenet.ImageFolderSource(str(tmp_path / "nowhere"), image_size=32)
