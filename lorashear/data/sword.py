"""Read SWORD Bible and commentary modules (zText / zCom) into plain text.

A SWORD module keeps each testament (``ot``, ``nt``) in three files. The block index
(``.bzs``/``.czs``: ``b``ook- or ``c``hapter-sized blocks) holds records of three little-endian
uint32 (offset, compressed size, uncompressed size) into the data file (``.bzz``/``.czz``), one
zlib stream per block. The verse index (``.bzv``/``.czv``) holds per verse the block number,
the offset inside the decompressed block and the size (uint16 for zText/zCom, uint32 for the
``4`` drivers). Commentaries link one comment to several verses by repeating the same entry,
so entries are de-duplicated. The text is OSIS or ThML markup, turned into plain text here:
notes dropped, block elements become line breaks, other tags stripped, entities unescaped.
"""

from __future__ import annotations

import html
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lorashear.data._text import clean_document
from lorashear.errors import DataError

#: Elements whose whole content is dropped (footnotes, cross-reference notes, variant readings).
SKIPPED_ELEMENTS = frozenset({"note", "rdg", "script", "style"})

#: Elements that start or end a paragraph, line or heading (OSIS and ThML).
BLOCK_ELEMENTS = frozenset({
    "div", "p", "title", "l", "lg", "lb", "br", "chapter", "item", "list", "row", "table",
    "head", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "div1", "div2", "div3", "div4",
    "div5", "div6", "verse", "speech", "closer", "salute", "signed", "figure",
})

#: Elements rendered as a word gap (table cells).
SPACED_ELEMENTS = frozenset({"cell", "td", "th"})

_TAG = re.compile(r"<!--.*?-->|<(/?)([A-Za-z][\w:.-]*)((?:[^>\"']|\"[^\"]*\"|'[^']*')*?)(/?)>",
                  re.S)
_MILESTONE_TYPE = re.compile(r"\btype\s*=\s*[\"'](x-p|line|x-line)[\"']")
#: Markup that some modules carry escaped as text: HTML tags, USFM character markers (``\nd``).
_LEFTOVER_TAG = re.compile(r"</?[A-Za-z][\w-]*(?:\s[^<>\n]*)?/?>")
_USFM_MARKER = re.compile(r"\\\+?[a-z]{1,4}\d?\*? ?")
_VERSE_REFERENCE_HASH = re.compile(r"#(?=\(\d)")


@dataclass(frozen=True)
class SwordModule:
    """Where a SWORD module's files are and how to read them (from its ``mods.d`` conf)."""

    name: str
    """The module name, the section header of its conf file (``KJV``, ``TDavid``)."""
    data_dir: Path
    """Folder holding ``ot.?zs``/``ot.?zz``/``ot.?zv`` and the ``nt`` counterparts."""
    driver: str = "zText"
    """``ModDrv``: zText, zText4, zCom or zCom4; the ``4`` ones have 32-bit verse sizes."""
    source_type: str = "OSIS"
    """``SourceType``: OSIS or ThML (both handled by :func:`markup_to_text`)."""


def markup_to_text(markup: str) -> str:
    """Turn OSIS/ThML markup into plain text in the cache layout (one paragraph a line).

    Notes and other apparatus are dropped with their content because they interrupt the
    running text; block elements become line breaks so paragraphs and poetry lines survive.
    """
    pieces: list[str] = []
    skip_depth = 0
    position = 0
    for match in _TAG.finditer(markup):
        if skip_depth == 0 and match.start() > position:
            pieces.append(html.unescape(markup[position:match.start()]))
        position = match.end()
        name = (match.group(2) or "").lower()
        if not name:
            continue  # a comment
        closing, self_closing = bool(match.group(1)), bool(match.group(4))
        if name in SKIPPED_ELEMENTS:
            if closing:
                skip_depth = max(0, skip_depth - 1)
            elif not self_closing:
                skip_depth += 1
            continue
        if skip_depth:
            continue
        if name in BLOCK_ELEMENTS:
            pieces.append("\n")
        elif name in SPACED_ELEMENTS:
            pieces.append(" ")
        elif name == "milestone" and _MILESTONE_TYPE.search(match.group(3) or ""):
            pieces.append("\n")
    if skip_depth == 0 and position < len(markup):
        pieces.append(html.unescape(markup[position:]))
    text = _LEFTOVER_TAG.sub(" ", "".join(pieces))
    text = _USFM_MARKER.sub("", text)
    text = _VERSE_REFERENCE_HASH.sub("", text)
    # A pilcrow marks where a new paragraph starts (the KJV keeps them as text).
    return clean_document(text.replace("\u00b6", "\n"))


def find_sword_modules(root: str | Path) -> list[SwordModule]:
    """Find the SWORD modules under ``root`` (an extracted package tree or a SWORD folder).

    Modules are described by ``mods.d/*.conf``; their ``DataPath`` is relative to the folder
    holding ``mods.d``. Encrypted modules and compressions other than zlib are refused.
    """
    root = Path(root)
    modules = []
    for conf in sorted(root.rglob("mods.d/*.conf")):
        fields = _read_conf(conf)
        if "DataPath" not in fields:
            continue
        name = fields.get("", conf.stem)
        if fields.get("CipherKey"):
            raise DataError(f"SWORD module {name} is encrypted ({conf})",
                            hint="only unlocked public-domain modules can be read")
        compression = fields.get("CompressType", "ZIP").upper()
        if compression != "ZIP":
            raise DataError(f"SWORD module {name} uses {compression} compression ({conf})",
                            hint="only zlib (CompressType=ZIP) modules are supported")
        data_dir = (conf.parent.parent / fields["DataPath"]).resolve()
        modules.append(SwordModule(name=name, data_dir=data_dir,
                                   driver=fields.get("ModDrv", "zText"),
                                   source_type=fields.get("SourceType", "OSIS")))
    if not modules:
        raise DataError(f"no SWORD module (mods.d/*.conf) found under {root}")
    return modules


def _read_conf(conf: Path) -> dict[str, str]:
    """Parse a SWORD ``.conf`` file: ``[Name]`` then ``Key=Value`` lines (first value wins)."""
    fields: dict[str, str] = {}
    for line in conf.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]") and "" not in fields:
            fields[""] = line[1:-1]
        elif "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            fields.setdefault(key.strip(), value.strip())
    return fields


def read_sword_documents(module: SwordModule, *, progress: bool = False) -> list[str]:
    """Return the module's plain text, one document per block (a book, or a chapter).

    Blocks that hold no text (the importer's header, empty testaments) are left out.
    """
    blocks = list(_iter_block_markup(module))
    documents = []
    for markup in tqdm(blocks, desc=f"sword {module.name}", unit="block", disable=not progress,
                       leave=False):
        text = markup_to_text(markup)
        if text:
            documents.append(text)
    return documents


def _iter_block_markup(module: SwordModule) -> Iterator[str]:
    """Yield each block's markup, verses joined by a space, in canonical order (OT, NT)."""
    found = False
    for testament in ("ot", "nt"):
        for block_index in sorted(module.data_dir.glob(f"{testament}.[bcv]zs")):
            found = True
            data_file = block_index.with_suffix(block_index.suffix[:-1] + "z")
            verse_index = block_index.with_suffix(block_index.suffix[:-1] + "v")
            blocks = _read_blocks(block_index, data_file)
            yield from _verses_by_block(blocks, verse_index, module.driver)
    if not found:
        raise DataError(f"SWORD module {module.name} has no block index in {module.data_dir}")


def _read_blocks(index_file: Path, data_file: Path) -> list[bytes]:
    """Decompress every block listed in ``index_file``; a size-0 record gives an empty block."""
    index = index_file.read_bytes()
    if len(index) % 12:
        raise DataError(f"SWORD block index {index_file} is not a list of 12-byte records")
    data = data_file.read_bytes() if data_file.exists() else b""
    blocks = []
    for offset, compressed_size, size in struct.iter_unpack("<III", index):
        if compressed_size == 0 or size == 0:
            blocks.append(b"")
            continue
        if offset + compressed_size > len(data):
            raise DataError(f"SWORD block at offset {offset} runs past the end of {data_file}")
        try:
            blocks.append(zlib.decompressobj().decompress(data[offset:offset + compressed_size]))
        except zlib.error as exc:
            raise DataError(f"SWORD block at offset {offset} of {data_file} is not zlib data: "
                            f"{exc}") from exc
    return blocks


def _verses_by_block(blocks: list[bytes], verse_index: Path, driver: str) -> Iterator[str]:
    """Yield one markup string per block, verses separated so words never run together.

    Without a usable verse index the decompressed block is yielded whole.
    """
    entries = _read_verse_index(verse_index, blocks, driver)
    if entries is None:
        for block in blocks:
            yield block.decode("utf-8", errors="replace")
        return
    verses: list[list[str]] = [[] for _ in blocks]
    seen: set[tuple[int, int, int]] = set()
    for entry in entries:
        block_number, start, size = entry
        if size == 0 or entry in seen:
            continue  # no text for this verse, or a commentary entry linked to an earlier one
        seen.add(entry)
        raw = blocks[block_number][start:start + size]
        verses[block_number].append(raw.decode("utf-8", errors="replace"))
    for block_verses in verses:
        yield " ".join(block_verses)


def _read_verse_index(path: Path, blocks: list[bytes], driver: str
                      ) -> list[tuple[int, int, int]] | None:
    """Read the verse index, choosing its record size (10 or 12 bytes) by what fits the blocks.

    Some modules declare a ``4`` driver yet store 16-bit sizes, so the conf is only the first
    guess: a layout is accepted when every non-empty entry lies inside its block.
    """
    if not path.exists():
        return None
    raw = path.read_bytes()
    layouts = [(12, "<III"), (10, "<IIH")]
    if not driver.endswith("4"):
        layouts.reverse()
    for record_size, layout in layouts:
        if len(raw) % record_size:
            continue
        entries = list(struct.iter_unpack(layout, raw))
        if all(size == 0 or (block < len(blocks) and start + size <= len(blocks[block]))
               for block, start, size in entries):
            return entries
    return None
