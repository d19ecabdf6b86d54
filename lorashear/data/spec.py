"""Data specs: which text sources a pass trains on, with what weights.

A spec is a YAML file::

    sources:
      - cached: austen          # a source fetched by `lorashear data fetch`
        weight: 2
      - cached: kjv
        split: heldout          # train (default) or heldout
      - path: ./notes.jsonl     # a local file, relative to this YAML file
        text_field: body
      - path: ./alpaca.json
        format: instruction     # Alpaca records: instruction / input / output
      - hf: tatsu-lab/alpaca    # a Hugging Face dataset (needs internet)
        split: train
        name: alpaca

``data=`` also takes one local data file (``data=./book.txt``) or the name of a cached source
(``data=austen``), so a quick run needs no YAML. Validation fails with one clear
:class:`DataError` per problem: unknown keys, a missing file, a bad weight, and (when loaded)
an empty source or an instruction record without ``instruction``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorashear.data import cache
from lorashear.data._text import split_documents
from lorashear.data.loaders import (
    DATA_SUFFIXES,
    FORMATS,
    TOKEN_ID_SUFFIX,
    InstructionRecord,
    load_documents,
    load_instruction_records,
)
from lorashear.errors import DataError

SPEC_SUFFIXES = frozenset({".yaml", ".yml"})
SPEC_KEYS = frozenset({"sources"})
SOURCE_KEYS = frozenset({"name", "path", "cached", "hf", "weight", "split", "format",
                         "text_field"})
LOCATION_KEYS = ("path", "cached", "hf")


@dataclass(frozen=True)
class SourceSpec:
    """One source of a data spec: where its text is, its sampling weight, how to read it."""

    name: str
    """Label used in logs and per-source statistics; unique within a spec."""
    path: Path | None = None
    """A local data file (plain text, JSON/JSONL, Parquet)."""
    cached: str | None = None
    """A source in the lorashear cache (see ``lorashear data list``)."""
    hf: str | None = None
    """A Hugging Face dataset id."""
    weight: float = 1.0
    """Relative sampling weight (normalised over the spec)."""
    split: str = "train"
    """``train``/``heldout`` for cached sources, the dataset split for hub sources."""
    format: str = "auto"
    """``auto``, ``text`` or ``instruction`` (Alpaca records)."""
    text_field: str = "text"
    """Field holding the text in JSON/Parquet/hub records."""

    def location(self) -> str:
        """Where the text comes from, as a user would write it."""
        if self.path is not None:
            return str(self.path)
        return f"cached:{self.cached}" if self.cached else f"hf:{self.hf}"

    def load_documents(self, cache_dir: str | os.PathLike | None = None) -> list[str]:
        """The source's documents (text, or instruction records rendered as text)."""
        if self.cached is not None:
            # Cached text keeps its documents (books, novels, pages) apart by blank lines.
            path = cache.find_cached(self.cached, cache_dir).split_path(self.split)
            documents = split_documents(path.read_text(encoding="utf-8"))
            if not documents:
                raise DataError(f"cached source {self.cached} ({self.split}) is empty")
            return documents
        if self.hf is not None:
            return load_documents(self.hf, format=self.format, text_field=self.text_field,
                                  split=self.split, hub=True)
        return load_documents(self.path, format=self.format, text_field=self.text_field,
                              hub=False)

    def load_instruction_records(self) -> list[InstructionRecord]:
        """The source's Alpaca records; an error for plain-text and cached sources."""
        if self.cached is not None:
            raise DataError(f"source {self.name} is cached plain text, not instruction records")
        if self.hf is not None:
            return load_instruction_records(self.hf, split=self.split, hub=True)
        return load_instruction_records(self.path, hub=False)


@dataclass(frozen=True)
class DataSpec:
    """A validated data spec: its sources and where it was read from."""

    sources: tuple[SourceSpec, ...]
    origin: str = "<spec>"

    def weights(self) -> dict[str, float]:
        """Sampling weight per source name, normalised to sum to 1."""
        total = sum(source.weight for source in self.sources)
        return {source.name: source.weight / total for source in self.sources}

    def load_documents(self, cache_dir: str | os.PathLike | None = None
                       ) -> dict[str, list[str]]:
        """Documents of every source, by source name (errors name the failing source)."""
        return {source.name: source.load_documents(cache_dir) for source in self.sources}

    def instruction_sources(self) -> tuple[SourceSpec, ...]:
        """The sources declared as instruction records."""
        return tuple(source for source in self.sources if source.format == "instruction")


def load_spec(spec: str | os.PathLike | Mapping[str, Any] | DataSpec, *,
              cache_dir: str | os.PathLike | None = None, check_files: bool = True) -> DataSpec:
    """Read a data spec from a YAML file, a mapping, one data file, or a cached source name.

    With ``check_files`` every local file must exist and every cached source must be in the
    cache now, so a long run fails before it starts rather than when it reaches the data.
    """
    if isinstance(spec, DataSpec):
        return spec
    if isinstance(spec, Mapping):
        return parse_spec(spec, origin="<spec>", base_dir=Path.cwd(), cache_dir=cache_dir,
                          check_files=check_files)
    text = os.fspath(spec)
    path = Path(text).expanduser()
    suffix = path.suffix.lower()
    if suffix in SPEC_SUFFIXES:
        return parse_spec(_read_yaml(path), origin=str(path), base_dir=path.parent,
                          cache_dir=cache_dir, check_files=check_files)
    if suffix in DATA_SUFFIXES or suffix == TOKEN_ID_SUFFIX or path.exists():
        single = {"path": text} if suffix in DATA_SUFFIXES else {"path": text, "format": "text"}
        return parse_spec({"sources": [single]}, origin=text, base_dir=Path.cwd(),
                          cache_dir=cache_dir, check_files=check_files)
    from lorashear.data.sources import SOURCES  # the registry of fetchable sources

    if text in SOURCES:
        return parse_spec({"sources": [{"cached": text}]}, origin=text, base_dir=Path.cwd(),
                          cache_dir=cache_dir, check_files=check_files)
    raise DataError(f"data {text!r} is neither an existing file nor a known text source",
                    hint="give a .yaml data spec, a local .txt/.json/.jsonl/.parquet file, or "
                    f"one of: {', '.join(SOURCES)}; for a hub dataset write a spec with 'hf:'")


def parse_spec(mapping: Mapping[str, Any], *, origin: str = "<spec>",
               base_dir: Path | None = None, cache_dir: str | os.PathLike | None = None,
               check_files: bool = True) -> DataSpec:
    """Validate a parsed spec; relative paths are taken relative to ``base_dir``."""
    if not isinstance(mapping, Mapping):
        raise DataError(f"data spec {origin} must be a mapping with a 'sources' list, not "
                        f"{type(mapping).__name__}")
    unknown = sorted(set(map(str, mapping)) - SPEC_KEYS)
    if unknown:
        raise DataError(f"data spec {origin} has unknown key(s): {', '.join(unknown)}",
                        hint=f"allowed: {', '.join(sorted(SPEC_KEYS))}")
    entries = mapping.get("sources")
    if not isinstance(entries, list) or not entries:
        raise DataError(f"data spec {origin} needs a non-empty 'sources' list")
    base_dir = base_dir or Path.cwd()
    sources = [_parse_source(entry, number, origin, base_dir, cache_dir, check_files)
               for number, entry in enumerate(entries, 1)]
    seen: set[str] = set()
    for source in sources:
        if source.name in seen:
            raise DataError(f"data spec {origin} names two sources {source.name!r}",
                            hint="give each source a distinct 'name'")
        seen.add(source.name)
    return DataSpec(sources=tuple(sources), origin=origin)


def _parse_source(entry: Any, number: int, origin: str, base_dir: Path,
                  cache_dir: str | os.PathLike | None, check_files: bool) -> SourceSpec:
    where = f"source {number} of data spec {origin}"
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, Mapping):
        raise DataError(f"{where} must be a mapping, not {type(entry).__name__}")
    unknown = sorted(set(map(str, entry)) - SOURCE_KEYS)
    if unknown:
        raise DataError(f"{where} has unknown key(s): {', '.join(unknown)}",
                        hint=f"allowed: {', '.join(sorted(SOURCE_KEYS))}")
    locations = [key for key in LOCATION_KEYS if entry.get(key) is not None]
    if len(locations) != 1:
        raise DataError(f"{where} needs exactly one of path, cached, hf (has "
                        f"{', '.join(locations) or 'none'})")
    kind = locations[0]
    value = entry[kind]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{kind}' must be a non-empty string")
    fields: dict[str, Any] = {
        "weight": _weight(entry.get("weight", 1.0), where),
        "split": _string(entry, "split", "train", where),
        "format": _string(entry, "format", "auto", where),
        "text_field": _string(entry, "text_field", "text", where),
    }
    if fields["format"] not in FORMATS:
        raise DataError(f"{where}: unknown format {fields['format']!r}",
                        hint=f"use one of: {', '.join(FORMATS)}")
    if kind == "path":
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if check_files and not path.is_file():
            raise DataError(f"{where}: data file {path} does not exist")
        if fields["split"] != "train":
            raise DataError(f"{where}: 'split' applies to cached and hf sources, not files")
        fields.update(path=path, name=_string(entry, "name", path.stem, where))
    elif kind == "cached":
        if fields["split"] not in cache.SPLIT_FILES:
            raise DataError(f"{where}: cached split must be one of "
                            f"{', '.join(cache.SPLIT_FILES)}, not {fields['split']!r}")
        if fields["format"] == "instruction":
            raise DataError(f"{where}: cached sources are plain text, not instruction records")
        if check_files:
            cache.find_cached(value, cache_dir)
        default_name = value if fields["split"] == "train" else f"{value}-{fields['split']}"
        fields.update(cached=value, name=_string(entry, "name", default_name, where))
    else:
        fields.update(hf=value, name=_string(entry, "name", value, where))
    return SourceSpec(**fields)


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: weight must be a number, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise DataError(f"{where}: weight must be positive and finite, not {value!r}")
    return float(value)


def _string(entry: Mapping[str, Any], key: str, default: str, where: str) -> str:
    value = entry.get(key, default)
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: '{key}' must be a non-empty string, not {value!r}")
    return value


def _read_yaml(path: Path) -> Any:
    import yaml

    if not path.is_file():
        raise DataError(f"data spec {path} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise DataError(f"data spec {where} is not valid YAML: "
                        f"{getattr(exc, 'problem', None) or exc}") from exc
