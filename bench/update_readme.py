"""Copy the latest side-by-side table (bench/out/side_by_side.md) into README.md, between the
markers ``<!-- bench:side-by-side:start -->`` and ``<!-- bench:side-by-side:end -->``.

    python3 bench/update_readme.py [--table bench/out/side_by_side.md] [--readme README.md]

Fails (exit 1) without touching README.md when a marker is missing or the table is absent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

START = "<!-- bench:side-by-side:start -->"
END = "<!-- bench:side-by-side:end -->"
ROOT = Path(__file__).resolve().parent.parent


def replace_between(text: str, body: str) -> str:
    """``text`` with everything between the two markers replaced by ``body``."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README needs the markers {START} and {END}, in that order")
    return text[:start + len(START)] + "\n" + body.strip() + "\n" + text[end:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, default=ROOT / "bench/out/side_by_side.md")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args()
    if not args.table.is_file():
        print(f"update_readme: no table at {args.table}; run bench/bench_side_by_side.py", file=sys.stderr)
        return 1
    try:
        text = replace_between(args.readme.read_text(), args.table.read_text())
    except ValueError as exc:
        print(f"update_readme: {exc}", file=sys.stderr)
        return 1
    args.readme.write_text(text)
    print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
