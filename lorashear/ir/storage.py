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
from safetensors import SafetensorError, safe_open

from lorashear.errors import ModelLoadError, first_line
from lorashear.ir.fingerprint import ensure_unchanged


class Storage:
    """Base class; ``load()`` returns the tensor (on CPU) or raises if there is no data."""

    has_data: bool = True

    def load(self) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class FileStorage(Storage):
    """A tensor ``key`` inside the safetensors file ``path`` (read lazily, memory-mapped).

    ``fingerprint``, when recorded (see :mod:`lorashear.ir.fingerprint`), is checked before
    every read, so a checkpoint rewritten during a long run is an error, not new numbers.

    ``transposed``: the file stores the 2-D tensor transposed relative to the parameter (a
    GPT-2 ``Conv1D`` keeps its weight ``[in, out]``, the IR's linear layers ``[out, in]``);
    ``load`` returns the transposed view, so the parameter stays a reference into the file."""

    path: str
    key: str
    fingerprint: str | None = None
    transposed: bool = False

    def load(self) -> torch.Tensor:
        if not os.path.exists(self.path):
            raise ModelLoadError(f"weights file {self.path} (for tensor {self.key!r}) does not exist")
        if self.fingerprint is not None:
            ensure_unchanged(self.path, self.fingerprint)
        handle = open_safetensors(self.path)
        try:
            tensor = handle.get_tensor(self.key)
            return tensor.t() if self.transposed else tensor
        except Exception as exc:  # safetensors' own error type, or an OS error under the mmap
            raise ModelLoadError(f"cannot read tensor {self.key!r} from {self.path}: "
                                 f"{first_line(exc)}") from None

    def shape_and_dtype(self) -> tuple[tuple[int, ...], torch.dtype]:
        sl = open_safetensors(self.path).get_slice(self.key)
        shape = tuple(sl.get_shape())
        return shape[::-1] if self.transposed else shape, _SAFETENSORS_DTYPES[sl.get_dtype()]


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
def _open_cached(path: str, identity: tuple[int, ...]):
    return safe_open(path, framework="pt")


def open_safetensors(path: str):
    """The safetensors handle of ``path``, opened again whenever the file was replaced or
    changed size or time (a handle onto a replaced or shortened file would read stale bytes)."""
    try:
        st = os.stat(path)
        return _open_cached(path, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelLoadError(f"cannot read safetensors file {path}: {first_line(exc)}") from None


def safetensors_keys(path: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors of a safetensors file: key -> (shape, dtype), from the header only."""
    handle = open_safetensors(str(path))
    out = {}
    for key in handle.keys():
        sl = handle.get_slice(key)
        dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise ModelLoadError(f"safetensors file {path} holds {key!r} as {sl.get_dtype()}, an "
                                 "element type lorashear does not read")
        out[key] = (tuple(sl.get_shape()), dtype)
    return out


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "C64": torch.complex64,
}
