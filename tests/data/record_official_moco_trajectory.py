r"""Records 10 MoCo-MCL training steps of the official code for tests/test_moco_parity.py.

  # once, outside the repository's history (.gitignore lists .official/):
  git clone https://github.com/winycg/MCL .official/winycg_MCL    # commit 236da2f
  .venv/bin/python tests/data/record_official_moco_trajectory.py --official=.official/winycg_MCL

What it runs is the official `main_moco_mcl.py` training step, on CPU, in float64, without
augmentation randomness: `moco.builder_mcl.MoCo` with M = 2, the official CIFAR ResNet-32
(`models.resnet.ResNet(BasicBlock, [5, 5, 5], num_classes=dim)`, its forward cut to the
classifier's output, as the torchvision encoders MoCo was written for return), dim 128,
the linear head (the official `--mlp` is a no-op), queue K = 64 = 4 x the batch of 16 (the
pointer wraps after 4 steps), key momentum 0.99 (so the key encoders move visibly in 10
steps), tau 0.07 (MoCo v1, `mcl_jax/configs/moco_r18_x2.py`); the model's own losses
(VCL, Soft VCL, ICL, Soft ICL with KLDiv(T=3)) summed with weight 1 as `train` does, and
`torch.optim.SGD(model.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)` (the recipe's
`--lr`, `--momentum`, `--wd`; no Nesterov), model in train mode.

Shuffle-BN: the official key forward shuffles the batch across the DDP processes
(`_batch_shuffle_ddp`, via torch.distributed). This records with a single-process gloo
group (world size 1), where the shuffle is a permutation of the whole batch and the key
encoders' BN statistics are those of the whole batch (up to float64 summation order):
global BN, which is what `mcl_jax.moco.train_step` does by default.

Inputs: 10 batches of 16 Fashion-MNIST training images averaged to 14x14 and normalised
(as tests/data/record_official_trajectory.py), two views each made here with a fixed seed
(view 1: the image, flipped with probability 1/2; view 2: a 12x12 crop at a random offset
resized back to 14x14 by nearest neighbour, flipped with probability 1/2), 3 identical
channels; both views are stored. Starting values: the query encoders from
`record_official_trajectory.initial_values` (its official-scale uniform init), the key
encoders copies of them (the official initialisation), the queues from `initial_queues`;
the test regenerates all of them, so no starting weights are stored.

Conditioning: the recording also runs the same 10 steps with every starting weight
multiplied by (1 + 1e-15 N(0, 1)) and stores the loss and final-value differences this
causes (`losses64_perturbed`, `sensitivity/...`): at the recipe's lr 0.03 this
float64-rounding-sized perturbation stays at rounding size after 10 steps (the recording
prints the figures), so two exact float64 implementations of the step agree to far below
the test's bounds, and the recipe's lr can be used (unlike the supervised recording).

Storage (the whole final state of four ResNet-32s in float32 would be 7.3 MiB): the queues
and every final tensor with at most FULL_MAX elements are stored in full (float32, 6e-8
relative); a larger one as SKETCH_ROWS random projections in float64, `sketch(name,
value)`: unit rows u_i (regenerated from the tensor's name), so |u_i . (ours - official)|
<= ||ours - official||_2, and a bound relative to the tensor's L2 norm (also stored)
bounds its relative L2 error; a wrong element moves every projection (except with
probability zero).

Writes tests/data/official_moco_trajectory.npz:
  view1, view2 [10, 16, 14, 14] float32 (normalised, one channel),
  lr, key_momentum, tau, weight_decay, init_seed, queue_seed: the recording's constants,
  losses64 [10, 7]: total, CE(logits_00), CE(logits_11), vcl, icl, soft_vcl, soft_icl,
  losses64_perturbed [10, 7], perturbation,
  queue_ptr [M] int64: the official per-member pointers after the last step,
  full/<name> float32, sketch/<name> [SKETCH_ROWS] float64, norm/<name> float64: the final
    values; names are the official state-dict keys (`encoder_q_<m>.<layer>`,
    `encoder_k_<m>.<layer>`, `queue` [M, d, K]); shape/<name> int64: their shapes,
  sensitivity/<name>: the largest |perturbed - unperturbed| final difference of a tensor.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import zlib

import numpy as np

STEPS, BATCH, MEMBERS = 10, 16, 2
DIM, QUEUE = 128, 64  # queue = 4 batches: the pointer wraps at steps 4 and 8
KEY_MOMENTUM, TAU, KD_T = 0.99, 0.07, 3.0
LR, MOMENTUM, WEIGHT_DECAY = 0.03, 0.9, 1e-4  # main_moco_mcl.py defaults
IMAGE, CROP = 14, 12
INIT_SEED, QUEUE_SEED, VIEW_SEED = 0, 1, 2
PERTURBATION = 1e-15  # relative: about float64 rounding
FULL_MAX = 4096  # tensors up to this many elements are stored whole
SKETCH_ROWS = 8
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "official_moco_trajectory.npz")


def views() -> tuple[np.ndarray, np.ndarray]:
  """Two fixed views [STEPS, BATCH, 14, 14] of STEPS x BATCH Fashion-MNIST training images."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
  from mcl_jax.data import fashion_mnist
  from mcl_jax.data import pipeline

  x_train, _, _, _ = fashion_mnist.load()
  images = pipeline.resize_grey(x_train[:2000], IMAGE)[..., 0]  # [N, 14, 14] in [0, 1]
  mean, std = images.mean(), images.std()
  rng = np.random.default_rng(VIEW_SEED)
  images = (images[rng.permutation(len(images))[: STEPS * BATCH]] - mean) / std
  flip = rng.random((2, len(images))) < 0.5
  view1 = np.where(flip[0, :, None, None], images[:, :, ::-1], images)
  offsets = rng.integers(0, IMAGE - CROP + 1, size=(len(images), 2))
  grid = np.arange(IMAGE) * CROP // IMAGE  # nearest-neighbour resize CROP -> IMAGE
  view2 = np.stack([im[oy + grid][:, ox + grid] for im, (oy, ox) in zip(images, offsets)])
  view2 = np.where(flip[1, :, None, None], view2[:, :, ::-1], view2)
  shape = (STEPS, BATCH, IMAGE, IMAGE)
  return view1.reshape(shape).astype(np.float32), view2.reshape(shape).astype(np.float32)


def initial_queues(seed: int = QUEUE_SEED) -> np.ndarray:
  """The starting queues [M, d, K] float32 (official layout): Gaussian, unit columns."""
  queue = np.random.default_rng(seed).standard_normal((MEMBERS, DIM, QUEUE))
  return (queue / np.linalg.norm(queue, axis=1, keepdims=True)).astype(np.float32)


def initial_encoders(
  shapes: dict[str, tuple[int, ...]], seed: int = INIT_SEED
) -> dict[str, np.ndarray]:
  """float32 starting values of every `encoder_q_<m>.` / `encoder_k_<m>.` state-dict entry.

  `shapes` holds one network's entries (no prefix). Member m's query encoder is
  `initial_values` with seed `seed + m`; its key encoder a copy (the official init).
  """
  import record_official_trajectory as supervised  # the same directory

  out = {}
  for m in range(MEMBERS):
    values = supervised.initial_values(shapes, seed + m)
    for key, value in values.items():
      out[f"encoder_q_{m}.{key}"] = value
      out[f"encoder_k_{m}.{key}"] = value.copy()
  return out


def sketch(name: str, value: np.ndarray) -> np.ndarray:
  """SKETCH_ROWS projections of `value` (float64) on unit random rows seeded by `name`."""
  flat = np.asarray(value, np.float64).reshape(-1)
  rows = np.random.default_rng(zlib.crc32(name.encode())).standard_normal((SKETCH_ROWS, flat.size))
  rows /= np.linalg.norm(rows, axis=1, keepdims=True)
  return rows @ flat


def _encoder_class(official_models):
  """The official CIFAR ResNet-32 returning only its classifier's output (a MoCo encoder)."""

  class CifarResNet32(official_models.resnet.ResNet):
    def __init__(self, num_classes):
      super().__init__(official_models.resnet.BasicBlock, [5, 5, 5], num_classes=num_classes)

    def forward(self, x):
      return self._forward(x)[0]

  return CifarResNet32


def run(official: str, view1: np.ndarray, view2: np.ndarray, perturb: float = 0.0):
  """(losses [STEPS, 7], final state dict as float64 numpy) of the official float64 run."""
  import torch
  import torch.distributed as dist

  sys.path.insert(0, os.path.abspath(official))
  # The official code moves its permutation and labels with `.cuda()`; on a CPU: a no-op.
  torch.Tensor.cuda = lambda self, *a, **k: self
  from moco import builder_mcl
  import models  # the official models/

  if not dist.is_initialized():  # world size 1: shuffle-BN is BN over the whole batch
    store = os.path.join(tempfile.mkdtemp(), "gloo")
    dist.init_process_group("gloo", init_method=f"file://{store}", world_size=1, rank=0)
  torch.manual_seed(0)  # the shuffle's permutation
  model = builder_mcl.MoCo(
    _encoder_class(models), number_net=MEMBERS, dim=DIM, K=QUEUE, m=KEY_MOMENTUM, T=TAU, mlp=False
  )
  one_net = {
    k[len("encoder_q_0.") :]: tuple(v.shape)
    for k, v in model.state_dict().items()
    if k.startswith("encoder_q_0.") and v.dtype.is_floating_point
  }
  start = initial_encoders(one_net)
  start["queue"] = initial_queues()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in start.items()}, strict=False)
  model.to(torch.float64)
  if perturb:  # every starting weight times (1 + perturb N(0, 1)), keys kept equal to queries
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
      for m in range(MEMBERS):
        query, key = getattr(model, f"encoder_q_{m}"), getattr(model, f"encoder_k_{m}")
        for p_q, p_k in zip(query.parameters(), key.parameters()):
          p_q.mul_(1.0 + perturb * torch.randn(p_q.shape, generator=noise, dtype=p_q.dtype))
          p_k.copy_(p_q)
  optimizer = torch.optim.SGD(model.parameters(), LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  model.train()
  losses = []
  for x1, x2 in zip(view1, view2):
    im_q = torch.from_numpy(np.repeat(x1[:, None], 3, axis=1)).to(torch.float64)  # NCHW
    im_k = torch.from_numpy(np.repeat(x2[:, None], 3, axis=1)).to(torch.float64)
    intra_logits, labels, vcl, soft_vcl, icl, soft_icl = model(im_q=im_q, im_k=im_k)
    loss = vcl + soft_vcl + icl + soft_icl  # main_moco_mcl.py's train()
    with torch.no_grad():
      ce = [model.ce(logits, labels) for logits in intra_logits]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append([float(t.detach()) for t in (loss, *ce, vcl, icl, soft_vcl, soft_icl)])
  final = {
    k: v.detach().numpy().astype(np.float64)
    for k, v in model.state_dict().items()
    if not k.endswith("num_batches_tracked")
  }
  return np.asarray(losses), final


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--official",
    default=".official/winycg_MCL",
    help="folder holding the official repository (models/, moco/)",
  )
  args = parser.parse_args()
  view1, view2 = views()
  losses64, final = run(args.official, view1, view2)
  losses_p, final_p = run(args.official, view1, view2, perturb=PERTURBATION)
  arrays = {
    "view1": view1,
    "view2": view2,
    "lr": np.float64(LR),
    "key_momentum": np.float64(KEY_MOMENTUM),
    "tau": np.float64(TAU),
    "weight_decay": np.float64(WEIGHT_DECAY),
    "init_seed": np.int64(INIT_SEED),
    "queue_seed": np.int64(QUEUE_SEED),
    "losses64": losses64,
    "losses64_perturbed": losses_p,
    "perturbation": np.float64(PERTURBATION),
    "queue_ptr": final.pop("queue_ptr").astype(np.int64),
  }
  for name, value in final.items():
    if value.size <= FULL_MAX or name == "queue":
      arrays[f"full/{name}"] = value.astype(np.float32)
    else:
      arrays[f"sketch/{name}"] = sketch(name, value)
      arrays[f"norm/{name}"] = np.float64(np.linalg.norm(value))
    arrays[f"shape/{name}"] = np.asarray(value.shape, np.int64)
    arrays[f"sensitivity/{name}"] = np.float64(np.abs(final_p[name] - value).max())
  print(
    "official float64 x (1 + 1e-15 N(0, 1)) vs float64, largest loss difference per step:",
    " ".join(f"{d:.0e}" for d in np.abs(losses_p - losses64).max(1)),
  )
  relative = max(
    float(np.abs(final_p[k] - v).max() / max(np.abs(v).max(), 1e-3)) for k, v in final.items()
  )
  print(f"largest final difference relative to the tensor's largest value: {relative:.1e}")
  print("losses (total, ce0, ce1, vcl, icl, soft_vcl, soft_icl):")
  print(np.array2string(losses64, precision=5, max_line_width=120))
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {OUT} ({os.path.getsize(OUT) / 2**20:.2f} MiB)")


if __name__ == "__main__":
  main()
