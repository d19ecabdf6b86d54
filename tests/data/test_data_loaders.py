"""Loading local text, JSON, JSON Lines and Parquet files (never the hub)."""

from __future__ import annotations

import json

import pytest

from lorashear.data.loaders import (
    InstructionRecord,
    is_hub_name,
    load_documents,
    load_instruction_records,
    read_local_records,
)
from lorashear.errors import DataError

ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]


def test_plain_text_is_one_document(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Chapter 1\n\nIt was a dark night.\n", encoding="utf-8")
    assert load_documents(path) == ["Chapter 1\n\nIt was a dark night.\n"]


def test_json_list_jsonl_and_strings(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    (tmp_path / "b.jsonl").write_text('{"body": "three"}\n\n{"body": "four"}\n')
    (tmp_path / "c.json").write_text(json.dumps(["five", "six"]))
    (tmp_path / "d.json").write_text('{"text": "seven"}\n{"text": "eight"}\n')  # JSONL in .json
    assert load_documents(tmp_path / "a.json") == ["one", "two"]
    assert load_documents(tmp_path / "b.jsonl", text_field="body") == ["three", "four"]
    assert load_documents(tmp_path / "c.json") == ["five", "six"]
    assert load_documents(tmp_path / "d.json") == ["seven", "eight"]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", "beta"], "n": [1, 2]}), tmp_path / "t.parquet")
    assert load_documents(tmp_path / "t.parquet") == ["alpha", "beta"]
    pq.write_table(pa.table({k: [r[k] for r in ALPACA] for k in ALPACA[0]}),
                   tmp_path / "alpaca.parquet")
    assert load_instruction_records(tmp_path / "alpaca.parquet")[1].input == "2 and 3"


def test_alpaca_records_are_detected_and_rendered(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA))
    documents = load_documents(path)
    assert documents[0].endswith("### Instruction:\nName a colour.\n\n### Response:\nBlue.")
    assert "### Input:\n2 and 3\n\n" in documents[1]
    records = load_instruction_records(path)
    assert records[0] == InstructionRecord("Name a colour.", "", "Blue.")
    assert records[1].user_message() == "Add the numbers.\n\n2 and 3"


def test_instruction_record_without_instruction(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n" + json.dumps({"prompt": "x", "output": "y"}))
    with pytest.raises(DataError, match="record 2 of .*mixed.jsonl has no 'instruction'"):
        load_documents(path, format="instruction")
    with pytest.raises(DataError, match="record 2 .* no 'instruction'"):
        load_instruction_records(path)


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("  \n\n ", "is empty"),
])
def test_empty_text_file(tmp_path, content, message):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_documents(path)


def test_empty_and_malformed_records(tmp_path):
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(DataError, match="empty"):
        load_documents(tmp_path / "none.json")
    (tmp_path / "blank.json").write_text(json.dumps([{"text": ""}, {"text": None}]))
    with pytest.raises(DataError, match="empty"):
        load_documents(tmp_path / "blank.json")
    (tmp_path / "field.json").write_text(json.dumps([{"body": "x"}]))
    with pytest.raises(DataError, match="record 1 .* no 'text' field"):
        load_documents(tmp_path / "field.json")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2: not valid JSON"):
        load_documents(tmp_path / "bad.jsonl")
    (tmp_path / "num.json").write_text(json.dumps([{"text": 3}]))
    with pytest.raises(DataError, match="not text"):
        load_documents(tmp_path / "num.json")


def test_missing_file_unknown_suffix_and_bad_format(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents(tmp_path / "nope.txt")
    (tmp_path / "book.epub").write_text("x")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_documents(tmp_path / "book.epub")
    assert load_documents(tmp_path / "book.epub", format="text") == ["x"]
    (tmp_path / "b.txt").write_text("x")
    with pytest.raises(DataError, match="plain text"):
        load_documents(tmp_path / "b.txt", format="instruction")
    with pytest.raises(DataError, match="unknown data format"):
        load_documents(tmp_path / "b.txt", format="markdown")


def test_json_object_with_a_data_list(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": [{"text": "inside"}]}))
    assert read_local_records(path) == [{"text": "inside"}]
    (tmp_path / "scalar.json").write_text("42")
    with pytest.raises(DataError, match="not a list of records"):
        read_local_records(tmp_path / "scalar.json")


def test_hub_name_heuristic(tmp_path):
    assert is_hub_name("tatsu-lab/alpaca") and is_hub_name("imdb")
    assert not is_hub_name("./alpaca.json") and not is_hub_name("data.txt")
    assert not is_hub_name("/abs/path") and not is_hub_name(str(tmp_path))


def test_package_facade_exports_resolve():
    import lorashear.data as data

    for name in data.__all__:
        assert getattr(data, name) is not None
