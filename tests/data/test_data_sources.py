"""`fetch_sources` end to end with packages built in the test (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorashear.data import cache
from lorashear.data._text import clean_document, join_documents, split_documents, split_tail
from lorashear.data.sources import (
    EXTRACTOR_VERSION,
    PackageTree,
    fetch_sources,
    resolve_source_names,
)
from lorashear.errors import DataError

BOOKS = [[f"Verse {book}.{verse} of the book number {book}." for verse in range(1, 30)]
         for book in range(1, 25)]
RST_PAGE = "Title\n=====\n\nSome *prose* about :func:`things`.\n\n.. toctree::\n\n   a\n"


class FakeFetcher:
    """Builds package trees in code and counts which packages were asked for."""

    def __init__(self, make_sword_module, make_janeaustenr, fail_on: str | None = None):
        self.make_sword_module = make_sword_module
        self.make_janeaustenr = make_janeaustenr
        self.fail_on = fail_on
        self.calls: list[str] = []

    def __call__(self, package: str, scratch: Path) -> PackageTree:
        self.calls.append(package)
        if package == self.fail_on:
            raise DataError(f"cannot download the Debian package {package}: simulated")
        root = scratch / "root"
        if package.startswith("sword-"):
            self.make_sword_module(root, package.rsplit("-", 1)[-1], {"ot": BOOKS})
        elif package == "r-cran-janeaustenr":
            self.make_janeaustenr(root)
        else:
            sources = root / "usr/share/doc/pkg/html/_sources"
            for number in range(30):
                (sources / "area").mkdir(parents=True, exist_ok=True)
                (sources / "area" / f"page{number:02}.rst.txt").write_text(RST_PAGE)
            (sources / "translations").mkdir()
            (sources / "translations" / "it.rst.txt").write_text("Titolo\n======\n\nCiao.\n")
        return PackageTree(root=root)


@pytest.fixture
def fetcher(make_sword_module, make_janeaustenr):
    return FakeFetcher(make_sword_module, make_janeaustenr)


def test_fetch_writes_splits_and_manifest(tmp_path, fetcher):
    outcomes = fetch_sources(["kjv", "austen", "linux-docs"], tmp_path, package_fetcher=fetcher)
    assert [(o.name, o.status) for o in outcomes] == [("kjv", "fetched"), ("austen", "fetched"),
                                                      ("linux-docs", "fetched")]
    kjv = cache.find_cached("kjv", tmp_path)
    manifest = kjv.manifest
    assert manifest["extractor_version"] == EXTRACTOR_VERSION
    for split in ("train", "heldout"):
        path = kjv.split_path(split)
        facts = manifest["files"][path.name]
        assert facts["bytes"] == path.stat().st_size
        assert facts["sha256"] == cache.sha256_file(path)
    train = kjv.split_path("train").read_text()
    heldout = kjv.split_path("heldout").read_text()
    assert "Verse 1.1 of" in train and "Verse 24.29 of" in heldout
    assert not set(heldout.split("\n")) & set(train.split("\n")) - {""}
    assert 0.03 < len(heldout) / (len(train) + len(heldout)) < 0.1
    austen = cache.find_cached("austen", tmp_path)
    assert "PERSUASION" in austen.split_path("heldout").read_text()
    assert "PERSUASION" not in austen.split_path("train").read_text()
    docs = cache.find_cached("linux-docs", tmp_path).split_path("train").read_text()
    assert "Some prose about things." in docs and "Ciao" not in docs and "toctree" not in docs
    index = json.loads((tmp_path / "text" / "index.json").read_text())
    assert set(index) == {"kjv", "austen", "linux-docs"}


def test_second_run_does_nothing(tmp_path, fetcher):
    fetch_sources(["kjv", "mhcc"], tmp_path, package_fetcher=fetcher)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "text").rglob("*.txt")}
    fetcher.calls.clear()
    outcomes = fetch_sources(["kjv", "mhcc"], tmp_path, package_fetcher=fetcher)
    assert [o.status for o in outcomes] == ["cached", "cached"] and fetcher.calls == []
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "text").rglob("*.txt")}
    assert outcomes[0].train_bytes == cache.find_cached("kjv", tmp_path).split_bytes("train")
    forced = fetch_sources(["kjv"], tmp_path, package_fetcher=fetcher, force=True)
    assert forced[0].status == "fetched" and fetcher.calls == ["sword-text-kjv"]


def test_interrupted_run_resumes_where_it_stopped(tmp_path, make_sword_module,
                                                  make_janeaustenr):
    failing = FakeFetcher(make_sword_module, make_janeaustenr, fail_on="sword-comm-mhcc")
    with pytest.raises(DataError, match="simulated"):
        fetch_sources(["kjv", "mhcc", "scofield"], tmp_path, package_fetcher=failing)
    assert [found.name for found in cache.list_cached(tmp_path)] == ["kjv"]
    assert not list((tmp_path / "text").glob(".mhcc*")), "no half-written folder is left"
    assert list(json.loads((tmp_path / "text" / "index.json").read_text())) == ["kjv"]
    resumed = FakeFetcher(make_sword_module, make_janeaustenr)
    outcomes = fetch_sources(["kjv", "mhcc", "scofield"], tmp_path, package_fetcher=resumed)
    assert [o.status for o in outcomes] == ["cached", "fetched", "fetched"]
    assert resumed.calls == ["sword-comm-mhcc", "sword-comm-scofield"]


def test_tampered_or_outdated_cache_is_redone(tmp_path, fetcher):
    fetch_sources(["kjv"], tmp_path, package_fetcher=fetcher)
    train = tmp_path / "text" / "kjv" / "train.txt"
    train.write_text("truncated")
    assert cache.list_cached(tmp_path) == []
    assert fetch_sources(["kjv"], tmp_path, package_fetcher=fetcher)[0].status == "fetched"
    manifest_path = tmp_path / "text" / "kjv" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["extractor_version"] = EXTRACTOR_VERSION - 1
    manifest_path.write_text(json.dumps(manifest))
    assert fetch_sources(["kjv"], tmp_path, package_fetcher=fetcher)[0].status == "fetched"


def test_unknown_source_names_and_default_order():
    with pytest.raises(DataError, match="unknown text source.*bogus") as caught:
        resolve_source_names(["kjv", "bogus"])
    assert "austen" in str(caught.value)
    assert resolve_source_names(["austen", "kjv"]) == ["kjv", "austen"]
    assert len(resolve_source_names(None)) == 8


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASHEAR_CACHE", str(tmp_path / "env"))
    assert cache.resolve_cache_dir() == tmp_path / "env"
    assert cache.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("LORASHEAR_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache.resolve_cache_dir() == tmp_path / ".cache" / "lorashear"
    with pytest.raises(DataError, match="lorashear data fetch --sources kjv"):
        cache.find_cached("kjv", tmp_path / "empty")


def test_split_tail_is_fixed_and_bounded():
    documents = [f"doc {n}\n" + "line\n" * n for n in range(1, 40)]
    documents = [doc.strip() for doc in documents]
    train, heldout = split_tail(documents, 0.05)
    assert train + heldout != [] and split_tail(documents, 0.05) == (train, heldout)
    total = sum(map(len, documents))
    assert 0.05 * total <= sum(map(len, heldout)) <= 0.1 * total + 10
    single_train, single_heldout = split_tail(["\n".join(f"l{n}" for n in range(100))], 0.05)
    assert single_train[0].endswith("l94") and single_heldout == ["l95\nl96\nl97\nl98\nl99"]
    assert split_tail([], 0.05) == ([], [])


@given(st.lists(st.text(alphabet="ab \n\t.", max_size=40), max_size=8))
def test_cache_layout_round_trips(raw_documents):
    documents = [clean_document(raw) for raw in raw_documents]
    assert split_documents(join_documents(documents)) == [doc for doc in documents if doc]
