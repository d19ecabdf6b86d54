"""YAML data specs: parsing, the one-file shortcut, and one clear error per problem."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from lorashear.data.sources import SOURCES, ExtractedText, write_source
from lorashear.data.spec import load_spec, parse_spec
from lorashear.errors import DataError


@pytest.fixture
def data_dir(tmp_path) -> Path:
    (tmp_path / "book.txt").write_text("It was a dark night.\n")
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi"}]))
    (tmp_path / "notes.jsonl").write_text('{"body": "a note"}\n')
    return tmp_path


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    """A cache holding the ``kjv`` source, written the way `fetch` writes it."""
    root = tmp_path / "cache"
    write_source(root / "text" / "kjv", SOURCES["kjv"],
                 ExtractedText(["In the beginning.", "And God said."], ["Amen."], "test"), None)
    return root


def write_spec(folder: Path, text: str) -> Path:
    path = folder / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_full_spec(data_dir, cache_dir):
    path = write_spec(data_dir, """\
        sources:
          - path: book.txt
            weight: 3
          - path: notes.jsonl
            text_field: body
          - path: alpaca.json
            format: instruction
            name: chat
          - cached: kjv
            split: heldout
          - hf: someone/dataset
            split: validation
        """)
    spec = load_spec(path, cache_dir=cache_dir)
    assert [source.name for source in spec.sources] == ["book", "notes", "chat", "kjv-heldout",
                                                        "someone/dataset"]
    assert spec.sources[0].path == data_dir / "book.txt"
    assert spec.weights()["book"] == pytest.approx(3 / 7)
    assert [source.name for source in spec.instruction_sources()] == ["chat"]
    assert spec.sources[3].load_documents(cache_dir) == ["Amen."]
    assert spec.sources[2].load_instruction_records()[0].output == "Hi"
    loaded = parse_spec({"sources": [{"path": "book.txt"},
                                     {"path": "notes.jsonl", "text_field": "body"}]},
                        base_dir=data_dir).load_documents()
    assert loaded == {"book": ["It was a dark night.\n"], "notes": ["a note"]}


def test_single_file_and_cached_name_need_no_yaml(data_dir, cache_dir, monkeypatch):
    monkeypatch.chdir(data_dir)
    spec = load_spec("./book.txt")
    assert len(spec.sources) == 1 and spec.sources[0].name == "book"
    assert spec.load_documents() == {"book": ["It was a dark night.\n"]}
    cached = load_spec("kjv", cache_dir=cache_dir)
    assert cached.sources[0].cached == "kjv"
    assert cached.load_documents(cache_dir)["kjv"] == ["In the beginning.", "And God said."]


@pytest.mark.parametrize("spec, message", [
    ({"sources": [{"path": "book.txt"}], "seq_len": 5}, r"unknown key\(s\): seq_len"),
    ({"sources": [{"path": "book.txt", "weigth": 2}]}, r"source 1 .*unknown key\(s\): weigth"),
    ({"sources": [{"path": "missing.txt"}]}, "missing.txt does not exist"),
    ({"sources": []}, "non-empty 'sources'"),
    ({"sources": [{"weight": 1}]}, "exactly one of path, cached, hf"),
    ({"sources": [{"path": "book.txt", "hf": "x/y"}]}, "exactly one of"),
    ({"sources": [{"path": "book.txt", "weight": 0}]}, "positive"),
    ({"sources": [{"path": "book.txt", "weight": "high"}]}, "must be a number"),
    ({"sources": [{"path": "book.txt", "format": "csv"}]}, "unknown format"),
    ({"sources": [{"path": "book.txt"}, {"path": "book.txt"}]}, "two sources 'book'"),
    ({"sources": [{"cached": "kjv", "split": "test"}]}, "cached split"),
    ({"sources": [{"cached": "austen"}]}, "not in the cache"),
    ({"sources": [{"path": "book.txt", "split": "test"}]}, "'split' applies"),
    (["not", "a", "mapping"], "must be a mapping"),
])
def test_each_problem_has_one_clear_error(data_dir, cache_dir, spec, message):
    with pytest.raises(DataError, match=message):
        parse_spec(spec, base_dir=data_dir, cache_dir=cache_dir)


def test_errors_found_when_loading(data_dir):
    (data_dir / "empty.txt").write_text("")
    (data_dir / "plain.json").write_text(json.dumps([{"text": "no instruction here"}]))
    spec = parse_spec({"sources": [{"path": "empty.txt"}]}, base_dir=data_dir)
    with pytest.raises(DataError, match="is empty"):
        spec.load_documents()
    spec = parse_spec({"sources": [{"path": "plain.json", "format": "instruction"}]},
                      base_dir=data_dir)
    with pytest.raises(DataError, match="has no 'instruction' field"):
        spec.load_documents()


def test_yaml_problems(data_dir, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_spec(tmp_path / "absent.yaml")
    bad = write_spec(data_dir, "sources:\n  - path: [unclosed\n")
    with pytest.raises(DataError, match=r"spec.yaml:\d+:\d+ is not valid YAML"):
        load_spec(bad)
    with pytest.raises(DataError, match="neither an existing file nor a known text source"):
        load_spec("no-such-thing")
    with pytest.raises(DataError, match="does not exist"):
        load_spec(tmp_path / "missing.jsonl")


def test_check_files_false_defers_existence(data_dir):
    spec = parse_spec({"sources": [{"path": "later.txt"}, {"cached": "kjv"}]},
                      base_dir=data_dir, check_files=False)
    assert [source.name for source in spec.sources] == ["later", "kjv"]
