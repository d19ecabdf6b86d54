"""`make bench`: run every benchmark script in bench/ in turn, each in its own process.

Each script prints a Markdown table and writes JSON under bench/out/. A script that fails is
reported and the rest still run; the exit code says whether all succeeded.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

#: Scripts that are part of ``make bench`` although their names do not start with ``bench_``.
EXTRA_SCRIPTS = ("decode_smollm2.py",)
SCRIPTS = sorted(p for p in Path(__file__).parent.glob("bench_*.py")) + [
    Path(__file__).parent / name for name in EXTRA_SCRIPTS]


def main() -> int:
    failed = []
    for script in SCRIPTS:
        print(f"\n## {script.name}\n", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(script)])
        print(f"\n({script.name}: exit {code}, {time.perf_counter() - start:.0f} s)", flush=True)
        if code:
            failed.append(script.name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
