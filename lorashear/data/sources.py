"""The offline text sources, and `fetch`: download, extract, split and cache each of them.

Each source is one Debian package holding public-domain English text of one kind (scripture,
commentary, fiction, technical documentation); the recovery pass samples per source, so they
stay separate. Fetching a source downloads its ``.deb`` (kept), unpacks it into a temporary
folder, extracts plain text, splits off the fixed held-out slice and writes
``<cache>/text/<source>/`` atomically. A source already cached with the current extractor is
left alone, so a second run does nothing, and a killed run resumes at the source it was on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from lorashear._atomic import atomic_path
from lorashear.data import cache
from lorashear.data._text import HELDOUT_FRACTION, clean_lines, join_documents, split_tail
from lorashear.data.debian import download_deb, extract_deb
from lorashear.data.rlazyload import as_string_list, read_lazyload_database
from lorashear.data.rst import rst_to_text
from lorashear.data.sword import find_sword_modules, read_sword_documents
from lorashear.errors import DataError

#: Bump when extraction output changes: cached sources written by another version are redone.
EXTRACTOR_VERSION = 1


@dataclass(frozen=True)
class TextSource:
    """One offline text source: the Debian package it comes from and how to read it."""

    name: str
    """Short name used on the command line and in data specs (``kjv``, ``austen``)."""
    package: str
    """Debian package holding the text."""
    kind: str
    """Extractor: ``sword`` (SWORD module), ``austen`` (R lazy-load database) or ``rst``."""
    description: str
    excluded_folders: tuple[str, ...] = ()
    """For ``rst``: top-level folders of ``_sources`` to skip (the kernel's translations)."""


SOURCES: dict[str, TextSource] = {source.name: source for source in (
    TextSource("tdavid", "sword-comm-tdavid", "sword",
               "C. H. Spurgeon, The Treasury of David (commentary on the Psalms)"),
    TextSource("web", "sword-text-web", "sword", "World English Bible"),
    TextSource("kjv", "sword-text-kjv", "sword", "King James Bible"),
    TextSource("mhcc", "sword-comm-mhcc", "sword", "Matthew Henry, Concise Commentary"),
    TextSource("scofield", "sword-comm-scofield", "sword", "Scofield Reference Notes (1917)"),
    TextSource("austen", "r-cran-janeaustenr", "austen",
               "Jane Austen's six novels (Persuasion held out)"),
    TextSource("python-docs", "python3.11-doc", "rst", "Python 3.11 documentation sources"),
    TextSource("linux-docs", "linux-doc-6.1", "rst",
               "Linux 6.1 kernel documentation sources (English only)",
               excluded_folders=("translations",)),
)}

#: Jane Austen's novels as the janeaustenr objects name them, in publication order.
AUSTEN_NOVELS: tuple[tuple[str, str], ...] = (
    ("sensesensibility", "Sense and Sensibility"), ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"), ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"), ("persuasion", "Persuasion"),
)
AUSTEN_HELDOUT = "persuasion"

_GUTENBERG_ITALICS = re.compile(r"(?<![\w_])_([^_\n]+?)_(?![\w_])")


@dataclass(frozen=True)
class ExtractedText:
    """A source's text split into documents for training and for held-out evaluation."""

    train: list[str]
    heldout: list[str]
    heldout_rule: str
    """How the held-out slice was chosen, recorded in the manifest."""


@dataclass(frozen=True)
class PackageTree:
    """An unpacked package: the folder its files are under, and the ``.deb`` it came from."""

    root: Path
    deb: Path | None = None


#: Turns a package name and a scratch folder into its unpacked tree (tests pass a fake one).
PackageFetcher = Callable[[str, Path], PackageTree]


@dataclass(frozen=True)
class FetchOutcome:
    """What `fetch_sources` did for one source."""

    name: str
    status: str
    """``cached`` (already there, nothing done) or ``fetched`` (written now)."""
    train_bytes: int
    heldout_bytes: int
    seconds: float = 0.0


def resolve_source_names(names: Sequence[str] | None) -> list[str]:
    """Validate source names (all sources when None), keeping the registry's order."""
    if names is None:
        return list(SOURCES)
    unknown = [name for name in names if name not in SOURCES]
    if unknown:
        raise DataError(f"unknown text source(s): {', '.join(unknown)}",
                        hint=f"known sources: {', '.join(SOURCES)}")
    return [name for name in SOURCES if name in names]


def debian_fetcher(cache_dir: str | os.PathLike | None = None) -> PackageFetcher:
    """The real fetcher: ``apt-get download`` into ``<cache>/debs``, ``dpkg-deb -x`` to scratch."""
    downloads = cache.debs_dir(cache_dir)

    def fetch(package: str, scratch: Path) -> PackageTree:
        deb = download_deb(package, downloads)
        return PackageTree(root=extract_deb(deb, scratch / "root"), deb=deb)

    return fetch


def fetch_sources(names: Sequence[str] | None = None,
                  cache_dir: str | os.PathLike | None = None, *, force: bool = False,
                  progress: bool = False, package_fetcher: PackageFetcher | None = None
                  ) -> list[FetchOutcome]:
    """Make sure each named source (all by default) is extracted into the cache.

    Sources already cached by this extractor version are skipped unless ``force``. Each source
    is finished and written before the next starts, so an interrupted run keeps what it did.
    """
    selected = resolve_source_names(names)
    root = cache.resolve_cache_dir(cache_dir)
    fetcher = package_fetcher or debian_fetcher(root)
    outcomes: list[FetchOutcome] = []
    try:
        for name in tqdm(selected, desc="text sources", unit="source", disable=not progress):
            outcomes.append(_fetch_one(SOURCES[name], root, fetcher, force, progress))
    finally:
        # Sources finished before a failure are complete: the index must show them.
        if any(outcome.status == "fetched" for outcome in outcomes) or not (
                cache.text_dir(root) / "index.json").exists():
            _write_index(root)
        with contextlib.suppress(OSError):
            (root / "work").rmdir()  # only succeeds when no other fetch is using it
    return outcomes


def _fetch_one(source: TextSource, root: Path, fetcher: PackageFetcher, force: bool,
               progress: bool) -> FetchOutcome:
    """Fetch one source unless it is cached and current; report what was done."""
    folder = cache.text_dir(root) / source.name
    manifest = cache.read_manifest(folder)
    if (not force and manifest is not None
            and manifest.get("extractor_version") == EXTRACTOR_VERSION
            and cache.is_complete(folder, manifest)):
        return FetchOutcome(source.name, "cached", manifest["files"]["train.txt"]["bytes"],
                            manifest["files"]["heldout.txt"]["bytes"])
    started = time.monotonic()
    scratch_parent = root / "work"
    scratch_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{source.name}.", dir=scratch_parent) as scratch:
        tree = fetcher(source.package, Path(scratch))
        extracted = extract_source(source, tree.root, progress=progress)
        written = write_source(folder, source, extracted, tree.deb)
    return FetchOutcome(source.name, "fetched", written["files"]["train.txt"]["bytes"],
                        written["files"]["heldout.txt"]["bytes"],
                        seconds=time.monotonic() - started)


def extract_source(source: TextSource, package_root: Path, *, progress: bool = False
                   ) -> ExtractedText:
    """Extract ``source``'s text from its unpacked package and split off the held-out part."""
    if source.kind == "sword":
        documents = []
        for module in find_sword_modules(package_root):
            documents.extend(read_sword_documents(module, progress=progress))
        extracted = _tail_split(documents, "books/chapters")
    elif source.kind == "austen":
        extracted = extract_austen(package_root)
    elif source.kind == "rst":
        extracted = _tail_split(read_rst_documents(package_root, source.excluded_folders,
                                                   progress=progress), "pages sorted by path")
    else:  # pragma: no cover - the registry only holds the kinds above
        raise DataError(f"source {source.name} has unknown kind {source.kind!r}")
    if not extracted.train:
        raise DataError(f"source {source.name} yielded no text from {source.package}",
                        hint="the package layout may have changed")
    return extracted


def _tail_split(documents: list[str], unit: str) -> ExtractedText:
    train, heldout = split_tail(documents, HELDOUT_FRACTION)
    return ExtractedText(train, heldout, f"last {HELDOUT_FRACTION:.0%} of the text "
                         f"({len(heldout)} of {len(train) + len(heldout)} {unit}, in order)")


def extract_austen(package_root: Path) -> ExtractedText:
    """Read the six novels from janeaustenr's lazy-load database; Persuasion is held out."""
    databases = sorted(package_root.rglob("janeaustenr/data/Rdata.rdx"))
    if not databases:
        raise DataError(f"no janeaustenr/data/Rdata.rdx under {package_root}")
    names = [name for name, _ in AUSTEN_NOVELS]
    objects = read_lazyload_database(databases[0].with_suffix(""), names)
    novels = {name: austen_novel_text(as_string_list(objects[name], name=name))
              for name in names}
    train = [novels[name] for name in names if name != AUSTEN_HELDOUT]
    return ExtractedText(train, [novels[AUSTEN_HELDOUT]], "the novel Persuasion")


def austen_novel_text(lines: list[str]) -> str:
    """Join a novel's hard-wrapped lines into one paragraph per line; drop ``_italic_`` marks."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(_GUTENBERG_ITALICS.sub(r"\1", " ".join(current)))
            current = []
    return "\n".join(clean_lines("\n".join(paragraphs)))


def read_rst_documents(package_root: Path, excluded_folders: Sequence[str] = (), *,
                       progress: bool = False) -> list[str]:
    """Convert every ``html/_sources/**/*.rst.txt`` page to plain text, sorted by path."""
    roots = sorted(package_root.rglob("html/_sources"))
    if not roots:
        raise DataError(f"no html/_sources folder under {package_root}")
    sources_root = roots[0]
    pages = sorted(path for path in sources_root.rglob("*.rst.txt")
                   if path.relative_to(sources_root).parts[0] not in excluded_folders)
    documents = []
    for page in tqdm(pages, desc="rst pages", unit="page", disable=not progress, leave=False):
        text = rst_to_text(page.read_text(encoding="utf-8", errors="replace"))
        if text:
            documents.append(text)
    return documents


def write_source(folder: Path, source: TextSource, extracted: ExtractedText,
                 deb: Path | None) -> dict:
    """Write train/heldout text and the manifest into ``folder`` as one atomic step."""
    with atomic_path(folder, directory=True) as staging:
        files = {}
        for split, documents in (("train", extracted.train), ("heldout", extracted.heldout)):
            file_name = cache.SPLIT_FILES[split]
            path = staging / file_name
            path.write_text(join_documents(documents), encoding="utf-8", newline="\n")
            files[file_name] = {"bytes": path.stat().st_size, "sha256": cache.sha256_file(path),
                                "documents": len([doc for doc in documents if doc])}
        manifest = {
            "source": source.name, "description": source.description,
            "package": source.package, "kind": source.kind,
            "deb": deb.name if deb else None,
            "deb_sha256": cache.sha256_file(deb) if deb else None,
            "extractor_version": EXTRACTOR_VERSION, "heldout_rule": extracted.heldout_rule,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": files,
        }
        (staging / cache.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n",
                                              encoding="utf-8")
        _make_shareable(staging, directory=True)
    return manifest


def _write_index(root: Path) -> None:
    """Write ``<cache>/text/index.json``: every cached source with its sizes and checksums."""
    entries = {found.name: {key: found.manifest.get(key) for key in
                            ("description", "package", "deb", "extractor_version", "files")}
               for found in cache.list_cached(root)}
    target = cache.text_dir(root) / "index.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as staging:
        staging.write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
        _make_shareable(staging, directory=False)


def _make_shareable(path: Path, *, directory: bool) -> None:
    """Give a staged path the permissions of a normally created one (temporaries are private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)
