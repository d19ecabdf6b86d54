"""Builders for the data tests: tiny SWORD modules, R lazy-load databases and a tokenizer.

The binary formats are written here from their descriptions (not with the readers under
test), so a reader that misunderstands a format fails these tests.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest

# --------------------------------------------------------------------------- SWORD modules


def write_sword_module(root: Path, name: str, testaments: dict[str, Sequence[Sequence[str]]], *,
                       driver: str = "zText", entry_size: int = 10, block_letter: str = "b",
                       link_repeats: bool = False, conf_extra: str = "") -> Path:
    """Write a zText/zCom module under ``root/usr/share/sword`` and return that folder.

    ``testaments`` maps ``ot``/``nt`` to books, each a list of verse markups. Block 0 holds an
    importer milestone, like osis2mod writes. Before each book an empty (0, 0, 0) verse entry
    stands for the book heading slot. ``link_repeats`` repeats every verse entry, the way
    commentaries link one comment to several verses.
    """
    sword = root / "usr" / "share" / "sword"
    kind = "comments/zcom" if driver.startswith("zCom") else "texts/ztext"
    data_dir = sword / "modules" / kind / name.lower()
    data_dir.mkdir(parents=True, exist_ok=True)
    (sword / "mods.d").mkdir(parents=True, exist_ok=True)
    (sword / "mods.d" / f"{name.lower()}.conf").write_text(
        f"[{name}]\nDataPath=./modules/{kind}/{name.lower()}/\nModDrv={driver}\n"
        f"SourceType=OSIS\nCompressType=ZIP\nBlockType=BOOK\nEncoding=UTF-8\n{conf_extra}",
        encoding="utf-8")
    entry_layout = "<IIH" if entry_size == 10 else "<III"
    for testament, books in testaments.items():
        header = b'<milestone type="x-importer" subType="x-osis2mod" n="$Rev: 1 $"/>'
        blocks = [header] + [b"" for _ in books]
        entries = [(0, 0, 0), (0, 0, len(header))]
        for number, verses in enumerate(books, 1):
            entries.append((0, 0, 0))
            data = b""
            for verse in verses:
                raw = verse.encode("utf-8")
                entry = (number, len(data), len(raw))
                entries.extend([entry, entry] if link_repeats else [entry])
                data += raw
            blocks[number] = data
        index, stream = b"", b""
        for block in blocks:
            compressed = zlib.compress(block) if block else b""
            index += struct.pack("<III", len(stream), len(compressed), len(block))
            stream += compressed
        stem = data_dir / testament
        (stem.with_suffix(f".{block_letter}zs")).write_bytes(index)
        (stem.with_suffix(f".{block_letter}zz")).write_bytes(stream)
        (stem.with_suffix(f".{block_letter}zv")).write_bytes(
            b"".join(struct.pack(entry_layout, *entry) for entry in entries))
    return sword


# --------------------------------------------------------------- R serialisation (XDR, v3)

_STRSXP, _VECSXP, _INTSXP, _LGLSXP, _CHARSXP, _SYMSXP, _LISTSXP = 16, 19, 13, 10, 9, 1, 2
_NILVALUE, _REFSXP = 254, 255
_HAS_ATTRIBUTES, _HAS_TAG, _UTF8 = 1 << 9, 1 << 10, 1 << 3


class RWriter:
    """Writes R objects in R's XDR serialisation format, version 3."""

    def __init__(self) -> None:
        self.out = bytearray(b"X\n")
        self.symbols: list[str] = []
        self._int(3)
        self._int(0x040201)  # written by R 4.2.1
        self._int(0x030500)  # readable from R 3.5.0
        self._int(5)
        self.out += b"UTF-8"

    def _int(self, value: int) -> None:
        self.out += struct.pack(">i", value)

    def _charsxp(self, text: str | None) -> None:
        if text is None:
            self._int(_CHARSXP)
            self._int(-1)  # NA_STRING
            return
        raw = text.encode("utf-8")
        self._int(_CHARSXP | (_UTF8 << 12))
        self._int(len(raw))
        self.out += raw

    def _symbol(self, name: str) -> None:
        if name in self.symbols:
            self._int(_REFSXP | ((self.symbols.index(name) + 1) << 8))
            return
        self.symbols.append(name)
        self._int(_SYMSXP)
        self._charsxp(name)

    def value(self, obj) -> RWriter:
        """Write a str list (character vector), int tuple, bool, or dict (named list)."""
        if isinstance(obj, bool):
            self._int(_LGLSXP)
            self._int(1)
            self._int(int(obj))
        elif isinstance(obj, tuple):
            self._int(_INTSXP)
            self._int(len(obj))
            for item in obj:
                self._int(item)
        elif isinstance(obj, list):
            self._int(_STRSXP)
            self._int(len(obj))
            for item in obj:
                self._charsxp(item)
        elif isinstance(obj, dict):
            self._int(_VECSXP | (_HAS_ATTRIBUTES if obj else 0))
            self._int(len(obj))
            for item in obj.values():
                self.value(item)
            if obj:
                self._int(_LISTSXP | _HAS_TAG)
                self._symbol("names")
                self.value(list(obj))
                self._int(_NILVALUE)
        else:
            raise TypeError(type(obj))
        return self

    def bytes(self) -> bytes:
        return bytes(self.out)


def r_serialize(obj) -> bytes:
    """One object in R's XDR serialisation."""
    return RWriter().value(obj).bytes()


def lazyload_record(payload: bytes, compression: str) -> bytes:
    """An ``.rdb`` record: big-endian length, then the payload compressed as R does."""
    header = struct.pack(">I", len(payload))
    if compression == "zlib":
        return header + zlib.compress(payload)
    if compression == "Z":
        return header + b"Z" + zlib.compress(payload)
    if compression == "2":
        return header + b"2" + bz2.compress(payload)
    if compression == "X":
        return header + b"X" + lzma.compress(payload)
    if compression == "0":
        return header + b"0" + payload
    raise ValueError(compression)


def write_lazyload_database(base: Path, objects: dict[str, list[str]],
                            compressions: Sequence[str] = ("zlib",)) -> None:
    """Write ``base.rdb`` and ``base.rdx`` holding ``objects`` (character vectors)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    rdb = bytearray()
    variables = {}
    for number, (name, value) in enumerate(objects.items()):
        record = lazyload_record(r_serialize(value), compressions[number % len(compressions)])
        variables[name] = (len(rdb), len(record))
        rdb += record
    base.with_suffix(".rdb").write_bytes(bytes(rdb))
    index = {"variables": variables, "references": {}, "compressed": True}
    base.with_suffix(".rdx").write_bytes(gzip.compress(r_serialize(index)))


AUSTEN_OBJECTS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma",
                  "northangerabbey", "persuasion")


def write_janeaustenr(root: Path, compressions: Sequence[str] = ("zlib",)) -> Path:
    """A janeaustenr package tree whose six novels are three tiny paragraphs each."""
    novels = {}
    for name in AUSTEN_OBJECTS:
        novels[name] = [name.upper(), "", "By Jane Austen", "", "", "Chapter 1", "",
                        f"It is a truth that {name} was", "wrapped over _two_ lines.", "",
                        f"The end of {name}.", None]
    base = root / "usr/lib/R/site-library/janeaustenr/data/Rdata"
    write_lazyload_database(base, novels, compressions)
    return root


# ------------------------------------------------------------------------------ tokenizer

TOKENIZER_SENTENCES = [
    "in the beginning god created the heaven and the earth",
    "it is a truth universally acknowledged that a single man",
    "the kernel documentation describes the driver model",
    "write a response that completes the request below",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level fast tokenizer trained in code on a few sentences, with EOS and padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"])
    tokenizer.train_from_iterator(TOKENIZER_SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture
def make_sword_module():
    """The :func:`write_sword_module` builder."""
    return write_sword_module


@pytest.fixture
def make_lazyload_database():
    """The :func:`write_lazyload_database` builder."""
    return write_lazyload_database


@pytest.fixture
def make_janeaustenr():
    """The :func:`write_janeaustenr` builder."""
    return write_janeaustenr


@pytest.fixture
def r_serializer():
    """The :func:`r_serialize` writer."""
    return r_serialize


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Point $LORASHEAR_CACHE at an empty folder so no test reads or writes the user's cache."""
    monkeypatch.setenv("LORASHEAR_CACHE", str(tmp_path_factory.mktemp("lorashear-cache")))
