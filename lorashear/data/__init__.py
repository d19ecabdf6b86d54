"""Offline text data for lorashear: fetch and cache text sources, load data specs, pack blocks.

The public names are re-exported here lazily, so that ``lorashear data list`` does not pay for
importing torch or datasets.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SOURCES": "lorashear.data.sources",
    "TextSource": "lorashear.data.sources",
    "FetchOutcome": "lorashear.data.sources",
    "fetch_sources": "lorashear.data.sources",
    "CachedSource": "lorashear.data.cache",
    "list_cached": "lorashear.data.cache",
    "find_cached": "lorashear.data.cache",
    "resolve_cache_dir": "lorashear.data.cache",
    "DataSpec": "lorashear.data.spec",
    "SourceSpec": "lorashear.data.spec",
    "load_spec": "lorashear.data.spec",
    "InstructionRecord": "lorashear.data.loaders",
    "load_documents": "lorashear.data.loaders",
    "load_instruction_records": "lorashear.data.loaders",
    "pack_blocks": "lorashear.data.blocks",
    "encode_instructions": "lorashear.data.blocks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lorashear.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
