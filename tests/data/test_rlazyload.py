"""R lazy-load databases written by the tests, and the Jane Austen extractor on top of them."""

from __future__ import annotations

import gzip

import pytest

from lorashear.data.rlazyload import (
    as_string_list,
    decompress_lazyload_record,
    read_lazyload_database,
    read_lazyload_index,
)
from lorashear.data.sources import austen_novel_text, extract_austen
from lorashear.errors import DataError


@pytest.mark.parametrize("compression", ["zlib", "Z", "2", "X", "0"])
def test_reads_every_record_compression(tmp_path, make_lazyload_database, compression):
    base = tmp_path / "Rdata"
    make_lazyload_database(base, {"first": ["a", "b"], "second": ["ü", "", "c"]}, [compression])
    objects = read_lazyload_database(base)
    assert as_string_list(objects["first"]) == ["a", "b"]
    assert as_string_list(objects["second"]) == ["ü", "", "c"]


def test_index_maps_names_to_offsets(tmp_path, make_lazyload_database):
    base = tmp_path / "Rdata"
    make_lazyload_database(base, {"x": ["1"], "y": ["2", "3"]})
    index = read_lazyload_index(base.with_suffix(".rdx"))
    assert list(index) == ["x", "y"]
    assert index["x"][0] == 0 and index["y"][0] == index["x"][1]


def test_missing_object_names_what_exists(tmp_path, make_lazyload_database):
    base = tmp_path / "Rdata"
    make_lazyload_database(base, {"emma": ["x"]})
    with pytest.raises(DataError, match="no object.*persuasion") as caught:
        read_lazyload_database(base, ["persuasion"])
    assert "emma" in str(caught.value)


def test_truncated_and_corrupt_records(tmp_path, r_serializer):
    with pytest.raises(DataError, match="truncated"):
        decompress_lazyload_record(b"\x00\x00")
    with pytest.raises(DataError, match="does not decompress"):
        decompress_lazyload_record(b"\x00\x00\x00\x05Zgarbage")
    payload = r_serializer(["abc"])
    wrong_length = (len(payload) + 1).to_bytes(4, "big") + b"0" + payload
    with pytest.raises(DataError, match="header says"):
        decompress_lazyload_record(wrong_length)


def test_missing_files_and_bad_index(tmp_path, r_serializer):
    with pytest.raises(DataError, match="does not exist"):
        read_lazyload_database(tmp_path / "nothing")
    (tmp_path / "bad.rdx").write_bytes(gzip.compress(r_serializer(["not", "an", "index"])))
    with pytest.raises(DataError, match="variables"):
        read_lazyload_index(tmp_path / "bad.rdx")


def test_austen_extraction_holds_out_persuasion(tmp_path, make_janeaustenr):
    root = make_janeaustenr(tmp_path, compressions=("zlib", "X"))
    extracted = extract_austen(root)
    assert len(extracted.train) == 5
    assert extracted.heldout == ["PERSUASION\nBy Jane Austen\nChapter 1\nIt is a truth that "
                                 "persuasion was wrapped over two lines.\nThe end of persuasion."]
    assert extracted.train[0].startswith("SENSESENSIBILITY\n")
    assert all("persuasion" not in document for document in extracted.train)


def test_austen_novel_text_joins_wrapped_lines_and_drops_italics():
    lines = ["Chapter 1", "", "", "It was _very_ wrapped", "across lines;  snake_case stays.",
             "", "Last."]
    assert austen_novel_text(lines) == ("Chapter 1\nIt was very wrapped across lines; "
                                        "snake_case stays.\nLast.")


def test_austen_package_without_database(tmp_path):
    with pytest.raises(DataError, match="Rdata.rdx"):
        extract_austen(tmp_path)
