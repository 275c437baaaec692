"""The module import graph of the package folders: no cycle, no upward import, no hidden import.

Built with `ast` from the source (nothing is imported). An edge A -> B means module A imports B
(`import B`, `from B import name`, or `from P import B` naming submodule B); importing a.b.c
also runs the packages a and a.b, so those get edges too (except packages enclosing A). A
package whose __init__ imports a submodule that imports a name back from the __init__ (a
registry in the interface's module) is a cycle. The layers, in data-flow order:

    configs -> data, parallel -> objectives -> models -> training -> scripts

A package imports only from its own layer's packages' lower neighbours (ALLOWED below): e.g.
models/ nothing from training/ or scripts/. Imports sit at module top; a function-level
import is allowed only for an optional heavy dependency outside the project (none of ours).
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("configs", "data", "parallel", "objectives", "models", "training", "scripts")
# package -> the packages it may import (besides itself).
ALLOWED = {
    "configs": set(),
    "parallel": {"configs"},
    "data": {"configs"},
    "objectives": {"parallel"},
    "models": {"configs", "data", "parallel", "objectives"},
    "training": {"configs", "data", "parallel", "objectives", "models"},
    "scripts": {"configs", "data", "parallel", "objectives", "models", "training"},
}


def module_files(root: str) -> dict[str, str]:
  """{dotted module name: path} of every .py file under the package folders."""
  modules = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(root, package)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
          modules[dotted.removesuffix(".__init__")] = path
  return modules


def _resolve(name: str, modules: dict[str, str]) -> str | None:
  """The project module `name` refers to (its longest prefix that is one), else None."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def import_edges(root: str) -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
  """(edges {module: imported project modules}, [(module, target, line)] of imports made
  inside a function or class instead of at module top)."""
  modules = module_files(root)
  edges: dict[str, set[str]] = {m: set() for m in modules}
  nested = []
  for module, path in modules.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [_resolve(alias.name, modules) for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        # `from P import x`: submodule P.x, or a name defined in P itself.
        targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                   else _resolve(node.module, modules) for alias in node.names]
      else:
        continue
      for target in targets:
        if target is None or target == module:
          continue
        edges[module].add(target)
        # Importing a.b.c first runs the packages a and a.b (unless they enclose this module,
        # whose import started them already).
        parts = target.split(".")
        for i in range(1, len(parts)):
          parent = ".".join(parts[:i])
          if parent in modules and parent != module and not module.startswith(parent + "."):
            edges[module].add(parent)
        if id(node) not in top_level:
          nested.append((module, target, node.lineno))
  return edges, nested


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """One cycle [a, b, ..., a] of the graph, or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(edges):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
  """'a.b -> c.d' for every edge into a package its layer may not import."""
  bad = []
  for module, targets in edges.items():
    package = module.split(".")[0]
    for target in targets:
      other = target.split(".")[0]
      if other != package and other not in ALLOWED[package]:
        bad.append(f"{module} -> {target}")
  return sorted(bad)


@pytest.fixture(scope="module")
def graph():
  return import_edges(ROOT)


def test_the_import_graph_has_no_cycle(graph):
  edges, _ = graph
  cycle = find_cycle(edges)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_package_imports_a_higher_layer(graph):
  edges, _ = graph
  assert upward_imports(edges) == []


def test_imports_sit_at_module_top(graph):
  _, nested = graph
  assert [f"{m} imports {t} at line {n}" for m, t, n in nested] == []


def test_the_checks_catch_what_they_look_for(tmp_path):
  """A planted cycle, an upward import and a function-level import are each reported."""
  def write(rel, text):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  for package in PACKAGES:
    write(f"{package}/__init__.py", "")
  write("training/a.py", "from training import b\n")
  write("training/b.py", "import training.a\n")
  write("models/m.py", "def f():\n  from training import a\n")
  edges, nested = import_edges(str(tmp_path))
  assert find_cycle(edges) in (["training.a", "training.b", "training.a"],
                               ["training.b", "training.a", "training.b"])
  assert upward_imports(edges) == ["models.m -> training", "models.m -> training.a"]
  assert nested == [("models.m", "training.a", 2)]
  # A package's __init__ that imports its own submodule, which takes a name from the __init__.
  write("training/b.py", "")
  write("data/__init__.py", "from data import x\nVALUE = 1\n")
  write("data/x.py", "from data import y\n")
  write("data/y.py", "")
  edges, _ = import_edges(str(tmp_path))
  assert find_cycle(edges) is None  # x imports the submodule y, not the __init__'s names
  write("data/x.py", "from data import VALUE\n")
  edges, _ = import_edges(str(tmp_path))
  assert find_cycle(edges) == ["data", "data.x", "data"]
