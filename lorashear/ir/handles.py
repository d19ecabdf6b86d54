"""Checking a loaded module's weight handles against the files they name, before any pass runs.

A ``file("PATH", "KEY")`` handle is only opened when its tensor is first read, which can be
hours into a training pass. Loading therefore checks every handle against its file's
safetensors header (the file exists and is well formed, holds the key, with the declared
shape and a compatible element type) without reading tensor data, and compares each file's
recorded fingerprint with the file as it is now. Any mismatch is one error naming the `.ir`
line, the file and the tensor.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from lorashear.errors import ModelLoadError
from lorashear.ir.core import Module, Param
from lorashear.ir.fingerprint import current_fingerprint, read_header
from lorashear.ir.storage import FileStorage, open_safetensors

#: safetensors element types by the IR's names for them.
_IR_DTYPE_OF = {"F64": "f64", "F32": "f32", "F16": "f16", "BF16": "bf16", "I64": "i64",
                "I32": "i32", "I16": "i16", "I8": "i8", "U8": "u8", "BOOL": "bool", "C64": "c64"}
_FLOATING = frozenset({"f64", "f32", "f16", "bf16"})

ACCEPT_HINT = ("if the new weights are meant, load with --accept-changed-weights "
               "(load_ir(..., accept_changed_weights=True)) and save the module again to record them")


def dtypes_agree(stored: str, declared: str) -> bool:
    """A file's tensor can stand for a parameter: the same element type, or both floating
    point (lowering at another precision, ``--dtype bfloat16`` over an fp32 checkpoint,
    converts on load)."""
    return stored == declared or (stored in _FLOATING and declared in _FLOATING)


def check_weight_handles(module: Module, *, source: str, param_lines: dict[str, int],
                         weights_lines: dict[str, int],
                         accept_changed_weights: bool = False) -> None:
    """Check every ``file(...)`` handle of ``module`` (parsed from ``source``) against its file.

    ``param_lines`` and ``weights_lines`` give the `.ir` lines of the parameters and of the
    files' ``weights`` statements. A file whose fingerprint changed is an error unless
    ``accept_changed_weights``, which records the file's current fingerprint instead (headers
    must still match). Raises :class:`ModelLoadError` on the first mismatch.
    """
    by_file: dict[str, list[Param]] = defaultdict(list)
    for p in module.params.values():
        if isinstance(p.storage, FileStorage):
            by_file[p.storage.path].append(p)
    def where(p: Param) -> str:
        return (f"{source}:{param_lines.get(p.name, 0)}: @{p.name} reads {p.storage.key!r} "
                f"from {p.storage.path}")

    for path, params in by_file.items():
        first = params[0]
        try:
            header = read_header(path)
            open_safetensors(path)  # safetensors' own validation (offsets cover the data exactly)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{source}:{param_lines.get(first.name, 0)}: @{first.name} "
                                 f"reads {first.storage.key!r}: {exc.message}", hint=exc.hint) from None
        for p in params:
            entry = header.tensors.get(p.storage.key)
            if entry is None:
                raise ModelLoadError(f"{where(p)}, but the file holds no such tensor",
                                     hint="was the checkpoint replaced by another model's?")
            stored_shape = tuple(p.type.shape[::-1]) if p.storage.transposed else p.type.shape  # Conv1D
            if entry.shape != stored_shape:
                raise ModelLoadError(f"{where(p)}, but the file holds it with shape "
                                     f"{list(entry.shape)}, the IR declares {list(stored_shape)}"
                                     + (" (stored transposed)" if p.storage.transposed else ""))
            stored = _IR_DTYPE_OF.get(entry.dtype)
            if stored is None or not dtypes_agree(stored, p.type.dtype):
                raise ModelLoadError(f"{where(p)}, but the file holds it as {entry.dtype}, the IR "
                                     f"declares {p.type.dtype}")
        _check_fingerprint(path, params, source, weights_lines, accept_changed_weights)


def _check_fingerprint(path: str, params: list[Param], source: str, weights_lines: dict[str, int],
                       accept: bool) -> None:
    recorded = {p.storage.fingerprint for p in params} - {None}
    if not recorded:
        return  # written before fingerprints existed: the header checks are what there is
    now = current_fingerprint(path)
    if recorded == {now}:
        return
    if not accept:
        raise ModelLoadError(f"{source}:{weights_lines.get(path, 0)}: weights file {path} changed "
                             f"since {source} was written (its fingerprint differs)", hint=ACCEPT_HINT)
    for p in params:
        p.storage = dataclasses.replace(p.storage, fingerprint=now)


def record_fingerprints(module: Module) -> None:
    """Give every ``file(...)`` handle of ``module`` its file's current fingerprint (what
    lowering does, so that a later rewrite of the checkpoint is noticed on load)."""
    for p in module.params.values():
        if isinstance(p.storage, FileStorage):
            p.storage = dataclasses.replace(p.storage, fingerprint=current_fingerprint(p.storage.path))
