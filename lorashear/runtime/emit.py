"""`lorashear-emit` formats in one place: torch and hf directories, and an ONNX model."""

from __future__ import annotations

import os
from pathlib import Path

from lorashear.errors import EmissionError
from lorashear.ir.core import Module
from lorashear.runtime.hf import save_model_dir

FORMATS = ("torch", "hf", "onnx")


def emit(module: Module, fmt: str, out: str | os.PathLike) -> Path:
    """Write ``module`` in format ``fmt`` to ``out``."""
    if fmt == "torch":
        return save_model_dir(module, out, merge=False)
    if fmt == "hf":
        return save_model_dir(module, out, merge=True)
    if fmt == "onnx":
        from lorashear.runtime.onnx_emit import emit_onnx

        return emit_onnx(module, out)
    raise EmissionError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
