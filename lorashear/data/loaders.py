"""Load training text from a local file or a Hugging Face dataset.

Local files: plain text (``.txt``; the whole file is one document), JSON (a list of records,
or of strings), JSON Lines, and Parquet. A record carries its text in a field (``text`` by
default) or is an Alpaca-style instruction record (``instruction``, optional ``input``,
``output``). Hub datasets go through the ``datasets`` library, which needs internet unless
they are already in its cache; tests and the offline demo use local files only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorashear.errors import DataError, first_line

TEXT_SUFFIXES = frozenset({".txt", ".text", ".md"})
JSON_SUFFIXES = frozenset({".json", ".jsonl", ".ndjson"})
PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})
DATA_SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES
#: A file of whitespace-separated token ids, which the passes read without a tokenizer.
TOKEN_ID_SUFFIX = ".ids"

#: ``auto`` picks ``instruction`` when records have an ``instruction`` field, else ``text``.
FORMATS = ("auto", "text", "instruction")

ALPACA_PREAMBLE = ("Below is an instruction that describes a task{context}. Write a response "
                   "that appropriately completes the request.\n\n")


@dataclass(frozen=True)
class InstructionRecord:
    """One instruction-tuning example in the Alpaca layout."""

    instruction: str
    input: str = ""
    output: str = ""

    def alpaca_prompt(self) -> str:
        """The prompt in the Alpaca template, ending where the response begins."""
        if self.input:
            return (ALPACA_PREAMBLE.format(context=", paired with an input that provides "
                                           "further context")
                    + f"### Instruction:\n{self.instruction}\n\n### Input:\n{self.input}\n\n"
                    "### Response:\n")
        return (ALPACA_PREAMBLE.format(context="")
                + f"### Instruction:\n{self.instruction}\n\n### Response:\n")

    def user_message(self) -> str:
        """Instruction and input as one user turn, for tokenizers with a chat template."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction

    def as_text(self) -> str:
        """Prompt and response as one training document."""
        return self.alpaca_prompt() + self.output


def is_hub_name(name: str) -> bool:
    """Whether ``name`` reads as a hub dataset id (``owner/name`` or ``name``), not a file path."""
    if not name or os.path.exists(name) or Path(name).suffix.lower() in DATA_SUFFIXES:
        return False
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and "\\" not in name


def read_local_records(path: str | os.PathLike) -> list[Any]:
    """Read the records of a JSON, JSON Lines or Parquet file (dicts, or strings for JSON)."""
    path = _existing_file(path)
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        try:
            import pyarrow.parquet as parquet
        except ImportError as exc:  # pragma: no cover - pyarrow comes with datasets
            raise DataError("reading Parquet needs pyarrow", hint="pip install pyarrow") from exc
        try:
            return parquet.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
            raise DataError(f"{path} is not a readable Parquet file: {exc}") from exc
    if suffix not in JSON_SUFFIXES:
        raise DataError(f"{path} is not a JSON, JSON Lines or Parquet file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if suffix == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None  # many ".json" files are JSON Lines; try that below
        else:
            if isinstance(value, dict):
                value = value.get("data", value.get("records", [value]))
            if not isinstance(value, list):
                raise DataError(f"{path} holds a JSON {type(value).__name__}, not a list of "
                                "records")
            return value
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON: {exc.msg}") from exc
    return records


def records_to_documents(records: Sequence[Any], *, origin: str, format: str = "auto",
                         text_field: str = "text") -> list[str]:
    """Turn records into documents: the text field, or rendered instruction records."""
    if _resolve_format(records, format, origin) == "instruction":
        return [record.as_text() for record in records_to_instructions(records, origin=origin)]
    documents = []
    for number, record in enumerate(records, 1):
        if isinstance(record, str):
            documents.append(record)
            continue
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(f"record {number} of {origin} has no {text_field!r} field",
                            hint="set text_field to the field holding the text, or format: "
                            "instruction for Alpaca records")
        value = record[text_field]
        if value is not None and not isinstance(value, str):
            raise DataError(f"record {number} of {origin}: field {text_field!r} is "
                            f"{type(value).__name__}, not text")
        documents.append(value or "")
    return _non_empty(documents, origin)


def records_to_instructions(records: Sequence[Any], *, origin: str) -> list[InstructionRecord]:
    """Validate Alpaca records (``instruction`` required, ``input``/``output`` optional)."""
    converted = []
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or "instruction" not in record:
            raise DataError(f"record {number} of {origin} has no 'instruction' field, which an "
                            "instruction-format source needs",
                            hint="use format: text (and text_field) for plain text records")
        fields = {}
        for key in ("instruction", "input", "output"):
            value = record.get(key) or ""
            if not isinstance(value, str):
                raise DataError(f"record {number} of {origin}: field {key!r} is "
                                f"{type(value).__name__}, not text")
            fields[key] = value
        if not fields["instruction"].strip():
            raise DataError(f"record {number} of {origin} has an empty 'instruction'")
        converted.append(InstructionRecord(**fields))
    if not converted:
        raise DataError(f"source {origin} is empty: it has no records")
    return converted


def load_documents(location: str | os.PathLike, *, format: str = "auto",
                   text_field: str = "text", split: str = "train",
                   hub: bool | None = None) -> list[str]:
    """Load the documents of a local file or (``hub=True`` or a hub-like name) a hub dataset.

    Raises :class:`DataError` for a missing file, an empty source, records lacking the text
    field, or instruction records lacking ``instruction``.
    """
    _check_format(format)
    name = os.fspath(location)
    if hub or (hub is None and is_hub_name(name)):
        return records_to_documents(load_hub_records(name, split=split), origin=name,
                                    format=format, text_field=text_field)
    path = _existing_file(name)
    if path.suffix.lower() in JSON_SUFFIXES | PARQUET_SUFFIXES:
        return records_to_documents(read_local_records(path), origin=str(path), format=format,
                                    text_field=text_field)
    if format == "instruction":
        raise DataError(f"{path} is plain text, but its source has format: instruction",
                        hint="instruction records come from JSON, JSON Lines or Parquet")
    if format == "auto" and path.suffix.lower() not in TEXT_SUFFIXES:
        raise DataError(f"cannot tell the format of {path} from its suffix",
                        hint="name it .txt/.json/.jsonl/.parquet, or set format: text in a "
                        "data spec")
    return _non_empty([path.read_text(encoding="utf-8", errors="replace")], str(path))


def load_instruction_records(location: str | os.PathLike, *, split: str = "train",
                             hub: bool | None = None) -> list[InstructionRecord]:
    """Load Alpaca instruction records from a local JSON/JSONL/Parquet file or a hub dataset."""
    name = os.fspath(location)
    if hub or (hub is None and is_hub_name(name)):
        return records_to_instructions(load_hub_records(name, split=split), origin=name)
    return records_to_instructions(read_local_records(name), origin=name)


def load_hub_records(name: str, *, split: str = "train") -> list[dict[str, Any]]:
    """Load a Hugging Face dataset split as a list of dict records (needs internet or cache)."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a declared dependency
        raise DataError("loading hub datasets needs the 'datasets' package",
                        hint="pip install datasets") from exc
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - hub/network/format errors come in many types
        first = first_line(exc)
        raise DataError(f"cannot load the hub dataset {name!r} (split {split!r}): {first}",
                        hint="hub datasets need internet (or the datasets cache); offline, use "
                        "a local file") from exc
    return [dict(row) for row in dataset]


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise DataError(f"unknown data format {format!r}", hint=f"use one of: {', '.join(FORMATS)}")


def _resolve_format(records: Sequence[Any], format: str, origin: str) -> str:
    _check_format(format)
    if not records:
        raise DataError(f"source {origin} is empty: it has no records")
    if format != "auto":
        return format
    first = records[0]
    return "instruction" if isinstance(first, dict) and "instruction" in first else "text"


def _existing_file(path: str | os.PathLike) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DataError(f"data file {resolved} does not exist")
    if not resolved.is_file():
        raise DataError(f"data path {resolved} is not a file")
    return resolved


def _non_empty(documents: Iterable[str], origin: str) -> list[str]:
    kept = [doc for doc in documents if doc and doc.strip()]
    if not kept:
        raise DataError(f"source {origin} is empty: it holds no text")
    return kept
