"""FileCheck-style golden tests: every `tests/filecheck/*.ir` runs its `# RUN:` lines.

`%s` is the file itself; each RUN line is a shell pipeline of our commands into `filecheck`
(the PyPI port of LLVM's FileCheck), which matches the `# CHECK...:` lines against the output.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

CASES = sorted((Path(__file__).parent / "filecheck").glob("*.ir"))


def _run_lines(path: Path) -> list[str]:
    return [line.split("RUN:", 1)[1].strip().replace("%s", str(path))
            for line in path.read_text().splitlines() if line.startswith("# RUN:")]


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_filecheck(path):
    runs = _run_lines(path)
    assert runs, f"{path} has no RUN line"
    for command in runs:
        done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
