"""`lorashear`: the umbrella command for work outside the compiler pipeline (data, models, eval).

Each subcommand lives in its own module under ``lorashear.cli`` and exposes
``add_parser(subparsers)`` returning its parser, with ``set_defaults(run=...)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lorashear.cli._common import add_common_options, run_command

#: Subcommand modules, imported lazily so `lorashear --help` stays fast.
SUBCOMMANDS: tuple[str, ...] = ("data", "model", "eval", "generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorashear",
        description="lorashear utilities: fetch offline data, prepare the default model, evaluate, generate. "
        "The compiler itself is lorashear-lower / lorashear-opt / lorashear-emit.")
    add_common_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"lorashear.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"lorashear.cli.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return run_command("lorashear", parser, lambda args: args.run(args), argv)


if __name__ == "__main__":
    sys.exit(main())
