"""ImageNet-style input pipeline throughput on synthetic JPEGs (host CPU only).

  python benchmarks/input_pipeline.py [--num_images=512] [--image_size=224] [--batch=64]

Writes `num_images` JPEGs of 500x375 (about ImageNet's average size: a smooth random field
plus noise, quality 90, so they compress like photographs rather than like white noise)
into a temporary `train/<class>/` folder, then runs the training pipeline of
`mcl_jax.data.imagenet.ImageFolderSource` (read, header-only shape, decode of the random-
resized-crop window only, antialiased resize, flip, batch) for `epochs` passes, and prints
images/s in total and per host core (total divided by the cores this process may use),
and images per CPU-second (process CPU time; the per-core figure that survives a shared
machine).
The first batch (graph building, thread start-up) is not timed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcl_jax.data import imagenet  # noqa: E402
from mcl_jax.data import tf_lazy  # noqa: E402


def write_images(root: str, num_images: int, num_classes: int, seed: int = 0) -> int:
  """JPEGs under root/train/<class>/ and a few under root/val/<class>/; returns bytes written."""
  tf = tf_lazy.tf()
  rng = np.random.default_rng(seed)
  total = 0
  for split, count in (("train", num_images), ("val", num_classes)):
    for i in range(count):
      name = f"class_{i % num_classes:03d}"
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      coarse = rng.uniform(0, 255, (1, 12, 16, 3)).astype(np.float32)
      image = tf.image.resize(coarse, [375, 500], method="bicubic")[0]
      image += rng.normal(0, 8, (375, 500, 3)).astype(np.float32)
      encoded = tf.io.encode_jpeg(tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8), quality=90)
      tf.io.write_file(os.path.join(root, split, name, f"{i:06d}.jpg"), encoded)
      total += int(tf.strings.length(encoded))
  return total


def _cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def main(argv=None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_images", type=int, default=512)
  parser.add_argument("--num_classes", type=int, default=8)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--output_dtype", default="uint8", choices=("uint8", "float32"))
  parser.add_argument("--root", default="", help="reuse/keep this folder instead of a tmp dir")
  args = parser.parse_args(argv)

  root = args.root or tempfile.mkdtemp(prefix="mcl_jax_input_bench_")
  try:
    if not os.path.isdir(os.path.join(root, "train")):
      t0 = time.perf_counter()
      size = write_images(root, args.num_images, args.num_classes)
      print(
        f"wrote {args.num_images} JPEGs 500x375 ({size / args.num_images / 1024:.0f} KiB "
        f"each) to {root} in {time.perf_counter() - t0:.1f} s"
      )
    source = imagenet.ImageFolderSource(
      root, image_size=args.image_size, output_dtype=args.output_dtype
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    images, elapsed, cpu = 0, 0.0, 0.0
    for epoch in range(args.epochs):
      it = source.train_batches(
        epoch, seed=0, global_batch_size=args.batch, process_index=0, process_count=1
      )
      next(it)  # warm-up batch, not timed
      start, cpu_start = time.perf_counter(), _cpu_seconds()
      for batch in it:
        images += len(batch["label"])
      elapsed += time.perf_counter() - start
      cpu += _cpu_seconds() - cpu_start
    rate = images / elapsed
    print(
      f"train pipeline: {images} images in {elapsed:.2f} s = {rate:.0f} images/s on "
      f"{cores} host cores = {rate / cores:.0f} images/s per core "
      f"(image_size {args.image_size}, batch {args.batch}, {args.output_dtype})"
    )
    # On a shared machine wall time undercounts; CPU time says what one core can do.
    print(
      f"CPU time: {cpu:.2f} core-s = {images / cpu:.0f} images per core-second "
      f"(load average {os.getloadavg()[0]:.1f})"
    )
    return {
      "images_per_s": rate,
      "cores": cores,
      "images_per_s_per_core": rate / cores,
      "images_per_cpu_second": images / cpu,
    }
  finally:
    if not args.root:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
