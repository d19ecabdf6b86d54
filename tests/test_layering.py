"""The package's layers only point down, and the attribute kinds a `.ir` file may name resolve.

Layers, lowest first (a module may import its own package and any lower layer, never a sibling
or a higher one; function-level imports count too):
errors/_atomic <- ir, kernels <- data, frontend <- runtime, models, eval <- analysis <- training
<- passes <- report <- cli and the package facade.
"""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import pytest

import lorashear
from lorashear.ir.attributes import ENTRY_POINT_GROUP, Attribute, attribute_kind

PACKAGE = Path(lorashear.__file__).parent

LAYERS: dict[str, int] = {
    "errors": 0, "_atomic": 0,
    "ir": 1, "kernels": 1,
    "data": 2, "frontend": 2,
    "runtime": 3, "models": 3, "eval": 3,
    "analysis": 4,
    "training": 5,
    "passes": 6,
    "report": 7,
    "cli": 8, "__init__": 8,
}


def part_of(module_path: Path) -> str:
    """The top-level part of lorashear a source file belongs to (``ir``, ``passes``, ...)."""
    relative = module_path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_parts(source: str) -> list[tuple[int, str]]:
    """(line, part) of every ``lorashear.<part>`` that a source imports, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lorashear" and len(parts) > 1 and parts[1] in LAYERS:
                found.append((node.lineno, parts[1]))
                break
    return found


def test_every_part_has_a_layer():
    parts = {part_of(p) for p in PACKAGE.rglob("*.py")}
    assert parts <= set(LAYERS), f"give these parts a layer in LAYERS: {sorted(parts - set(LAYERS))}"


def test_layers_only_point_down():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = part_of(path)
        for line, there in imported_parts(path.read_text()):
            if there != here and LAYERS[there] >= LAYERS[here]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {here} (layer "
                             f"{LAYERS[here]}) imports {there} (layer {LAYERS[there]})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_the_check_sees_an_upward_import():
    """The parser behind the layering test finds module-level and function-level imports."""
    source = "import torch\nfrom lorashear.ir.core import Module\ndef f():\n    import lorashear.passes.lhspg\n"
    assert imported_parts(source) == [(2, "ir"), (4, "passes")]


def entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def test_attribute_entry_points_cover_the_builtin_kinds():
    names = {e.name for e in entry_points()}
    assert {"groups", "prune-mask", "saliency", "knowledge", "lhspg-log", "recover-log",
            "recover-cursor"} <= names


@pytest.mark.parametrize("entry", entry_points(), ids=lambda e: e.name)
def test_attribute_entry_point_names_its_kind(entry):
    cls = entry.load()
    assert isinstance(cls, type) and issubclass(cls, Attribute)
    assert cls.kind == entry.name
    assert attribute_kind(entry.name) is cls


def test_ir_names_no_higher_module():
    """`ir` finds the kinds of higher layers by entry point, not by naming their modules."""
    for path in (PACKAGE / "ir").rglob("*.py"):
        text = path.read_text()
        for part, layer in LAYERS.items():
            if layer > LAYERS["ir"] and part != "__init__":
                assert f"lorashear.{part}." not in text, f"{path.name} names lorashear.{part}"
