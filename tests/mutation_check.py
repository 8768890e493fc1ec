"""Breaks the code on purpose and checks that the test meant to guard it notices.

  .venv/bin/python tests/mutation_check.py            # every mutation, then the table
  .venv/bin/python tests/mutation_check.py --only=a,c # some of them
  .venv/bin/python tests/mutation_check.py --list     # what they are

Each mutation is one exact text replacement in one source file of `mcl_jax/` (the old text
must occur exactly once, so the script stops with an error when the code has moved rather
than silently testing nothing). For each, the package and the tests are copied to a fresh
temporary folder, the replacement is applied to the copy, and each of its guarding tests
runs there on its own with PYTHONPATH pointing at the copy; a guard first checks that
`import mcl_jax` in that environment loads the copy and not the editable install of this
checkout. Before the mutations, the same tests run once on an unmutated copy and must
pass: a test that fails anyway proves nothing. A test catches a mutation when it fails
(pytest exit 1); every test listed for a mutation must catch it.

Prints a markdown table (mutation, guarding test, result) and exits 1 when a test misses
its mutation, a guarding test fails on the unmutated code, or a replacement does not
apply.
Not a pytest module (the name does not start with `test_`): it runs pytest itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("mcl_jax", "tests", "pyproject.toml")
FLOAT32_PARITY = (
  "tests/test_step_parity.py::test_float32_steps_stay_within_float32_rounding_of_the_official_code"
)


@dataclasses.dataclass(frozen=True)
class Mutation:
  key: str
  name: str
  path: str  # relative to the repository root
  old: str
  new: str
  tests: tuple[str, ...]  # pytest node ids; each one must catch the mutation on its own


MUTATIONS = (
  Mutation(
    "a",
    "Soft ICL's teacher not detached (stop_gradient removed)",
    "mcl_jax/losses.py",
    "  log_p = jax.lax.stop_gradient(jnp.swapaxes(log_q, 0, 1))\n",
    "  log_p = jnp.swapaxes(log_q, 0, 1)\n",
    ("tests/test_losses.py::test_soft_targets_are_detached", FLOAT32_PARITY),
  ),
  Mutation(
    "b",
    "Resume restores only the step (fresh parameters, optimizer, BN, bank)",
    "mcl_jax/loop.py",
    "    self.state = restored[0]\n",
    "    self.state = self.state.replace(step=restored[0].step)\n",
    ("tests/test_reliability.py::test_harmless_changes_resume",),
  ),
  Mutation(
    "c",
    "Memory-bank update skipped (the sharded update the trainer uses)",
    "mcl_jax/memory_bank.py",
    '    return local_bank.at[:, target].set(new_rows, mode="drop")\n',
    "    return local_bank\n",
    ("tests/test_memory_bank.py::test_update_of_either_layout_equals_update[sharded]",),
  ),
  Mutation(
    "d",
    "ICL not added to the total loss (computed and logged, no gradient)",
    "mcl_jax/losses.py",
    "        for name in MCL_TERMS\n",
    '        for name in MCL_TERMS\n        if name != "icl"\n',
    (
      "tests/test_fashion_mnist.py::test_a_short_supervised_run_on_real_images_"
      "clearly_learns_and_mcl_aligns_the_members",
      FLOAT32_PARITY,
    ),
  ),
  Mutation(
    "e",
    "BatchNorm momentum 0 (running statistics never move)",
    "mcl_jax/models/layers.py",
    "  momentum: float = 0.1  # PyTorch's convention",
    "  momentum: float = 0.0  # PyTorch's convention",
    ("tests/test_models.py::test_train_mode_updates_batch_stats_eval_does_not",),
  ),
  Mutation(
    "f",
    "Elastic restore crops the bank's first rows instead of its padding",
    "mcl_jax/checkpointing.py",
    "      value = np.take(value, np.arange(want), axis=axis)\n",
    "      value = np.take(value, np.arange(have - want, have), axis=axis)\n",
    (
      "tests/test_reliability.py::"
      "test_elastic_restore_8_to_2_to_4_devices_equals_an_uninterrupted_run",
    ),
  ),
)


def make_copy(mutation: Mutation | None) -> str:
  """A temporary folder holding the package, the tests and pyproject.toml, mutated."""
  folder = tempfile.mkdtemp(prefix="mcl_mutation_")
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for name in COPIED:
    source, target = os.path.join(ROOT, name), os.path.join(folder, name)
    if os.path.isdir(source):
      shutil.copytree(source, target, ignore=ignore)
    else:
      shutil.copy2(source, target)
  if mutation is not None:
    path = os.path.join(folder, mutation.path)
    with open(path) as f:
      text = f.read()
    count = text.count(mutation.old)
    if count != 1:
      shutil.rmtree(folder)
      raise SystemExit(
        f"error: mutation {mutation.key} ({mutation.name}): its old text occurs "
        f"{count} times in {mutation.path}, not once; update MUTATIONS."
      )
    with open(path, "w") as f:
      f.write(text.replace(mutation.old, mutation.new))
  return folder


def environment(folder: str) -> dict[str, str]:
  # COLUMNS: pytest's one-line failure summaries are cut to the terminal's width.
  env = dict(os.environ, PYTHONPATH=folder, JAX_PLATFORMS="cpu", COLUMNS="250")
  env.pop("PYTHONSTARTUP", None)
  return env


def check_imports_the_copy(folder: str) -> None:
  """The guard: in the tests' environment, mcl_jax must come from the copy."""
  out = subprocess.run(
    [sys.executable, "-c", "import mcl_jax; print(mcl_jax.__file__)"],
    cwd=folder,
    env=environment(folder),
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  print(f"  mcl_jax.__file__ = {out}", flush=True)
  if not os.path.realpath(out).startswith(os.path.realpath(folder) + os.sep):
    raise SystemExit(f"error: the tests would import {out}, not the copy in {folder}.")


def run_tests(folder: str, tests: tuple[str, ...]) -> tuple[int, float]:
  """(pytest's exit status, seconds) of `tests` run in the copy."""
  command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
  start = time.time()
  proc = subprocess.run(
    command, cwd=folder, env=environment(folder), capture_output=True, text=True
  )
  lines = (proc.stdout + proc.stderr).strip().splitlines()
  for line in lines:
    if line.startswith(("FAILED", "ERROR")):
      print(f"  {line[:300]}")
  print(f"  pytest exit {proc.returncode}: {lines[-1] if lines else ''}", flush=True)
  return proc.returncode, time.time() - start


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="comma-separated mutation keys (default all)")
  parser.add_argument("--list", action="store_true", help="list the mutations and exit")
  parser.add_argument(
    "--skip_baseline",
    action="store_true",
    help="do not first run the guarding tests on the unmutated code",
  )
  args = parser.parse_args()
  chosen = [m for m in MUTATIONS if not args.only or m.key in args.only.split(",")]
  if args.list or not chosen:
    for m in MUTATIONS:
      print(f"{m.key}  {m.name}  ({m.path}) -> {', '.join(m.tests)}")
    return 0 if args.list else 2
  ok = True
  if not args.skip_baseline:
    print("baseline: the guarding tests on the unmutated code", flush=True)
    folder = make_copy(None)
    try:
      check_imports_the_copy(folder)
      tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
      status, _ = run_tests(folder, tests)
      if status != 0:
        print(f"error: a guarding test fails on the unmutated code (exit {status}).")
        ok = False
    finally:
      shutil.rmtree(folder)
    if not ok:
      return 1
  rows = []
  for m in chosen:
    print(f"mutation {m.key}: {m.name}", flush=True)
    folder = make_copy(m)
    try:
      check_imports_the_copy(folder)
      for test in m.tests:
        status, seconds = run_tests(folder, (test,))
        result = {0: "NOT caught (test passes)", 1: "caught (test failed)"}.get(
          status, f"error (pytest exit {status})"
        )
        ok = ok and status == 1
        rows.append(f"| {m.key}. {m.name} (`{m.path}`) | `{test}` | {result}, {seconds:.0f} s |")
    finally:
      shutil.rmtree(folder)
  print("\n| mutation | guarding test | result |\n|---|---|---|")
  print("\n".join(rows))
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
