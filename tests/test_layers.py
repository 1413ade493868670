"""The package's layers (../shared/DESIGN.md), read off the imports with `ast`: each module uses
only the layers before it, nothing below the face imports gru_deploy/__init__.py, and there is
no import circle. Exceptions would be listed by name below (there are none), so the lists can
only shrink: a new upward import or circle fails, and so does a listed one that is gone."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gru_deploy"

# Layer of each top-level module or folder of gru_deploy, lowest first.
LAYERS = {
    "errors": 0, "spec": 0, "manifest": 0, "versions": 0,  # contract: no torch
    "models": 1, "data": 1, "train": 1,
    "check": 2,
    "convert": 3,
    "bundle": 4,
    "serve": 5,
    "cli": 6, "api": 6, "bench": 6, "accuracy": 6, "__main__": 6, "__init__": 6,  # face
}
FACE = 6

# Upward imports and import circles still to remove, by name (none left): a new one fails, and
# so does a listed one that is gone.
KNOWN_UPWARD: set[tuple[str, str]] = set()
KNOWN_CIRCLES: list[set[str]] = []


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every gru_deploy module and the gru_deploy modules it imports, at the top or inside a
    function (a lazy import is still a dependency)."""
    edges: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        found = edges.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("gru_deploy"):
                found.add(node.module)
                for alias in node.names:  # `from gru_deploy.convert import script`: the submodule
                    child = f"{node.module}.{alias.name}"
                    if (PACKAGE.parent / (child.replace(".", "/") + ".py")).is_file():
                        found.add(child)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("gru_deploy"))
    return edges


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else LAYERS["__init__"]


def circles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    assert all(layer(m) >= 0 for m in imports())


def test_no_module_imports_a_higher_layer():
    edges = imports()
    upward = {(m, t) for m, targets in edges.items() for t in targets
              if t != "gru_deploy" and layer(t) > layer(m)}
    assert upward - KNOWN_UPWARD == set(), "new upward imports"
    assert KNOWN_UPWARD - upward == set(), "gone: strike them from KNOWN_UPWARD"


def test_nothing_below_the_face_imports_the_package_init():
    edges = imports()
    assert sorted(m for m, targets in edges.items() if "gru_deploy" in targets and layer(m) < FACE) == []


def test_no_new_import_circle():
    found = circles(imports())
    assert [c for c in found if c not in KNOWN_CIRCLES] == [], "a new import circle"
    assert [c for c in KNOWN_CIRCLES if c not in found] == [], "broken: strike it from KNOWN_CIRCLES"


def test_the_checks_see_a_violation():
    """The reader catches what it is for: an upward import and a circle made up here."""
    edges = {"gru_deploy.check.x": {"gru_deploy.serve.y"}, "gru_deploy.serve.y": {"gru_deploy.check.x"}}
    assert [(m, t) for m, ts in edges.items() for t in ts if layer(t) > layer(m)] == [
        ("gru_deploy.check.x", "gru_deploy.serve.y")]
    assert circles(edges) == [{"gru_deploy.check.x", "gru_deploy.serve.y"}]


# The rule: a function over ~60 lines says in its docstring why it is that long.
LONG_FUNCTION = 60
REASON = "Over 60 lines:"


def long_functions_without_a_reason(source: str, where: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            size = node.end_lineno - node.lineno + 1
            if size > LONG_FUNCTION and REASON not in " ".join((ast.get_docstring(node) or "").split()):
                found.append(f"{where}:{node.lineno} {node.name} ({size} lines)")
    return found


def test_every_long_function_says_why_in_its_docstring():
    found = [f for path in sorted(PACKAGE.rglob("*.py"))
             for f in long_functions_without_a_reason(path.read_text(), str(path.relative_to(PACKAGE)))]
    assert found == [], f"over {LONG_FUNCTION} lines with no '{REASON}' in the docstring: {found}"


def test_the_long_function_check_sees_one():
    body = "\n".join(f"    x{i} = {i}" for i in range(LONG_FUNCTION))
    assert long_functions_without_a_reason(f'def f():\n    """Short."""\n{body}\n', "m.py") == [
        f"m.py:1 f ({LONG_FUNCTION + 2} lines)"]
    assert long_functions_without_a_reason(f'def f():\n    """{REASON} why."""\n{body}\n', "m.py") == []
