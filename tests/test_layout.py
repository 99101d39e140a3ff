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


# Optuna's private names that kubetune needs (a study's storage and id, a trial's id, the RDB
# storage's private methods, Optuna's private modules): one module may use them, so that an
# Optuna upgrade that renames one is a change there only.
OPTUNA_INTERNALS = "kubetune.study.optuna_internals"
OPTUNA_PRIVATE_ATTRS = {"_storage", "_study_id", "_trial_id", "_backend"}
OPTUNA_PRIVATE_METHODS = {"_get_stale_trial_ids", "_create_new_trial", "_set_trial_param",
                          "_get_best_trial_id", "_get_trials"}


def optuna_private_names(path: Path) -> list[str]:
    """Where ``path`` uses one of Optuna's private names: an attribute of that name (but
    ``self._storage`` and the like, a class's own attribute, unless it is a private RDB storage
    method), the name as a string (``getattr``, ``setattr``), a private Optuna module or name,
    imported or reached through ``optuna.``, or ``__abstractmethods__`` (an Optuna base class
    made concrete by patching it rather than by implementing its methods)."""
    from kubetune.study.optuna_internals import RDB_PRIVATE_METHODS

    methods = OPTUNA_PRIVATE_METHODS | set(RDB_PRIVATE_METHODS)
    private = OPTUNA_PRIVATE_ATTRS | methods
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        named: list[str] = []
        if isinstance(node, ast.Import):
            named = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            named = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute):
            own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            dotted = ast.unparse(node)
            if (node.attr in methods | {"__abstractmethods__"}
                    or (node.attr in private and not own)
                    or (dotted.startswith("optuna.") and "._" in dotted)):
                found.add(f"line {node.lineno}: {dotted}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value in private:
            found.add(f"line {node.lineno}: {node.value!r}")
        found.update(f"line {node.lineno}: import {name}" for name in named
                     if name.split(".")[0] == "optuna"
                     and any(part.startswith("_") for part in name.split(".")))
    return sorted(found)


def test_the_optuna_internals_module_is_where_it_should_be():
    assert OPTUNA_INTERNALS in modules()
    assert optuna_private_names(modules()[OPTUNA_INTERNALS])  # the scan finds what it uses


@pytest.mark.parametrize("module", sorted(m for m in modules() if m != OPTUNA_INTERNALS))
def test_only_the_optuna_internals_module_uses_optuna_private_names(module):
    used = optuna_private_names(modules()[module])
    assert used == [], f"{module} uses Optuna's private names, not {OPTUNA_INTERNALS}: {used}"
