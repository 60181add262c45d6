"""Imports point one way (docs/extending.md, "Layers"): a walk over every module's imports (the syntax tree, so
nothing is imported) checks that each part of tropd imports only the parts below it, that the objectives import
torch and nothing else, and that no two modules import each other, directly or through others.

Imports inside functions count (they run); imports under ``if TYPE_CHECKING:`` do not (they never run: the
samplers name the ``Teacher`` protocol they take, which the teacher package implements on top of rollout)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

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


def imports(module: str) -> tuple[set[str], set[str]]:
    """``(tropd modules, other top-level packages)`` that ``module`` imports when it runs. ``from pkg import x``
    is an import of the module ``pkg.x`` when there is one, else of ``pkg``."""
    tree = ast.parse(MODULES[module].read_text())
    ours, theirs = set(), set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            names = []
        for name in names:
            if name.split(".")[0] == "tropd":
                ours.add(name if name in MODULES else name.rsplit(".", 1)[0])
            else:
                theirs.add(name.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    ours.discard(module)
    return ours, theirs


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
