"""Where a parameter's data lives: a safetensors file, memory, or nowhere (meta).

Lowering records references into the source checkpoint instead of copying it, so a `.ir`
of a 13 GB model is a few hundred kilobytes. Data a pass creates (sliced or trained weights,
fresh LoRA factors) is held in memory and written to the `.ir` file's sidecar on save.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lorashear.errors import ModelLoadError


class Storage:
    """Base class; ``load()`` returns the tensor (on CPU) or raises if there is no data."""

    has_data: bool = True

    def load(self) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class FileStorage(Storage):
    """A tensor ``key`` inside the safetensors file ``path`` (read lazily, memory-mapped)."""

    path: str
    key: str

    def load(self) -> torch.Tensor:
        if not os.path.exists(self.path):
            raise ModelLoadError(f"weights file {self.path} (for tensor {self.key!r}) does not exist")
        return _open(self.path).get_tensor(self.key)

    def shape_and_dtype(self) -> tuple[tuple[int, ...], torch.dtype]:
        sl = _open(self.path).get_slice(self.key)
        return tuple(sl.get_shape()), _SAFETENSORS_DTYPES[sl.get_dtype()]


class DataStorage(Storage):
    """Data held by the module itself: in memory, or (after loading a `.ir`) in its sidecar."""

    def __init__(self, tensor: torch.Tensor | None = None, *, sidecar: FileStorage | None = None):
        if tensor is None and sidecar is None:
            raise ValueError("DataStorage needs a tensor or a sidecar reference")
        self._tensor = tensor
        self._sidecar = sidecar

    def load(self) -> torch.Tensor:
        if self._tensor is None:
            assert self._sidecar is not None
            self._tensor = self._sidecar.load()
        return self._tensor

    def __repr__(self) -> str:
        return "DataStorage(in memory)" if self._tensor is not None else f"DataStorage({self._sidecar})"


class MetaStorage(Storage):
    """No data: the module was lowered for analysis only (``--meta``)."""

    has_data = False

    def load(self) -> torch.Tensor:
        raise ModelLoadError("this module was lowered without weights (meta); "
                             "lower it again without --meta to run or emit it")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MetaStorage)

    def __hash__(self) -> int:
        return hash(MetaStorage)

    def __repr__(self) -> str:
        return "MetaStorage()"


@functools.lru_cache(maxsize=64)
def _open_cached(path: str, mtime: float):
    return safe_open(path, framework="pt")


def _open(path: str):
    try:
        return _open_cached(path, os.path.getmtime(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot read safetensors file {path}: {exc}") from exc


def safetensors_keys(path: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors of a safetensors file: key -> (shape, dtype), from the header only."""
    handle = _open(str(path))
    out = {}
    for key in handle.keys():
        sl = handle.get_slice(key)
        out[key] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES[sl.get_dtype()])
    return out


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
