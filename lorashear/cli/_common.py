"""What every lorashear command shares: one-line errors, --debug, exit codes, a closed pipe."""

from __future__ import annotations

import argparse
import os
import select
import sys
import warnings
from collections.abc import Callable, Sequence

from lorashear.errors import LorashearError, first_line

#: Exit status after stdout's reader went away (``lorashear-opt --list-passes | head``):
#: 128 + SIGPIPE, what a shell reports for ``cat``, ``ls`` or ``seq`` cut short by ``head``, so
#: ``set -o pipefail`` sees the output was cut in both cases alike.
CLOSED_PIPE_STATUS = 141
#: Help of the ``--cache-dir`` option of the commands that read or fill the cache.
CACHE_HELP = "cache folder (default: $LORASHEAR_CACHE or ~/.cache/lorashear)"


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Options every command accepts."""
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback on failure instead of one line")


def add_action_group(subparsers: argparse._SubParsersAction, name: str, *, help: str,
                     description: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """A subcommand of ``lorashear`` that takes an ACTION (``lorashear data fetch``): its parser
    and the subparsers its actions are added to (:func:`add_action`)."""
    parser = subparsers.add_parser(name, help=help, description=description)
    add_common_options(parser)
    actions = parser.add_subparsers(dest=f"{name}_command", metavar="ACTION", required=True)
    return parser, actions


def add_action(actions: argparse._SubParsersAction, name: str, *, help: str,
               description: str) -> argparse.ArgumentParser:
    """One ACTION of a subcommand from :func:`add_action_group`, with the common options."""
    parser = actions.add_parser(name, help=help, description=description)
    add_common_options(parser)
    return parser


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reading end has been closed.

    A write there fails with :class:`BrokenPipeError`; one from anywhere else (a child
    process's pipe, a socket) is a real failure and is reported as one.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False  # not a file descriptor (a test's capture): no pipe to lose
    if not hasattr(select, "poll"):
        return True  # no poll (Windows): the usual recipe, trust the error
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _silence_stdout() -> int:
    """Point stdout at the null device, so the interpreter's final flush of what is still
    buffered cannot fail again, and give the closed-pipe exit status."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass
    return CLOSED_PIPE_STATUS


def run_command(prog: str, parser: argparse.ArgumentParser,
                body: Callable[[argparse.Namespace], int | None],
                argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run ``body``; turn failures into one line on stderr and exit code 1.

    A :class:`LorashearError` is the user's problem and gets its message; any other exception
    is a bug in lorashear and says so. ``--debug`` re-raises both with their traceback. When
    stdout's reader goes away (``| head``), the command stops quietly, as Unix tools do: no
    message, exit status :data:`CLOSED_PIPE_STATUS`. Whatever is buffered for stdout (results,
    ``--help``) is flushed here, so a closed pipe shows here rather than at interpreter exit.
    """
    try:
        try:
            return _parse_and_run(prog, parser, body, argv)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        if not stdout_reader_gone():
            raise  # another pipe broke (``--debug`` lets it through): not ours to hide
        return _silence_stdout()


def _parse_and_run(prog: str, parser: argparse.ArgumentParser,
                   body: Callable[[argparse.Namespace], int | None],
                   argv: Sequence[str] | None) -> int:
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
        if isinstance(exc, BrokenPipeError) and stdout_reader_gone():
            raise  # run_command stops quietly
        if getattr(args, "debug", False):
            raise
        first = first_line(exc, default="")
        print(f"{prog}: internal error: {type(exc).__name__}: {first} (rerun with --debug "
              "for the traceback)", file=sys.stderr)
        return 2
