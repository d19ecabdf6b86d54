"""SWORD module reading and OSIS/ThML-to-text conversion, on modules written by the tests."""

from __future__ import annotations

import html

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorashear.data.sword import find_sword_modules, markup_to_text, read_sword_documents
from lorashear.errors import DataError

GENESIS = [
    '<div type="book" osisID="Gen" sID="b1"/><title type="main">The First Book of Moses</title>'
    '<chapter n="1" sID="Gen.1"/><div type="x-p" sID="p1"/>In the <w lemma="strong:H7225">'
    "beginning</w> God created the heaven and the earth.",
    "And the earth was without form, and void<note placement=\"foot\"><reference>1.2 </reference>"
    "Heb. emptiness</note>; and darkness &amp; deep.",
    '<div eID="p1" type="x-p"/><div type="x-p" sID="p2"/>And God said, Let there be light.',
]
EXODUS = ["Now these <transChange type=\"added\">are</transChange> the names.",
          "Reuben, Simeon, Levi, and Judah,"]
MATTHEW = ['<q marker="" who="Jesus">Blessed are the poor in spirit:</q>']


def test_markup_to_text_drops_notes_and_tags():
    text = markup_to_text('<p>One <note type="x-ref">skip <b>me</b></note>two &lt;three&gt;'
                          '<lb/>four<cell>five</cell></p><!-- gone -->')
    # Escaped tags are dropped too: some modules (Scofield) carry "&lt;/ol&gt;" as text.
    assert text == "One two\nfour five"


def test_markup_to_text_block_elements_become_lines():
    markup = ('<title>Psalm 1</title><lg><l level="1">Blessed is the man</l>'
              '<l level="1">that walketh not</l></lg><div type="x-p" sID="a"/>Prose here.')
    assert markup_to_text(markup) == "Psalm 1\nBlessed is the man\nthat walketh not\nProse here."


def test_markup_to_text_cleans_module_leftovers():
    text = markup_to_text("by my name \\nd JEHOVAH was I ¶ And God said&nbsp;so, ver. #(18).")
    assert text == "by my name JEHOVAH was I\nAnd God said so, ver. (18)."


def test_reads_ztext_module_book_by_book(tmp_path, make_sword_module):
    make_sword_module(tmp_path, "KJV", {"ot": [GENESIS, EXODUS], "nt": [MATTHEW]})
    modules = find_sword_modules(tmp_path)
    assert [module.name for module in modules] == ["KJV"]
    documents = read_sword_documents(modules[0])
    assert documents == [
        "The First Book of Moses\nIn the beginning God created the heaven and the earth. And the "
        "earth was without form, and void; and darkness & deep.\nAnd God said, Let there be "
        "light.",
        "Now these are the names. Reuben, Simeon, Levi, and Judah,",
        "Blessed are the poor in spirit:",
    ]


@pytest.mark.parametrize("driver, entry_size", [("zCom4", 12), ("zCom4", 10), ("zCom", 10)])
def test_commentary_links_are_read_once(tmp_path, make_sword_module, driver, entry_size):
    # zCom4 normally has 32-bit verse sizes, but MHCC declares zCom4 with 16-bit ones.
    make_sword_module(tmp_path, "MHCC", {"ot": [EXODUS]}, driver=driver, entry_size=entry_size,
                      block_letter="c", link_repeats=True)
    (module,) = find_sword_modules(tmp_path)
    assert read_sword_documents(module) == ["Now these are the names. Reuben, Simeon, Levi, "
                                            "and Judah,"]


def test_empty_testament_is_skipped(tmp_path, make_sword_module):
    make_sword_module(tmp_path, "TDavid", {"ot": [EXODUS], "nt": []}, driver="zCom4",
                      entry_size=12)
    (module,) = find_sword_modules(tmp_path)
    assert len(read_sword_documents(module)) == 1


def test_missing_verse_index_falls_back_to_whole_blocks(tmp_path, make_sword_module):
    sword = make_sword_module(tmp_path, "WEB", {"ot": [EXODUS]})
    next(sword.rglob("ot.bzv")).unlink()
    (module,) = find_sword_modules(tmp_path)
    assert read_sword_documents(module) == ["Now these are the names.Reuben, Simeon, Levi, and "
                                            "Judah,"]


def test_encrypted_and_unsupported_modules_are_refused(tmp_path, make_sword_module):
    make_sword_module(tmp_path / "a", "Locked", {"ot": [EXODUS]}, conf_extra="CipherKey=abc\n")
    with pytest.raises(DataError, match="encrypted"):
        find_sword_modules(tmp_path / "a")
    make_sword_module(tmp_path / "b", "Lzss", {"ot": [EXODUS]},
                      conf_extra="CompressType=LZSS\n")
    # The first CompressType line (ZIP) wins, as in SWORD; a module saying LZSS first fails.
    conf = next((tmp_path / "b").rglob("*.conf"))
    conf.write_text(conf.read_text().replace("CompressType=ZIP", "CompressType=LZSS"))
    with pytest.raises(DataError, match="LZSS"):
        find_sword_modules(tmp_path / "b")
    with pytest.raises(DataError, match="no SWORD module"):
        find_sword_modules(tmp_path / "empty")


def test_corrupt_block_is_a_data_error(tmp_path, make_sword_module):
    sword = make_sword_module(tmp_path, "KJV", {"ot": [EXODUS]})
    data = next(sword.rglob("ot.bzz"))
    data.write_bytes(b"\x00" * data.stat().st_size)
    (module,) = find_sword_modules(tmp_path)
    with pytest.raises(DataError, match="not zlib"):
        read_sword_documents(module)


# No ">" so that unescaped text never looks like a leftover tag (those are removed on purpose).
_WORDS = st.text(alphabet="abcdefghij<&\"' ", min_size=1, max_size=12).filter(str.strip)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(books=st.lists(st.lists(st.lists(_WORDS, min_size=1, max_size=4), min_size=1,
                               max_size=4), min_size=1, max_size=3))
def test_round_trip_of_escaped_verses(tmp_path_factory, make_sword_module, books):
    root = tmp_path_factory.mktemp("sword")
    markup_books = [[f'<div type="x-p" sID="x"/>{html.escape(" ".join(words))}'
                     for words in verses] for verses in books]
    make_sword_module(root, "Prop", {"ot": markup_books})
    (module,) = find_sword_modules(root)
    expected = ["\n".join(" ".join(" ".join(words).split()) for words in verses)
                for verses in books]
    assert read_sword_documents(module) == [doc for doc in expected if doc]
