"""The `.ir` file: the text form plus, when needed, a safetensors sidecar.

``model.ir`` holds the printed module. Parameters whose data the module itself owns (trained
or sliced weights, fresh LoRA factors, buffers missing from the checkpoint) are written to
``model.ir.weights.safetensors`` beside it; parameters still equal to the source checkpoint
are references into it and are never copied. Both files are written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorashear._atomic import atomic_path
from lorashear.errors import IRParseError, LorashearError, ModelLoadError
from lorashear.ir.core import Module
from lorashear.ir.handles import check_weight_handles
from lorashear.ir.parser import IRParser
from lorashear.ir.printer import print_module
from lorashear.ir.storage import DataStorage, FileStorage, safetensors_keys
from lorashear.ir.types import torch_dtype

SIDECAR_SUFFIX = ".weights.safetensors"


def sidecar_path(ir_path: str | os.PathLike) -> Path:
    return Path(str(ir_path) + SIDECAR_SUFFIX)


def _relative_to(base: Path):
    def path_fn(path: str) -> str:
        p = Path(path).resolve()
        try:
            return str(p.relative_to(base))
        except ValueError:
            return str(p)
    return path_fn


def save_ir(module: Module, path: str | os.PathLike) -> Path:
    """Write ``module`` to ``path`` (+ sidecar). Nothing is left half-written on failure."""
    path = Path(path)
    base = path.resolve().parent
    owned = {name: p for name, p in module.params.items() if isinstance(p.storage, DataStorage)}
    side = sidecar_path(path)
    if owned:
        tensors = {}
        for name, p in owned.items():
            t = p.storage.load()
            tensors[name] = t.detach().to("cpu", torch_dtype(p.type.dtype)).contiguous()
        with atomic_path(side) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "lorashear"})
        for name, p in owned.items():  # the module now reads from the new sidecar lazily
            p.storage = DataStorage(tensors[name], sidecar=FileStorage(str(side.resolve()), name))
    elif side.exists():
        side.unlink()
    text = print_module(module, path_fn=_relative_to(base))
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def load_ir(path: str | os.PathLike, *, verify: bool = True,
            accept_changed_weights: bool = False) -> Module:
    """Read a `.ir` file (and its sidecar); verify it unless told not to.

    Every weight handle is checked against its file's header, and every recorded weights-file
    fingerprint against the file (:mod:`lorashear.ir.handles`), before anything runs.
    ``accept_changed_weights`` takes a rewritten checkpoint's new fingerprint instead of
    refusing it; saving the module then records it.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"IR file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise IRParseError(f"cannot read: {exc}", source=str(path), line=1, column=1) from None
    base = path.resolve().parent
    side = sidecar_path(path).resolve()

    def resolve(p: str) -> str:
        return str(p if os.path.isabs(p) else base / p)

    parser = IRParser(text, source=str(path), resolve_path=resolve,
                      sidecar=lambda name: FileStorage(str(side), name))
    module = parser.parse()
    _check_sidecar(module, path, side, parser.param_lines)
    check_weight_handles(module, source=str(path), param_lines=parser.param_lines,
                         weights_lines={f: line for f, (_, line) in parser.weights_files.items()},
                         accept_changed_weights=accept_changed_weights)
    if verify:
        from lorashear.ir.verifier import verify as run_verify
        try:
            run_verify(module)
        except LorashearError as exc:
            raise type(exc)(f"{path}: {exc.message}", hint=exc.hint) from None
    return module


def _check_sidecar(module: Module, path: Path, side: Path, lines: dict[str, int]) -> None:
    owned = {n: p for n, p in module.params.items() if isinstance(p.storage, DataStorage)}
    if not owned:
        return
    if not side.is_file():
        raise ModelLoadError(f"{path} keeps {len(owned)} tensors in its sidecar {side.name}, "
                             "which is missing")
    try:
        stored = safetensors_keys(side)
    except LorashearError as exc:
        raise ModelLoadError(f"the sidecar of {path} is corrupted: {exc}") from None
    for name, p in owned.items():
        where = f"{path}:{lines.get(name, 0)}: the sidecar {side.name}"
        if name not in stored:
            raise ModelLoadError(f"{where} lacks tensor {name!r}")
        shape, dtype = stored[name]
        if shape != p.type.shape:
            raise ModelLoadError(f"{where} holds {name!r} with shape {list(shape)}, the IR "
                                 f"declares {list(p.type.shape)}")
        if dtype != torch_dtype(p.type.dtype):
            raise ModelLoadError(f"{where} holds {name!r} as {dtype}, the IR declares {p.type.dtype}")


def materialize(tensor: torch.Tensor) -> DataStorage:
    """Storage owning ``tensor`` (detached, on CPU): how passes record new weights."""
    return DataStorage(tensor.detach().to("cpu").contiguous())
