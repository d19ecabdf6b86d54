"""Plain-text conventions shared by every extractor, and the fixed held-out slice.

Every cached text follows one layout so that loaders and evaluation can rely on it: one
paragraph per line, no blank lines inside a document, and one blank line between documents
(a book of the Bible, a novel, a documentation page). Markup never survives extraction.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_HORIZONTAL_SPACE = re.compile(r"[ \t\u00a0\u2000-\u200b\u202f\u3000]+")
#: Control characters (C0 except tab/newline, C1) and byte-order marks: mojibake, never text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")

#: Share of a source held out for evaluation when the source has no natural held-out part.
HELDOUT_FRACTION = 0.05


def collapse_spaces(text: str) -> str:
    """Collapse runs of horizontal white space to one space and strip both ends."""
    return _HORIZONTAL_SPACE.sub(" ", text).strip()


def clean_lines(text: str, *, keep_spacing: bool = False) -> list[str]:
    """Split ``text`` into lines, dropping empty lines and control characters.

    Lines are stripped and their runs of spaces collapsed, unless ``keep_spacing`` is set
    (code blocks, whose indentation and alignment matter): then they are only right-stripped.
    """
    lines = []
    for raw in _CONTROL.sub("", text).splitlines():
        line = raw.rstrip() if keep_spacing else collapse_spaces(raw)
        if line.strip():
            lines.append(line)
    return lines


def clean_document(text: str, *, keep_spacing: bool = False) -> str:
    """Normalise one document to the cache layout: one paragraph per non-empty line."""
    return "\n".join(clean_lines(text, keep_spacing=keep_spacing))


def join_documents(documents: Iterable[str]) -> str:
    """Join documents with one blank line between them and a final newline (empty if none)."""
    kept = [doc for doc in documents if doc]
    return "\n\n".join(kept) + "\n" if kept else ""


def split_documents(text: str) -> list[str]:
    """Undo :func:`join_documents`: the documents of a text in the cache layout."""
    return [document.strip("\n") for document in text.split("\n\n") if document.strip()]


def split_tail(documents: Sequence[str], fraction: float = HELDOUT_FRACTION
               ) -> tuple[list[str], list[str]]:
    """Split ``documents`` into (train, heldout) where heldout is a fixed tail of about ``fraction``.

    Whole trailing documents are held out while that keeps the slice within twice the target
    size; a document too large for that is cut at a line boundary instead. The result depends
    only on the input, so every run holds out exactly the same text, and train is never empty
    unless the input is.
    """
    docs = [doc for doc in documents if doc]
    total = sum(len(doc) for doc in docs)
    if not docs or total == 0:
        return [], []
    target = max(1, int(total * fraction))
    heldout: list[str] = []
    held_chars = 0
    index = len(docs) - 1
    while index > 0 and held_chars < target and held_chars + len(docs[index]) <= 2 * target:
        heldout.insert(0, docs[index])
        held_chars += len(docs[index])
        index -= 1
    train = docs[: index + 1]
    if held_chars < target:
        # The next document is too large to hold out whole: move its last lines instead.
        head, tail = _split_lines_tail(train[-1], target - held_chars)
        if tail:
            train = train[:-1] + ([head] if head else [])
            heldout.insert(0, tail)
    return train, heldout


def _split_lines_tail(document: str, wanted_chars: int) -> tuple[str, str]:
    """Cut ``document`` at the line boundary whose tail is closest to ``wanted_chars`` (head kept)."""
    lines = document.split("\n")
    tail_chars = 0
    cut = len(lines)
    while cut > 1 and tail_chars < wanted_chars:
        cut -= 1
        tail_chars += len(lines[cut]) + 1
    return "\n".join(lines[:cut]), "\n".join(lines[cut:])
