"""The lorashear cache folder and the per-source text layout inside it.

Layout (``<cache>`` is ``$LORASHEAR_CACHE`` or ``~/.cache/lorashear`` unless given)::

    <cache>/debs/<package>_<version>_all.deb       downloaded packages (kept for re-extraction)
    <cache>/text/<source>/train.txt                 training text
    <cache>/text/<source>/heldout.txt               the fixed evaluation slice, never trained on
    <cache>/text/<source>/manifest.json             sizes, sha256, provenance; written last

A source folder is written whole into a temporary sibling and renamed into place, so a folder
with a manifest is always complete, and a killed fetch leaves at worst a stray temporary.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorashear.errors import DataError

#: Environment variable naming the cache folder.
CACHE_ENV = "LORASHEAR_CACHE"
#: Files of a cached source; train and heldout text, in the layout of :mod:`lorashear.data._text`.
SPLIT_FILES = {"train": "train.txt", "heldout": "heldout.txt"}
MANIFEST = "manifest.json"


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$LORASHEAR_CACHE``, else ``~/.cache/lorashear``."""
    if cache_dir is not None and str(cache_dir):
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "lorashear"


def text_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding one sub-folder per cached text source."""
    return resolve_cache_dir(cache_dir) / "text"


def debs_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding downloaded ``.deb`` files."""
    return resolve_cache_dir(cache_dir) / "debs"


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large files need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class CachedSource:
    """A text source found complete in the cache, as its manifest describes it."""

    name: str
    folder: Path
    manifest: dict[str, Any]

    def split_path(self, split: str) -> Path:
        """Path of the ``train`` or ``heldout`` text."""
        if split not in SPLIT_FILES:
            raise DataError(f"unknown split {split!r} of cached source {self.name}",
                            hint=f"use one of: {', '.join(SPLIT_FILES)}")
        return self.folder / SPLIT_FILES[split]

    def split_bytes(self, split: str) -> int:
        """Size in bytes of a split, as recorded when it was written."""
        return int(self.manifest["files"][SPLIT_FILES[split]]["bytes"])


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a source folder, or None when the folder is absent or incomplete."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"the cache manifest {folder / MANIFEST} is unreadable: {exc}",
                        hint="delete that folder and fetch the source again") from exc
    return manifest if isinstance(manifest, dict) else None


def is_complete(folder: Path, manifest: dict[str, Any], *, verify_checksums: bool = False) -> bool:
    """Whether every file the manifest lists exists with its recorded size (and checksum)."""
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(SPLIT_FILES.values()):
        return False
    for file_name, facts in files.items():
        path = folder / file_name
        if not path.is_file() or path.stat().st_size != facts.get("bytes"):
            return False
        if verify_checksums and sha256_file(path) != facts.get("sha256"):
            return False
    return True


def find_cached(name: str, cache_dir: str | os.PathLike | None = None) -> CachedSource:
    """The cached source ``name``; a :class:`DataError` saying how to fetch it when absent."""
    folder = text_dir(cache_dir) / name
    manifest = read_manifest(folder)
    if manifest is None or not is_complete(folder, manifest):
        raise DataError(f"text source {name!r} is not in the cache {folder.parent}",
                        hint=f"run 'lorashear data fetch --sources {name}'")
    return CachedSource(name=name, folder=folder, manifest=manifest)


def list_cached(cache_dir: str | os.PathLike | None = None) -> list[CachedSource]:
    """Every complete source in the cache, sorted by name."""
    root = text_dir(cache_dir)
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith("."):
            continue  # a temporary folder of an interrupted fetch
        manifest = read_manifest(folder)
        if manifest is not None and is_complete(folder, manifest):
            found.append(CachedSource(name=folder.name, folder=folder, manifest=manifest))
    return found
