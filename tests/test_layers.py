"""Imports point one way (docs/extending.md, "Layers"): a walk over every module's imports (the syntax tree, so
nothing is imported) checks that each part of tropd imports only the parts below it, that the objectives import
torch and nothing else, and that no two modules import each other, directly or through others.

The walk sees ``import x``, ``from x import y``, relative imports (``from . import y``, ``from ..train import
y``) and ``importlib.import_module("x")`` / ``__import__("x")`` with a literal name (a computed name cannot be
followed: keep such imports to the command line's plugins, which name no tropd module);
``test_the_walk_sees_every_form`` checks the walk itself on small sources. Imports inside functions count
(they run); imports under ``if TYPE_CHECKING:`` are exempt, deliberately (they never run: the samplers name the
``Teacher`` protocol they take, which the teacher package implements on top of rollout)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tropd"

#: Each part of tropd and its layer: a part may import its own modules and those of lower layers only.
LAYERS = {
    "tropd": 0,                                                 # the package's own __init__ (its version)
    "tropd.needs": 0, "tropd.settings": 0, "tropd.files": 0,   # declarations and chores every layer may use
    "tropd.objectives": 1,                                      # pure loss math
    "tropd.forward": 2, "tropd.models": 2, "tropd.tasks": 2,    # aligned forwards; loading models; task graders
    "tropd.lora": 3, "tropd.rollout": 3,                        # adapters on a model; sampling
    "tropd.teacher": 4, "tropd.eval": 4,                        # the Teacher; evaluation
    "tropd.train": 5,                                           # config, composition root, trainer, checkpoints
    "tropd.report": 6, "tropd.integrations": 6, "tropd.gym": 6,  # built on training runs
    "tropd.cli": 7, "tropd.__main__": 8,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def part(module: str) -> str | None:
    """The entry of :data:`LAYERS` that ``module`` belongs to (the root ``tropd`` holds only its own __init__)."""
    return next((p for p in sorted(LAYERS, key=len, reverse=True)
                 if module == p or p != "tropd" and module.startswith(p + ".")), None)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or \
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return ".".join(p for p in (package, name) if p)


def _dynamic_import(node: ast.Call, module: str, is_package: bool) -> str | None:
    """The module named by ``importlib.import_module("...")``, ``import_module("...")`` or ``__import__("...")``
    with a literal string (a relative name with a literal ``package=``), else None."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
        return None
    target = first.value
    if target.startswith("."):
        level = len(target) - len(target.lstrip("."))
        package = next((k.value.value for k in node.keywords if k.arg == "package"
                        and isinstance(k.value, ast.Constant) and isinstance(k.value.value, str)), None)
        if package is None:
            return None
        return _absolute(package, True, level, target[level:] or None)
    return target


def imports_in(source: str, module: str, modules=None, is_package: bool = False) -> tuple[set[str], set[str]]:
    """``(tropd modules, other top-level packages)`` that ``source``, the text of ``module``, imports when it runs.

    Seen: ``import x``, ``from x import y`` and relative ``from .x import y`` / ``from .. import y`` (resolved
    against ``module``; ``is_package``: it is a package's ``__init__``), and ``importlib.import_module("x")`` /
    ``__import__("x")`` with a literal name. ``from pkg import x`` is an import of the module ``pkg.x`` when there
    is one (in ``modules``), else of ``pkg``. Imports inside functions count; those under ``if TYPE_CHECKING:``
    do not (module docstring)."""
    modules = MODULES if modules is None else modules
    tree = ast.parse(source)
    ours, theirs = set(), set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module) if node.level else node.module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif isinstance(node, ast.Call):
            found = _dynamic_import(node, module, is_package)
            names = [found] if found else []
        else:
            names = []
        for name in names:
            if name.split(".")[0] == "tropd":
                while name not in modules and "." in name:  # a name inside a module: the module
                    name = name.rsplit(".", 1)[0]
                ours.add(name)
            else:
                theirs.add(name.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    ours.discard(module)
    return ours, theirs


def imports(module: str) -> tuple[set[str], set[str]]:
    """:func:`imports_in` of one of tropd's modules."""
    path = MODULES[module]
    return imports_in(path.read_text(), module, MODULES, path.name == "__init__.py")


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    assert not [m for m in MODULES if part(m) is None], "add the new part of tropd to LAYERS"


def test_imports_point_down():
    upward = [f"{m} imports {t} ({part(m)}: layer {LAYERS[part(m)]}, {part(t)}: layer {LAYERS[part(t)]})"
              for m, (ours, _) in GRAPH.items() for t in sorted(ours)
              if part(t) != part(m) and LAYERS[part(t)] >= LAYERS[part(m)]]
    assert not upward, "\n".join(upward)


def test_objectives_import_torch_only():
    allowed = {"torch", "tropd", "__future__", *sys.stdlib_module_names}
    for m in MODULES:
        if part(m) in ("tropd.objectives", "tropd.needs"):
            assert GRAPH[m][1] <= allowed, f"{m} imports {sorted(GRAPH[m][1] - allowed)}"
            assert {part(t) for t in GRAPH[m][0]} <= {"tropd.objectives", "tropd.needs"}, m


def test_integrations_use_the_objectives_only():
    """An integration (TRL) brings its own trainer, models and generation: of tropd it uses the objectives and
    what they read (needs), never the trainer, config, teacher or models."""
    for m in MODULES:
        if part(m) == "tropd.integrations":
            used = {part(t) for t in GRAPH[m][0]} - {"tropd.integrations"}
            assert used <= {"tropd.objectives", "tropd.needs"}, f"{m} imports {sorted(GRAPH[m][0])}"


def test_no_circles():
    """A depth-first walk over the module graph finds no module that (indirectly) imports itself."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(GRAPH[m][0]):
            if t == "tropd" or m.startswith(t + "."):  # a package's own __init__ runs before its modules anyway
                continue
            assert state.get(t) != 1, "circle: " + " -> ".join(path[path.index(t):] + [t])
            if t not in state:
                walk(t, path + [t])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            walk(m, [m])


KNOWN = {"tropd", "tropd.train", "tropd.train.run", "tropd.train.config", "tropd.rollout", "tropd.rollout.trb",
         "tropd.rollout.sampling", "tropd.teacher", "tropd.report"}


@pytest.mark.parametrize("source, module, package, expected", [
    ("import tropd.report", "tropd.rollout.guidance", False, {"tropd.report"}),
    ("from tropd.train import run", "tropd.rollout.guidance", False, {"tropd.train.run"}),
    ("from tropd.train.config import RunConfig", "tropd.rollout.guidance", False, {"tropd.train.config"}),
    ("from . import trb", "tropd.rollout.guidance", False, {"tropd.rollout.trb"}),
    ("from .sampling import sample", "tropd.rollout.guidance", False, {"tropd.rollout.sampling"}),
    ("from .. import teacher", "tropd.rollout.guidance", False, {"tropd.teacher"}),
    ("from ..train import config", "tropd.rollout.guidance", False, {"tropd.train.config"}),
    ("from ..train.run import x", "tropd.rollout.guidance", False, {"tropd.train.run"}),
    ("from . import sampling", "tropd.rollout", True, {"tropd.rollout.sampling"}),  # a package's __init__
    ("from .. import report", "tropd.rollout", True, {"tropd.report"}),
    ("import importlib\ndef f():\n    importlib.import_module('tropd.train.run')", "tropd.rollout.guidance",
     False, {"tropd.train.run"}),
    ("from importlib import import_module\nimport_module('.config', package='tropd.train')",
     "tropd.rollout.guidance", False, {"tropd.train.config"}),
    ("__import__('tropd.report')", "tropd.rollout.guidance", False, {"tropd.report"}),
    ("def f(name):\n    __import__(name)", "tropd.rollout.guidance", False, set()),  # a computed name
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tropd.teacher import Teacher",
     "tropd.rollout.guidance", False, set()),  # exempt: never runs
    ("import typing\nif typing.TYPE_CHECKING:\n    import tropd.report\nelse:\n    import tropd.teacher",
     "tropd.rollout.guidance", False, {"tropd.teacher"}),
])
def test_the_walk_sees_every_form(source, module, package, expected):
    """The walk on small made-up sources: each import form is seen, so the layer tests cannot pass because the
    walk saw nothing; TYPE_CHECKING imports and computed names are not followed."""
    assert imports_in(source, module, KNOWN, is_package=package)[0] == expected


def test_the_walk_sees_other_packages():
    source = "import os.path\nfrom importlib import import_module\ndef f():\n    import numpy\n" \
             "import_module('yaml')\nfrom . import trb"
    assert imports_in(source, "tropd.rollout.guidance", KNOWN) == ({"tropd.rollout.trb"},
                                                                   {"os", "importlib", "numpy", "yaml"})


def test_the_walk_finds_tropd_imports_in_tropd():
    """Every module but a few leaves imports something from tropd (the graph is not silently empty)."""
    assert sum(bool(ours) for ours, _ in GRAPH.values()) > len(GRAPH) // 2
    assert "tropd.train.build" in GRAPH["tropd.train.run"][0]
