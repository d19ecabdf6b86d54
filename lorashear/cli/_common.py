"""What every lorashear command shares: one-line errors, --debug, exit codes."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from lorashear.errors import LorashearError, first_line


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Options every command accepts."""
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback on failure instead of one line")


def run_command(prog: str, parser: argparse.ArgumentParser,
                body: Callable[[argparse.Namespace], int | None],
                argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run ``body``; turn failures into one line on stderr and exit code 1.

    A :class:`LorashearError` is the user's problem and gets its message; any other exception
    is a bug in lorashear and says so. ``--debug`` re-raises both with their traceback.
    """
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        with warnings.catch_warnings():
            if not debug:  # library deprecation chatter is not the user's business
                warnings.simplefilter("ignore")
                os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            return int(body(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except LorashearError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a CLI
        if getattr(args, "debug", False):
            raise
        first = first_line(exc, default="")
        print(f"{prog}: internal error: {type(exc).__name__}: {first} (rerun with --debug "
              "for the traceback)", file=sys.stderr)
        return 2
