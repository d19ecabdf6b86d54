"""Safetensors headers read without torch, and fingerprints that notice a rewritten checkpoint.

A `.ir` file refers to tensors in the source checkpoint by handle, and checkpoints are
overwritten in place (``save_pretrained`` into the same folder after another epoch). Lowering
therefore records, per weights file, a fingerprint; loading recomputes it and refuses a file
that no longer matches, so a module never silently runs on numbers it was not made from.

The fingerprint (scheme ``sampled-sha256``) is a SHA-256 over the file size, the whole header
(every key, dtype, shape, offset and the metadata) and a sample of every tensor's bytes: all
of a tensor up to 64 KiB, else 16 chunks of 4 KiB spread evenly from its first byte to its
last. It reads at most 64 KiB per tensor whatever the model's size, so a 70B checkpoint costs
what a 1B one does. It catches a file cut short or grown, any change of keys, dtypes, shapes or
metadata, and any rewrite that touches the sampled bytes: a re-save after more training, a
re-quantisation, a negated or rescaled tensor. It can miss an edit confined to bytes between
the samples (one element changed in place); the README says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from dataclasses import dataclass

from lorashear.errors import ModelLoadError

SCHEME = "sampled-sha256"
#: What a recorded fingerprint looks like in the text form.
FINGERPRINT_PATTERN = re.compile(rf"{SCHEME}:[0-9a-f]{{64}}")

#: safetensors' own limit on the header's length.
MAX_HEADER_BYTES = 100_000_000
_CHUNK = 4096
_CHUNKS_PER_TENSOR = 16
_WHOLE_TENSOR_BYTES = _CHUNK * _CHUNKS_PER_TENSOR


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: dtype as the file names it (``"BF16"``), shape,
    and the absolute byte range ``[begin, end)`` of its data in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of a safetensors file (no tensor data is read)."""

    path: str
    file_size: int
    raw: bytes
    tensors: dict[str, TensorEntry]


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file ``path``.

    Raises :class:`ModelLoadError` for a missing file and for anything that is not a
    well-formed header whose tensors lie inside the file."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad(path, f"it is {size} bytes long, too short for a header")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise _bad(path, f"its header claims {length} bytes, the file holds {size - 8}")
            raw = prefix + f.read(length)
    except FileNotFoundError:
        raise ModelLoadError(f"weights file {path} does not exist") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read weights file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw[8:].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(path, f"its header is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _bad(path, "its header is not a JSON object")
    start = 8 + length
    tensors: dict[str, TensorEntry] = {}
    for key, info in data.items():
        if key == "__metadata__":
            continue
        tensors[key] = _entry(path, key, info, start, size)
    return SafetensorsHeader(path, size, raw, tensors)


def _entry(path: str, key: str, info, start: int, size: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise _bad(path, f"tensor {key!r} has no description")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise _bad(path, f"tensor {key!r} has no dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                              and d >= 0 for d in shape):
        raise _bad(path, f"tensor {key!r} has a malformed shape")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= size - start):
        raise _bad(path, f"tensor {key!r} lies outside the file (is the file cut short?)")
    return TensorEntry(dtype, tuple(shape), start + offsets[0], start + offsets[1])


def _bad(path: str, why: str) -> ModelLoadError:
    return ModelLoadError(f"weights file {path} is not a valid safetensors file: {why}")


def fingerprint_file(path: str | os.PathLike) -> str:
    """The ``sampled-sha256`` fingerprint of a safetensors file (see the module docstring)."""
    header = read_header(path)
    digest = hashlib.sha256(f"lorashear-fingerprint {SCHEME}\n".encode())
    digest.update(struct.pack("<Q", header.file_size))
    digest.update(header.raw)
    try:
        with open(header.path, "rb") as f:
            for entry in sorted(header.tensors.values(), key=lambda e: (e.begin, e.end)):
                for begin, length in _samples(entry):
                    f.seek(begin)
                    chunk = f.read(length)
                    if len(chunk) != length:
                        raise _bad(header.path, "it ended while being read (is it being written?)")
                    digest.update(chunk)
    except OSError as exc:
        raise ModelLoadError(f"cannot read weights file {header.path}: {exc.strerror or exc}") from None
    return f"{SCHEME}:{digest.hexdigest()}"


def _samples(entry: TensorEntry) -> list[tuple[int, int]]:
    """(offset, length) of the bytes of one tensor that enter the fingerprint."""
    nbytes = entry.end - entry.begin
    if nbytes <= _WHOLE_TENSOR_BYTES:
        return [(entry.begin, nbytes)]
    span = nbytes - _CHUNK
    return [(entry.begin + span * i // (_CHUNKS_PER_TENSOR - 1), _CHUNK)
            for i in range(_CHUNKS_PER_TENSOR)]


_KNOWN: dict[tuple, str] = {}
#: A file modified this recently is fingerprinted afresh on every call: file systems stamp
#: modification times coarsely (jiffies, 1 s on ext3 and HFS+, 2 s on FAT), so a rewrite
#: within the same tick would keep the key of a remembered fingerprint (git's "racy clean"
#: problem). The cost is bounded: once the file is this old, its fingerprint is remembered.
_RACY_NS = 2_000_000_000


def current_fingerprint(path: str | os.PathLike) -> str:
    """:func:`fingerprint_file`, remembered while the file's identity, size and times stay the
    same: reading a tensor checks its file with one ``stat``."""
    path = str(path)
    now = time.time_ns()  # before the stat: the file's age is judged at the moment it was seen
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelLoadError(f"weights file {path} does not exist") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read weights file {path}: {exc.strerror or exc}") from None
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    found = _KNOWN.get(key)
    if found is None:
        found = fingerprint_file(path)
        if now - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
            if len(_KNOWN) > 4096:
                _KNOWN.clear()
            _KNOWN[key] = found
    return found


def ensure_unchanged(path: str, recorded: str) -> None:
    """Raise :class:`ModelLoadError` if ``path`` no longer has the fingerprint ``recorded``."""
    if current_fingerprint(path) != recorded:
        raise ModelLoadError(f"weights file {path} changed after the module was loaded from it "
                             "(its fingerprint differs)",
                             hint="something rewrote the checkpoint during the run; load the "
                             "module again (with --accept-changed-weights if the new weights "
                             "are meant)")
