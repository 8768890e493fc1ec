"""The package's shape: no import cycles, every entry point importable and documented.

An import cycle is a module that (directly or through others) imports itself, counting
imports inside functions too: such a cycle works only while the import order happens to
suit it, and makes a module impossible to read or reuse alone.
"""

import ast
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "mcl_jax")


def module_files() -> dict[str, str]:
  """{dotted module name: path} of every module of the package."""
  out = {}
  for dirpath, _, filenames in os.walk(PACKAGE):
    for filename in filenames:
      if not filename.endswith(".py"):
        continue
      rel = os.path.relpath(os.path.join(dirpath, filename), ROOT)[:-3].split(os.sep)
      if rel[-1] == "__init__":
        rel = rel[:-1]
      out[".".join(rel)] = os.path.join(dirpath, filename)
  return out


def imports_of(path: str, modules: dict[str, str]) -> set[str]:
  """The package modules `path` imports, at module level or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from a.b import c`: c is the module a.b.c when that file exists, else a name in a.b.
      names = [
        f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
        for alias in node.names
      ]
    else:
      continue
    found.update(n for n in names if n in modules)
  return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of the directed graph (a list of modules, first == last), or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt) :] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
  modules = module_files()
  graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
  "name",
  [
    "mcl_jax.main",
    "mcl_jax.export",
    "mcl_jax.plots",
    "mcl_jax.reproduce",
    "mcl_jax.demo",
    "mcl_jax.bench",
    "mcl_jax.fewshot",
    "mcl_jax.logreg_probe",
  ],
)
def test_every_command_module_imports_and_says_how_to_run_it(name):
  module = importlib.import_module(name)
  assert module.__doc__ and ("python -m " in module.__doc__ or "mcl-" in module.__doc__)
