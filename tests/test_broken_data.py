"""Broken data: what a damaged image folder or Fashion-MNIST copy does to a run.

An image folder (ImageNet-style) is too big to be perfect: files that cannot be images are
skipped with a count in one warning and training goes on, at listing time (a README.txt,
a .DS_Store) or at decode time (a truncated JPEG, an empty file, a text file named .jpg),
with every batch still full and the order still a pure function of (seed, epoch). An IDX
file cut mid-image makes the whole Fashion-MNIST set wrong: one sentence naming the file,
exit status 2, at start-up. docs/RELIABILITY.md ("Broken data") has the table.
"""

import gzip
import io
import logging
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from mcl_jax import jobs
from mcl_jax.configs import cifar100_common
from mcl_jax.configs import common
from mcl_jax.data import fashion_mnist
from mcl_jax.data import imagenet
from mcl_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [
  pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # TF/tfds internals
  pytest.mark.xdist_group("broken_data"),
]


def jpeg(seed: int, size: tuple[int, int] = (20, 24)) -> bytes:
  from PIL import Image

  pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="JPEG")
  return out.getvalue()


def image_folder(root, train: dict[str, int], val: dict[str, int]) -> str:
  """root/{train,val}/<class>/<i>.jpg: whole random JPEGs, as many as asked per class."""
  seed = 0
  for split, counts in (("train", train), ("val", val)):
    for name, count in counts.items():
      os.makedirs(root / split / name, exist_ok=True)
      for i in range(count):
        (root / split / name / f"{i}.jpg").write_bytes(jpeg(seed))
        seed += 1
  return str(root)


def truncate(path, keep: float = 0.5) -> None:
  """Cuts a file to `keep` of its bytes, as an interrupted copy leaves it."""
  content = path.read_bytes()
  path.write_bytes(content[: int(len(content) * keep)])


def warnings_of(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def one_sentence(message: str) -> bool:
  return "\n" not in message and message.rstrip().endswith(".")


# ---------------------------------------------------------------- image folder: listing


def test_files_named_as_non_images_are_skipped_at_listing_with_one_warning(tmp_path, caplog):
  root = image_folder(tmp_path, {"ant": 4, "bee": 4}, {"ant": 1, "bee": 1})
  (tmp_path / "train" / "ant" / "README.txt").write_text("photos of ants")
  (tmp_path / "train" / "bee" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
  (tmp_path / "val" / "ant" / "._0.jpg").write_bytes(b"\0\5\26\7")  # macOS' AppleDouble
  with caplog.at_level(logging.WARNING):
    source = imagenet.ImageFolderSource(root, image_size=16)
  assert source.num_train == 8 and source.num_eval == 2
  assert not any(
    os.path.basename(f) in ("README.txt", ".DS_Store", "._0.jpg")
    for f in [*source.train_files, *source.eval_files]
  )
  [warning] = warnings_of(caplog)
  assert f"Image folder {root}: skipped 3 files that are not images" in warning
  assert os.path.join(root, "train", "ant", "README.txt") in warning


# ---------------------------------------------------------------- image folder: decoding


@pytest.fixture(scope="module")
def broken_folder(tmp_path_factory):
  """2 classes x 6 training images (a truncated JPEG, a text file named .jpg, an empty
  file) and 2 x 2 validation images (one truncated)."""
  root = tmp_path_factory.mktemp("broken")
  image_folder(root, {"ant": 6, "bee": 6}, {"ant": 2, "bee": 2})
  truncate(root / "train" / "ant" / "3.jpg")
  (root / "train" / "bee" / "0.jpg").write_text("not a picture")
  (root / "train" / "bee" / "5.jpg").write_bytes(b"")
  truncate(root / "val" / "bee" / "1.jpg")
  return str(root)


def _epoch(source, **kw):
  return list(source.train_batches(0, seed=0, global_batch_size=4, **kw))


def test_undecodable_training_images_are_replaced_within_their_batch(broken_folder, caplog):
  source = imagenet.ImageFolderSource(broken_folder, image_size=16)
  bad = {
    int(np.flatnonzero(source.train_files == os.path.join(broken_folder, *p))[0])
    for p in (("train", "ant", "3.jpg"), ("train", "bee", "0.jpg"), ("train", "bee", "5.jpg"))
  }
  with caplog.at_level(logging.WARNING):
    batches = _epoch(source)
  assert len(batches) == 3  # 12 // 4: every step is there and every batch is full
  for batch in batches:
    assert batch["image"].shape == (4, 16, 16, 3)
    assert not bad & set(batch["index"].tolist())
    np.testing.assert_array_equal(batch["label"], source.train_labels[batch["index"]])
  assert len({i for b in batches for i in b["index"].tolist()}) == 9  # 12 minus the bad 3
  [warning] = warnings_of(caplog)
  assert warning.startswith("3 training images of epoch 0 could not be decoded")
  assert all(name in warning for name in ("3.jpg", "0.jpg", "5.jpg"))
  assert warning.endswith("training goes on.")
  # Still a pure function of (seed, epoch): a run resumed at step 1 reads the same batches.
  resumed = _epoch(source, start_step=1)
  assert len(resumed) == 2
  for a, b in zip(batches[1:], resumed):
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_array_equal(a["image"], b["image"])
  # Two processes still yield the same number of full batches.
  shares = [_epoch(source, process_index=p, process_count=2) for p in range(2)]
  assert [len(s) for s in shares] == [3, 3]
  assert all(b["image"].shape[0] == 2 for s in shares for b in s)


def test_an_undecodable_validation_image_is_left_out_of_the_evaluation(broken_folder, caplog):
  source = imagenet.ImageFolderSource(broken_folder, image_size=16)
  with caplog.at_level(logging.WARNING):
    batches = list(source.eval_batches("test", 4))
  assert [b["image"].shape[0] for b in batches] == [4]
  kept = batches[0]["index"][batches[0]["mask"] > 0]
  assert sorted(source.eval_files[kept].tolist()) == sorted(
    os.path.join(broken_folder, "val", *p)
    for p in (("ant", "0.jpg"), ("ant", "1.jpg"), ("bee", "0.jpg"))
  )
  [warning] = warnings_of(caplog)
  assert warning.startswith("1 validation images could not be decoded")
  assert "left out of this evaluation" in warning


def test_a_batch_of_only_undecodable_images_stops_with_one_sentence(tmp_path):
  root = image_folder(tmp_path, {"ant": 2, "bee": 2}, {"ant": 1, "bee": 1})
  for name in ("ant", "bee"):
    for i in range(2):
      truncate(tmp_path / "train" / name / f"{i}.jpg", keep=0.1)
  source = imagenet.ImageFolderSource(root, image_size=16)
  with pytest.raises(ConfigError, match="None of the 4 training images of epoch 0") as e:
    _epoch(source)
  assert one_sentence(str(e.value)) and "0.jpg" in str(e.value)


def test_training_goes_on_over_broken_images(broken_folder, tmp_path, caplog):
  """A tiny x2 run (bank regime) over the broken folder: 3 steps across two epochs and
  the evaluations finish, and each broken file is reported."""
  c = common.smoke(cifar100_common.set_variant(cifar100_common.base("tiny"), "mcl_x2"))
  c.input.dataset, c.input.data_dir, c.input.image_size = "image_folder", broken_folder, 8
  c.input.samples_per_class, c.loss.regime, c.model.num_classes = 0, "bank", 2
  c.input.global_batch_size, c.input.eval_batch_size = 8, 8
  c.bank.num_negatives = 4
  with caplog.at_level(logging.WARNING):
    result = jobs.run(c, str(tmp_path / "run"))
  assert result["steps"] == 3 and result["eval"] is not None, result
  warnings = "\n".join(warnings_of(caplog))
  assert "training images of epoch 0 could not be decoded" in warnings
  assert "validation images could not be decoded" in warnings


# ---------------------------------------------------------------- Fashion-MNIST IDX files


def write_idx(path, array: np.ndarray) -> None:
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
    f">{array.ndim}I", *array.shape
  )
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def fake_copy(folder, n_train: int = 40, n_test: int = 20, suffix: str = ".gz") -> None:
  rng = np.random.default_rng(0)
  arrays = {
    "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
    "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
    "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
    "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
  }
  for key, stem in fashion_mnist.FILES.items():
    write_idx(folder / (stem + suffix), arrays[key])


def cut_mid_image(path) -> None:
  """Keeps the header, 7 whole images and half of the 8th (of the file's content)."""
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rb") as f:
    content = f.read()
  with opener(path, "wb") as f:
    f.write(content[: 16 + 7 * 784 + 392])


@pytest.mark.parametrize(
  "damage", ["content cut mid-image (gz)", "content cut mid-image", "compressed stream cut"]
)
def test_a_damaged_idx_file_is_one_sentence_naming_it(tmp_path, damage):
  suffix = "" if damage == "content cut mid-image" else ".gz"
  fake_copy(tmp_path, suffix=suffix)
  path = tmp_path / ("train-images-idx3-ubyte" + suffix)
  if damage == "compressed stream cut":
    truncate(path, keep=0.6)
  else:
    cut_mid_image(path)
  with pytest.raises(ConfigError) as e:
    fashion_mnist.load(str(tmp_path))
  message = str(e.value)
  assert message.startswith(str(path)) and one_sentence(message), message
  if damage == "compressed stream cut":
    assert "truncated or corrupt" in message
  else:
    assert "(40, 28, 28) (31360 bytes): 7 whole images of 40 and 392 bytes of the next" in message


def test_the_cli_stops_at_start_up_with_exit_2_on_a_truncated_idx_file(tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  fake_copy(data_dir)
  path = data_dir / "t10k-images-idx3-ubyte.gz"
  cut_mid_image(path)
  workdir = tmp_path / "w"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "mcl_jax.main",
      "--config=fashion_mnist:mcl_x2,smoke",
      f"--workdir={workdir}",
      f"--config.input.data_dir={data_dir}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {path} has 5880 data bytes") and one_sentence(last), last
  assert not workdir.exists()
