"""`lorashear data fetch|list|check` through the real argument parser."""

from __future__ import annotations

import argparse

import pytest

from lorashear.cli import data as data_cli
from lorashear.cli._common import add_common_options, run_command
from lorashear.data.sources import PackageTree


def run_data(argv: list[str]) -> int:
    """Run ``lorashear data ...`` with only the data subcommand registered."""
    parser = argparse.ArgumentParser(prog="lorashear")
    add_common_options(parser)
    data_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return run_command("lorashear", parser, lambda args: args.run(args), ["data", *argv])


@pytest.fixture
def fake_packages(monkeypatch, make_sword_module):
    """Make `fetch` build SWORD packages in code instead of calling apt-get."""
    calls: list[str] = []

    def fetcher_for(cache_dir):
        def fetch(package, scratch):
            calls.append(package)
            books = [[f"Verse {n} of book {b}." for n in range(20)] for b in range(30)]
            make_sword_module(scratch / "root", package.rsplit("-", 1)[-1], {"ot": books})
            return PackageTree(root=scratch / "root")
        return fetch

    monkeypatch.setattr("lorashear.data.sources.debian_fetcher", fetcher_for)
    return calls


def test_fetch_then_fetch_again_then_list(tmp_path, capsys, fake_packages):
    cache_dir = str(tmp_path / "cache")
    assert run_data(["fetch", "--sources", "kjv,web", "--cache-dir", cache_dir]) == 0
    first = capsys.readouterr().out
    assert "kjv" in first and "fetched in" in first and "done in" in first
    assert run_data(["fetch", "--sources", "kjv,web", "--cache-dir", cache_dir]) == 0
    second = capsys.readouterr().out
    assert "already cached" in second and "nothing to do" in second
    assert fake_packages == ["sword-text-web", "sword-text-kjv"]
    assert run_data(["list", "--cache-dir", cache_dir]) == 0
    listing = capsys.readouterr().out
    assert "kjv" in listing and "2 cached" in listing and "austen" not in listing
    assert run_data(["list", "--all", "--cache-dir", cache_dir]) == 0
    assert "austen" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, capsys, fake_packages):
    assert run_data(["fetch", "--sources", "kjv,bogus", "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorashear: error: unknown text source(s): bogus")
    assert len(err.strip().splitlines()) == 1 and fake_packages == []


def test_empty_list_and_check(tmp_path, capsys):
    assert run_data(["list", "--cache-dir", str(tmp_path)]) == 0
    assert "no text sources cached" in capsys.readouterr().out
    book = tmp_path / "book.txt"
    book.write_text("It was a dark night.\n")
    assert run_data(["check", str(book)]) == 0
    out = capsys.readouterr().out
    assert "book" in out and "1 source(s) ok" in out
    (tmp_path / "spec.yaml").write_text("sources:\n  - path: book.txt\n    colour: red\n")
    assert run_data(["check", str(tmp_path / "spec.yaml")]) == 1
    assert "unknown key(s): colour" in capsys.readouterr().err


def test_every_option_has_help():
    parser = argparse.ArgumentParser(prog="lorashear")
    sub = parser.add_subparsers()
    data_parser = data_cli.add_parser(sub)
    actions = [a for a in data_parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    for name, action_parser in actions.choices.items():
        for option in action_parser._actions:
            assert option.help, f"data {name}: {option.dest} has no help"
