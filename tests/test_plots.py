"""t-SNE figure (a real PNG) and the member-agreement matrix (exact values)."""

import numpy as np
import pytest

from mcl_jax import plots


def test_tsne_side_by_side_writes_a_png(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 10)
  emb_a = rng.normal(size=(30, 8)) + 5 * np.eye(3, 8)[labels]
  emb_b = rng.normal(size=(30, 8))
  path = str(tmp_path / "figs" / "tsne.png")  # Parent folder does not exist yet.
  out = plots.tsne_side_by_side(
    emb_a, emb_b, labels, path, titles=("MCL", "baseline"), max_iter=250, method="exact"
  )
  assert out == path
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  from PIL import Image

  with Image.open(path) as im:
    width, height = im.size
  assert (width, height) == (1200, 550)


def test_tsne_leaves_pyplot_backend_alone(tmp_path):
  import matplotlib

  before = matplotlib.rcParams["backend"]
  plots.tsne_side_by_side(
    np.eye(6),
    np.eye(6)[::-1],
    np.arange(6) % 2,
    str(tmp_path / "t.png"),
    max_iter=250,
    method="exact",
  )
  assert matplotlib.rcParams["backend"] == before


def test_member_agreement_exact_values():
  # Predictions per member over 4 examples (argmax of one-hot logits):
  # m0: 0 1 2 0; m1: 0 1 1 0; m2: 2 2 2 2.
  preds = np.array([[0, 1, 2, 0], [0, 1, 1, 0], [2, 2, 2, 2]])
  logits = np.eye(3)[preds] * 5.0 - 1.0  # [M=3, B=4, C=3]
  agree = plots.member_agreement(logits)
  expected = np.array(
    [
      [1.0, 0.75, 0.25],
      [0.75, 1.0, 0.0],
      [0.25, 0.0, 1.0],
    ]
  )
  np.testing.assert_array_equal(agree, expected)
  np.testing.assert_array_equal(agree, agree.T)
  np.testing.assert_array_equal(np.diag(agree), np.ones(3))
  # Masking the last example (padding) changes the denominators to 3.
  masked = plots.member_agreement(logits, mask=np.array([True, True, True, False]))
  np.testing.assert_allclose(masked, [[1, 2 / 3, 1 / 3], [2 / 3, 1, 0], [1 / 3, 0, 1]])


def test_member_agreement_accepts_jax_arrays():
  import jax.numpy as jnp

  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 5)), jnp.float32)
  agree = plots.member_agreement(logits)
  assert agree.shape == (2, 2) and agree[0, 0] == 1.0


def test_format_agreement_table():
  table = plots.format_agreement_table(np.array([[1.0, 0.75], [0.75, 1.0]]))
  lines = table.splitlines()
  assert len(lines) == 3
  assert lines[0].split() == ["member", "0", "member", "1"]
  assert lines[1].startswith("member 0") and lines[1].split()[-2:] == ["1.0000", "0.7500"]
  assert lines[2].split()[-2:] == ["0.7500", "1.0000"]
  with pytest.raises(ValueError, match="square"):
    plots.format_agreement_table(np.zeros((2, 3)))


def _plot_cli(*args):
  import os
  import subprocess
  import sys

  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run(
    [sys.executable, "-m", "mcl_jax.plots", *args],
    cwd=root,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_plot_command_on_a_run_and_comparing_runs(tmp_path):
  """mcl-plot on a finished tiny MCL x2 run: curves, the t-SNE of both members and the
  agreement table; --compare overlays a tag of two runs; an unknown tag is one line."""
  from mcl_jax import jobs
  from mcl_jax.configs import cifar100_common
  from mcl_jax.configs import common

  c = common.smoke(cifar100_common.set_variant(cifar100_common.base("tiny"), "mcl_x2"))
  c.model.num_classes = 0
  c.input.image_size = 8
  c.input.synthetic_eval_size = 40
  c.log_every_steps = 1
  jobs.run(c, str(tmp_path / "run"))
  proc = _plot_cli(f"--workdir={tmp_path / 'run'}", "--examples=40")
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name in ("curves.png", "tsne.png", "agreement.txt"):
    assert (tmp_path / "run" / "plots" / name).stat().st_size > 0
  assert "Members predicting the same class" in proc.stdout
  out = tmp_path / "compare.png"
  proc = _plot_cli(
    f"--compare=a={tmp_path / 'run'},b={tmp_path / 'run'}",
    "--tags=train/embed_cosine/member_0,train/vcl",
    f"--out={out}",
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  proc = _plot_cli(f"--compare=a={tmp_path / 'run'}", "--tags=train/nothing", f"--out={out}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: No run has the TensorBoard")
