"""Tokenising and packing into fixed-length blocks with a tokenizer built in code."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorashear.data.blocks import (
    IGNORE_INDEX,
    check_seq_len,
    encode_instructions,
    model_max_length,
    pack_blocks,
    pack_sources,
    split_into_pieces,
    tokenize_documents,
)
from lorashear.data.loaders import InstructionRecord
from lorashear.errors import DataError

DOCUMENTS = ["in the beginning god created the heaven and the earth " * 6,
             "it is a truth universally acknowledged that a single man " * 5]


def test_blocks_have_shape_dtype_and_eos(tiny_tokenizer):
    blocks = pack_blocks(DOCUMENTS, tiny_tokenizer, seq_len=8, shuffle=False)
    stream = tokenize_documents(DOCUMENTS, tiny_tokenizer)
    assert blocks.dtype == torch.int64 and blocks.shape == (stream.numel() // 8, 8)
    assert torch.equal(blocks.flatten(), stream[: blocks.numel()])
    eos = tiny_tokenizer.eos_token_id
    assert (stream == eos).sum() == 2 and stream[-1] == eos


def test_packing_is_deterministic_given_the_seed(tiny_tokenizer):
    first = pack_blocks(DOCUMENTS, tiny_tokenizer, seq_len=4, seed=7)
    again = pack_blocks(DOCUMENTS, tiny_tokenizer, seq_len=4, seed=7)
    other = pack_blocks(DOCUMENTS, tiny_tokenizer, seq_len=4, seed=8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, other.tolist()))
    assert pack_blocks(DOCUMENTS, tiny_tokenizer, seq_len=4, seed=7, max_blocks=3).shape == (3, 4)


def test_seq_len_checks(tiny_tokenizer):
    with pytest.raises(DataError, match="exceeds the model's maximum of 16"):
        pack_blocks(DOCUMENTS, tiny_tokenizer, seq_len=32, max_length=16)
    with pytest.raises(DataError, match="fewer than one block"):
        pack_blocks(["god created"], tiny_tokenizer, seq_len=64)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(DataError, match="positive integer"):
            check_seq_len(bad)

    class Config:
        max_position_embeddings = 2048

    assert model_max_length(Config()) == 2048 and model_max_length(object()) is None


def test_pack_sources_names_the_failing_source(tiny_tokenizer):
    packed = pack_sources({"bible": DOCUMENTS[:1], "novel": DOCUMENTS[1:]}, tiny_tokenizer, 4)
    assert set(packed) == {"bible", "novel"}
    with pytest.raises(DataError, match="source tiny: "):
        pack_sources({"bible": DOCUMENTS, "tiny": ["god"]}, tiny_tokenizer, 16)


@settings(max_examples=40, deadline=None)
@given(lines=st.lists(st.text(alphabet="ab \t", max_size=30), max_size=40),
       piece_chars=st.integers(1, 50))
def test_pieces_cut_at_line_starts_and_rejoin(lines, piece_chars):
    document = "\n".join(lines)
    pieces = split_into_pieces(document, piece_chars)
    assert "".join(pieces) == document
    for piece in pieces[:-1]:
        assert piece.endswith("\n")


def test_long_documents_tokenise_like_short_ones(tiny_tokenizer, monkeypatch):
    document = "\n".join(["the kernel documentation describes the driver model"] * 50)
    whole = tokenize_documents([document], tiny_tokenizer)
    monkeypatch.setattr("lorashear.data.blocks.PIECE_CHARS", 60)
    assert torch.equal(tokenize_documents([document], tiny_tokenizer, batch_pieces=3), whole)


def test_instruction_encoding_masks_the_prompt(tiny_tokenizer):
    records = [InstructionRecord("write a response", "", "the earth"),
               InstructionRecord("write " * 40, "", "god")]
    batch = encode_instructions(records, tiny_tokenizer, seq_len=48)
    assert batch.input_ids.shape == batch.labels.shape == (1, 48) and batch.dropped == 1
    supervised = batch.labels[0][batch.labels[0] != IGNORE_INDEX]
    expected = tiny_tokenizer("the earth", add_special_tokens=False)["input_ids"]
    assert supervised.tolist() == expected + [tiny_tokenizer.eos_token_id]
    length = int(batch.attention_mask[0].sum())
    assert torch.equal(batch.labels[0, length - len(supervised):length], supervised)
    assert (batch.input_ids[0, length:] == tiny_tokenizer.pad_token_id).all()
    with pytest.raises(DataError, match="chat template"):
        encode_instructions(records, tiny_tokenizer, seq_len=48, prompt_style="chat")
    with pytest.raises(DataError, match="every instruction prompt"):
        encode_instructions(records[1:], tiny_tokenizer, seq_len=48)
