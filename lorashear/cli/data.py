"""`lorashear data`: fetch the offline text sources into the cache, list them, check a spec."""

from __future__ import annotations

import argparse
import sys
import time

from lorashear.cli._common import CACHE_HELP, add_action, add_action_group


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``lorashear data fetch|list|check``."""
    parser, actions = add_action_group(
        subparsers, "data", help="fetch and inspect the offline text sources",
        description="Fetch public-domain text (Bibles, commentaries, Jane Austen, Python and "
        "Linux documentation) from Debian packages into the cache as train/heldout text, list "
        "what is cached, and check data specs.")

    fetch = add_action(
        actions, "fetch", help="download and extract text sources into the cache",
        description="Download each source's Debian package (apt-get download; nothing is "
        "installed), extract plain text, hold out a fixed slice and write "
        "<cache>/text/<source>/{train,heldout}.txt with a manifest. Sources already cached are "
        "left alone, so running it twice does nothing the second time.")
    fetch.add_argument("--sources", default=None, metavar="A,B",
                       help="comma-separated source names (default: all; see 'lorashear data "
                       "list --all')")
    fetch.add_argument("--cache-dir", default=None, metavar="DIR", help=CACHE_HELP)
    fetch.add_argument("--force", action="store_true",
                       help="extract again even when a source is already cached (the "
                       "downloaded .deb is reused)")
    fetch.add_argument("--no-progress", action="store_true",
                       help="do not show progress bars")
    fetch.set_defaults(run=_run_fetch)

    listing = add_action(
        actions, "list", help="show the cached text sources and their sizes",
        description="Show each cached source with its train/heldout sizes and documents.")
    listing.add_argument("--cache-dir", default=None, metavar="DIR", help=CACHE_HELP)
    listing.add_argument("--all", action="store_true",
                         help="also show the sources that can be fetched but are not cached")
    listing.set_defaults(run=_run_list)

    check = add_action(
        actions, "check", help="validate a data spec (or one data file) and summarise it",
        description="Load every source of a data spec (YAML file, one local data file, or a "
        "cached source name) and print its weight, documents and size; exits 1 with one clear "
        "message on the first problem.")
    check.add_argument("spec", help="data spec: a .yaml file, a .txt/.json/.jsonl/.parquet "
                       "file, or a cached source name")
    check.add_argument("--cache-dir", default=None, metavar="DIR", help=CACHE_HELP)
    check.set_defaults(run=_run_check)
    return parser


def _run_fetch(args: argparse.Namespace) -> int:
    from lorashear.data.cache import resolve_cache_dir
    from lorashear.data.sources import fetch_sources

    names = None
    if args.sources:
        names = [name.strip() for name in args.sources.split(",") if name.strip()]
    started = time.perf_counter()
    outcomes = fetch_sources(names, args.cache_dir, force=args.force,
                             progress=not args.no_progress and sys.stderr.isatty())
    for outcome in outcomes:
        how = ("already cached" if outcome.status == "cached"
               else f"fetched in {outcome.seconds:.1f} s")
        print(f"{outcome.name:<12} train {_size(outcome.train_bytes):>9}  heldout "
              f"{_size(outcome.heldout_bytes):>9}  ({how})")
    if all(outcome.status == "cached" for outcome in outcomes):
        print(f"nothing to do: every requested source is already in "
              f"{resolve_cache_dir(args.cache_dir)}")
    else:
        print(f"done in {time.perf_counter() - started:.1f} s; cache: "
              f"{resolve_cache_dir(args.cache_dir)}")
    return 0


def _run_list(args: argparse.Namespace) -> int:
    from lorashear.data.cache import list_cached, text_dir
    from lorashear.data.sources import SOURCES

    cached = {found.name: found for found in list_cached(args.cache_dir)}
    if not cached and not args.all:
        print(f"no text sources cached in {text_dir(args.cache_dir)} (run 'lorashear data "
              "fetch')")
        return 0
    print(f"{'source':<12} {'train':>9} {'heldout':>9} {'docs':>11}  description")
    names = list(SOURCES) + sorted(set(cached) - set(SOURCES)) if args.all else sorted(cached)
    total = 0
    for name in names:
        description = SOURCES[name].description if name in SOURCES else ""
        found = cached.get(name)
        if found is None:
            print(f"{name:<12} {'-':>9} {'-':>9} {'-':>11}  {description} (not fetched)")
            continue
        files = found.manifest["files"]
        documents = f"{files['train.txt'].get('documents', '?')}+" \
                    f"{files['heldout.txt'].get('documents', '?')}"
        total += found.split_bytes("train") + found.split_bytes("heldout")
        print(f"{name:<12} {_size(found.split_bytes('train')):>9} "
              f"{_size(found.split_bytes('heldout')):>9} {documents:>11}  "
              f"{found.manifest.get('description', description)}")
    print(f"{len(cached)} cached, {_size(total)} in {text_dir(args.cache_dir)}")
    return 0


def _run_check(args: argparse.Namespace) -> int:
    from lorashear.data.spec import load_spec

    spec = load_spec(args.spec, cache_dir=args.cache_dir)
    weights = spec.weights()
    for source in spec.sources:
        documents = source.load_documents(args.cache_dir)
        characters = sum(len(document) for document in documents)
        print(f"{source.name:<16} weight {weights[source.name]:.3f}  {len(documents):>7} docs  "
              f"{characters:>11,} chars  {source.location()}")
    print(f"{spec.origin}: {len(spec.sources)} source(s) ok")
    return 0


def _size(count: int) -> str:
    """Bytes in a short human form (``4.2 MB``)."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"  # pragma: no cover
