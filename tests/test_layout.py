"""The house plan: the kubetune package's wings import one way, and no modules import in a circle.

Imports inside functions count too: a lazy import still ties two modules together.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"kubetune": ROOT / "trainer" / "kubetune",
            "kubetune_operator": ROOT / "operator" / "kubetune_operator"}

# Lowest first: a module may import from its own wing and the wings before it, never after.
# The command line is the one console script: it starts the operator's commands too.
WINGS = ["version", "spec", "study", "search", "builtin", "ensemble", "job", "worker", "local",
         "kubetune_operator", "cli", "__main__", "__init__"]
# What the trainer side (everything but the operator and the command line that starts it)
# must never import.
KUBERNETES_CLIENTS = ("kopf", "kubernetes")


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__" and len(parts) > 1:
                parts = parts[:-1]
            name = ".".join((package, *parts)) if parts != ("__init__",) else package
            found[name] = path
    return found


def imports(path: Path) -> set[str]:
    """Every module named by an import in ``path``, anywhere in the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imports(path) if m in known and m != name}
            for name, path in known.items()}


def wing(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "kubetune_operator":
        return "kubetune_operator"
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_belongs_to_a_wing():
    assert sorted(m for m in modules() if wing(m) not in WINGS) == []


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_module_imports_a_higher_wing(module):
    rank = WINGS.index(wing(module))
    higher = sorted(m for m in graph()[module] if WINGS.index(wing(m)) > rank)
    assert higher == [], f"{module} ({wing(module)}) reaches up to {higher}"


def test_no_import_circle():
    try:
        graphlib.TopologicalSorter(graph()).prepare()
    except graphlib.CycleError as err:
        pytest.fail(f"modules import each other in a circle: {' -> '.join(err.args[1])}")


@pytest.mark.parametrize("module", sorted(m for m in modules()
                                          if wing(m) not in ("cli", "kubetune_operator")))
def test_the_trainer_side_never_imports_a_kubernetes_client(module):
    used = {name.split(".")[0] for name in imports(modules()[module])}
    assert not used & set(KUBERNETES_CLIENTS), module
