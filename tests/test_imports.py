"""The import rules of docs/design.md hold in the code: layers import downwards only, no cycles, and no
import hidden inside a function to dodge one.

The layer table is read from docs/design.md itself (its "Import layers" table), so the document and the
code cannot drift apart without this test failing.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "noisy_student"
DESIGN = ROOT / "docs" / "design.md"

# Deferred on purpose, not to dodge a cycle: the CLI sets up the allocator, CPU devices and XLA flags
# before anything imports jax.
DEFERRED_ALLOWED = {"noisy_student.__main__"}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str:
  """The package module an imported name stands for (`noisy_student.data.pipeline.Noise` -> the module)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name


def _imports(path: pathlib.Path):
  """(imported package module, line, inside a function or class) for each import of noisy_student."""
  tree = ast.parse(path.read_text(), str(path))
  found = []

  def visit(node, nested):
    for child in ast.iter_child_nodes(node):
      inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
      names = []
      if isinstance(child, ast.Import):
        names = [a.name for a in child.names]
      elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
        names = [f"{child.module}.{a.name}" for a in child.names]
      for name in names:
        if name.startswith("noisy_student"):
          found.append((_resolve(name), child.lineno, inner))
      visit(child, inner)

  visit(tree, False)
  return found


def _graph():
  """{module: the package modules it imports}."""
  return {m: {i for i, _, _ in _imports(p) if i not in (m, "noisy_student")} for m, p in MODULES.items()}


def _layers():
  """{module or package prefix: layer} from the design document's table."""
  text = DESIGN.read_text()
  section = text.split("## Import layers", 1)
  assert len(section) == 2, f"{DESIGN} has no '## Import layers' section"
  layers = {}
  for line in section[1].split("\n## ", 1)[0].splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) >= 3 and cells[0].isdigit():
      for name in re.findall(r"`([a-z_/.]+)`", cells[2]):
        layers["noisy_student." + name.strip("/").replace("/", ".")] = int(cells[0])
  assert layers, f"no layer rows in {DESIGN}'s import table"
  return layers


def _layer_of(module: str, layers) -> int:
  name = module
  while name:
    if name in layers:
      return layers[name]
    name = name.rpartition(".")[0]
  raise AssertionError(f"{module} is in no layer of {DESIGN}'s import table: add it there")


def test_every_module_has_a_layer():
  layers = _layers()
  for module in MODULES:
    if module != "noisy_student":
      _layer_of(module, layers)
  stale = [name for name in layers if name not in MODULES]
  assert not stale, f"{DESIGN} names modules that do not exist: {stale}"


def test_imports_run_downwards():
  layers = _layers()
  upward = []
  for module, path in MODULES.items():
    if module == "noisy_student":
      continue
    for imported, line, _ in _imports(path):
      if imported in ("noisy_student", module):
        continue
      here, there = _layer_of(module, layers), _layer_of(imported, layers)
      # Foundations stand alone: each imports only within its own package (models/ within models/).
      alone = here == 0 and there == 0 and imported.split(".")[:2] != module.split(".")[:2]
      if there > here or alone:
        upward.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
  assert not upward, "imports against the layers of docs/design.md:\n" + "\n".join(upward)


def test_no_import_inside_a_function():
  hidden = [
    f"{path.relative_to(ROOT)}:{line} imports {imported} inside a function"
    for module, path in MODULES.items()
    if module not in DEFERRED_ALLOWED
    for imported, line, nested in _imports(path)
    if nested
  ]
  assert not hidden, "\n".join(hidden)


def test_no_import_cycles():
  graph = _graph()
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
      if nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])


def test_labeling_job_needs_no_trainer():
  """Labeling is its own job: nothing it imports, directly or not, is the trainer or its step."""
  graph = _graph()
  reached, todo = set(), ["noisy_student.label"]
  while todo:
    for nxt in graph[todo.pop()] - reached:
      reached.add(nxt)
      todo.append(nxt)
  assert not reached & {"noisy_student.train", "noisy_student.trainer"}, sorted(reached)
