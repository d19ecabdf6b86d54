"""Every command stops quietly when stdout's reader goes away (`lorashear-opt --list-passes |
head`), as Unix tools do: no traceback, no "internal error", exit status 141 (128 + SIGPIPE)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorashear.cli._common import CLOSED_PIPE_STATUS, run_command

ROOT = Path(__file__).parents[2]


def run_into_closed_pipe(module: str, *args: str, buffered: bool = True,
                         extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` with stdout a pipe whose reading end is already closed, so
    the command's first write to stdout (or the flush of its buffer) fails with EPIPE."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               **(extra_env or {}))
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", module, *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, timeout=300)
    finally:
        os.close(write_end)


@pytest.mark.parametrize(("module", "args"), [
    ("lorashear.cli.opt", ["--list-passes"]),    # one large print
    ("lorashear.cli.main", ["--help"]),           # argparse's help, flushed at exit
    ("lorashear.cli.lower", ["--help"]),
    ("lorashear.cli.main", ["data", "list", "--all"]),  # many small prints
], ids=["opt-list-passes", "lorashear-help", "lower-help", "data-list"])
def test_closed_pipe_is_quiet(module, args, tmp_path):
    done = run_into_closed_pipe(module, *args, extra_env={"LORASHEAR_CACHE": str(tmp_path)})
    assert done.stderr == ""
    assert done.returncode == CLOSED_PIPE_STATUS


def test_closed_pipe_is_quiet_unbuffered():
    """With PYTHONUNBUFFERED the failing write is the print itself, inside the command."""
    done = run_into_closed_pipe("lorashear.cli.opt", "--list-passes", buffered=False)
    assert done.stderr == ""
    assert done.returncode == CLOSED_PIPE_STATUS


def test_other_broken_pipes_are_still_errors(capsys):
    """A BrokenPipeError from anything but stdout (a child process's pipe) is a failure: it is
    reported, not hidden behind the closed-pipe exit."""
    def body(args: argparse.Namespace) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    code = run_command("lorashear-test", argparse.ArgumentParser(), body, [])
    err = capsys.readouterr().err
    assert code == 2
    assert "internal error: BrokenPipeError" in err
