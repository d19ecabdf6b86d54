"""The layer diagrams in README.md and docs/architecture.md say what tests/test_layering.py
enforces: the same parts, in the same layers, so a newcomer's map cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.test_layering import LAYERS, PACKAGE

ROOT = Path(__file__).parents[1]


def code_blocks(markdown: str) -> list[str]:
    """The text of every fenced code block."""
    blocks, current = [], None
    for line in markdown.splitlines():
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def diagram_layers(markdown: str) -> dict[str, int]:
    """Part -> layer number of the first code block that draws the layers with ``<-``."""
    for block in code_blocks(markdown):
        if "<-" in block:
            layers = [re.sub(r"\(.*?\)", "", chunk) for chunk in " ".join(block.split()).split("<-")]
            return {name.strip(): number for number, chunk in enumerate(layers)
                    for name in chunk.split(",") if name.strip()}
    raise AssertionError("no layer diagram (a code block with '<-') found")


@pytest.mark.parametrize("document", ["README.md", "docs/architecture.md"])
def test_layer_diagram_matches_the_layering_test(document):
    drawn = diagram_layers((ROOT / document).read_text())
    assert drawn == {part: layer for part, layer in LAYERS.items() if part != "__init__"}


def test_readme_layout_names_every_package():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("\n## ", readme.index("## Layout") + 1)]
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert [p for p in packages if f"lorashear/{p}/" not in layout] == []


def test_diagram_parser_sees_a_misplaced_part():
    drawn = diagram_layers("```\nerrors <- ir, data <- runtime (x)\n```")
    assert drawn == {"errors": 0, "ir": 1, "data": 1, "runtime": 2}
