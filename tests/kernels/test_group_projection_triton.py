"""The fused Triton kernels against the torch reference, in processes of their own.

Triton fixes at kernel-definition time whether it compiles or interprets, so the cases in
``triton_cases_group_projection.py`` run in a child process: with ``TRITON_INTERPRET=1`` on the
CPU everywhere Triton is installed, and compiled on the GPU where CUDA is available.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = Path(__file__).with_name("triton_cases_group_projection.py")
REPOSITORY = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install 'lorashear[gpu]')")


def _run_cases(*, interpret: bool) -> None:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")]))
    if interpret:
        environment["TRITON_INTERPRET"] = "1"
    else:
        environment.pop("TRITON_INTERPRET", None)
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
        cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, (
        f"Triton cases failed (interpret={interpret}):\n{completed.stdout[-6000:]}\n"
        f"{completed.stderr[-3000:]}")


def test_triton_interpreter_on_cpu_matches_reference() -> None:
    _run_cases(interpret=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_triton_on_cuda_matches_reference() -> None:
    _run_cases(interpret=False)
