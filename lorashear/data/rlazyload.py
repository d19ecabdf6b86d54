"""Read R lazy-load databases (``.rdx`` index + ``.rdb`` records) without R.

R packages ship their data sets as a lazy-load database. The ``.rdx`` file is a serialised R
list (gzip-compressed) whose ``variables`` element maps each object name to an (offset,
length) pair into the ``.rdb`` file. Each ``.rdb`` record starts with the uncompressed length
as a 4-byte big-endian integer, followed either directly by a zlib stream or by a type byte
(``Z`` zlib, ``2`` bzip2, ``X`` xz, ``0`` stored) and the payload. Payloads are R
serialisations (XDR format), which the ``rdata`` package parses.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import warnings
import zlib
from pathlib import Path
from typing import Any

from lorashear.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"


def parse_r_serialization(payload: bytes, *, source: str = "<bytes>") -> Any:
    """Turn one R serialisation (``X\\n`` XDR stream) into Python objects via ``rdata``.

    Character vectors become numpy string arrays, lists become dicts (when named) or lists.
    """
    try:
        import rdata
    except ImportError as exc:  # pragma: no cover - rdata is a declared dependency
        raise DataError("reading R data needs the 'rdata' package",
                        hint="pip install rdata") from exc
    try:
        with warnings.catch_warnings():
            # rdata warns that a bare serialisation has no RDS/RDA header; that is expected.
            warnings.simplefilter("ignore")
            parsed = rdata.parser.parse_data(payload)
            return rdata.conversion.convert(parsed)
    except Exception as exc:  # noqa: BLE001 - rdata raises many types on malformed input
        raise DataError(f"cannot parse the R serialisation in {source}: {exc}") from exc


def read_lazyload_index(rdx_path: str | Path) -> dict[str, tuple[int, int]]:
    """Read an ``.rdx`` index: object name -> (offset, length) of its record in the ``.rdb``."""
    rdx_path = Path(rdx_path)
    raw = _read(rdx_path)
    if raw.startswith(_GZIP_MAGIC):
        raw = gzip.decompress(raw)
    elif not raw.startswith(b"X\n"):
        try:
            raw = zlib.decompress(raw)
        except zlib.error as exc:
            raise DataError(f"{rdx_path} is not a gzip/zlib R serialisation") from exc
    index = parse_r_serialization(raw, source=str(rdx_path))
    variables = index.get("variables") if isinstance(index, dict) else None
    if not isinstance(variables, dict):
        raise DataError(f"{rdx_path} has no 'variables' table; is it a lazy-load index?")
    table = {}
    for name, position in variables.items():
        offset, length = (int(value) for value in list(position)[:2])
        table[str(name)] = (offset, length)
    return table


def decompress_lazyload_record(record: bytes, *, source: str = "<record>") -> bytes:
    """Undo the compression of one ``.rdb`` record and check its announced length."""
    if len(record) < 5:
        raise DataError(f"R lazy-load record in {source} is truncated ({len(record)} bytes)")
    expected = int.from_bytes(record[:4], "big")
    kind, body = record[4:5], record[5:]
    try:
        if kind == b"Z":
            payload = zlib.decompress(body)
        elif kind == b"2":
            payload = bz2.decompress(body)
        elif kind == b"X":
            payload = lzma.decompress(body)
        elif kind == b"0":
            payload = body
        else:
            payload = zlib.decompress(record[4:])
    except (zlib.error, OSError, lzma.LZMAError, ValueError) as exc:
        raise DataError(f"R lazy-load record in {source} does not decompress: {exc}") from exc
    if len(payload) != expected:
        raise DataError(f"R lazy-load record in {source} holds {len(payload)} bytes, its header "
                        f"says {expected}")
    return payload


def read_lazyload_database(base: str | Path, names: list[str] | None = None) -> dict[str, Any]:
    """Read objects from the lazy-load database ``base`` (path without ``.rdx``/``.rdb``).

    ``names`` limits which objects are read (all by default); asking for an object the index
    lacks is an error naming the ones it has.
    """
    base = Path(base)
    rdx_path, rdb_path = base.with_suffix(".rdx"), base.with_suffix(".rdb")
    index = read_lazyload_index(rdx_path)
    wanted = list(index) if names is None else names
    missing = [name for name in wanted if name not in index]
    if missing:
        raise DataError(f"{rdx_path} has no object(s) {', '.join(missing)}",
                        hint=f"it has: {', '.join(sorted(index))}")
    database = _read(rdb_path)
    objects = {}
    for name in wanted:
        offset, length = index[name]
        record = database[offset:offset + length]
        if len(record) != length:
            raise DataError(f"object {name} runs past the end of {rdb_path}")
        payload = decompress_lazyload_record(record, source=f"{rdb_path}:{name}")
        objects[name] = parse_r_serialization(payload, source=f"{rdb_path}:{name}")
    return objects


def as_string_list(value: Any, *, name: str = "object") -> list[str]:
    """Return an R character vector as a list of str, missing values (NA) as empty strings."""
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise DataError(f"R {name} is not a character vector but {type(value).__name__}")
    strings = []
    for item in value:
        if item is None or (isinstance(item, float) and item != item):
            strings.append("")
        elif isinstance(item, (str, bytes)):
            strings.append(item.decode("utf-8", "replace") if isinstance(item, bytes) else item)
        else:
            raise DataError(f"R {name} is not a character vector (holds {type(item).__name__})")
    return [str(item) for item in strings]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"R lazy-load file {path} does not exist") from exc
