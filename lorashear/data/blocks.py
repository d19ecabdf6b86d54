"""Tokenise documents and pack them into fixed-length training blocks.

Language-model passes (``lhspg``, ``recover``) train on ``[N, seq_len]`` int64 blocks: every
document is tokenised, followed by the end-of-sequence token, the token stream is cut into
consecutive blocks (the incomplete tail is dropped) and the block order is shuffled with a
seeded generator, so the same inputs and seed always give the same tensor. Instruction records
are encoded separately, one example a row, with the prompt masked out of the labels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lorashear.data.loaders import InstructionRecord
from lorashear.errors import DataError

#: Label value ignored by the cross-entropy loss (the prompt part of instruction examples).
IGNORE_INDEX = -100
#: Documents are tokenised in pieces of about this many characters (keeps memory flat).
PIECE_CHARS = 1 << 16
_PIECE_BOUNDARY = re.compile(r"\n(?=\S)")


def model_max_length(config: Any) -> int | None:
    """The longest sequence a model supports, from its config (``max_position_embeddings``)."""
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(seq_len: int, max_length: int | None = None) -> None:
    """Reject a block length that is not positive or exceeds the model's maximum."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"seq-len must be a positive integer, not {seq_len!r}")
    if max_length is not None and seq_len > max_length:
        raise DataError(f"seq-len {seq_len} exceeds the model's maximum of {max_length} tokens",
                        hint=f"use seq-len <= {max_length}")


def split_into_pieces(document: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """Cut a long document into pieces at line starts, so tokenising it needs little memory.

    Cuts fall just after a newline that is followed by a non-space character, where byte-level
    BPE tokenizers (GPT-2, SmolLM2) start a new token anyway, so their tokens match those of
    the whole text; tokenizers that add a prefix space may differ at the few cut points.
    """
    if len(document) <= piece_chars:
        return [document]
    pieces = []
    start = 0
    while len(document) - start > piece_chars:
        boundary = _PIECE_BOUNDARY.search(document, start + piece_chars)
        if boundary is None:
            break
        pieces.append(document[start:boundary.end()])
        start = boundary.end()
    pieces.append(document[start:])
    return pieces


def tokenize_documents(documents: Sequence[str], tokenizer: Any, *, add_eos: bool = True,
                       progress: bool = False, batch_pieces: int = 64) -> torch.Tensor:
    """Tokenise ``documents`` into one 1-D int64 stream, an EOS token after each document.

    ``tokenizer`` is a Hugging Face tokenizer (anything called as ``tokenizer(texts,
    add_special_tokens=False)`` returning ``input_ids``); special tokens other than EOS are
    not added, since blocks start mid-text anyway.
    """
    eos = getattr(tokenizer, "eos_token_id", None) if add_eos else None
    pieces: list[tuple[str, bool]] = []
    for document in documents:
        parts = split_into_pieces(document)
        pieces.extend((part, index == len(parts) - 1) for index, part in enumerate(parts))
    chunks: list[np.ndarray] = []
    for start in tqdm(range(0, len(pieces), batch_pieces), desc="tokenising", unit="batch",
                      disable=not progress, leave=False):
        batch = pieces[start:start + batch_pieces]
        encoded = tokenizer([text for text, _ in batch], add_special_tokens=False)["input_ids"]
        for ids, (_, ends_document) in zip(encoded, batch, strict=True):
            chunks.append(np.asarray(ids, dtype=np.int64))
            if ends_document and eos is not None:
                chunks.append(np.asarray([eos], dtype=np.int64))
    if not chunks:
        return torch.zeros(0, dtype=torch.int64)
    return torch.from_numpy(np.concatenate(chunks))


def pack_blocks(documents: Sequence[str], tokenizer: Any, seq_len: int, *, seed: int = 0,
                max_length: int | None = None, shuffle: bool = True, add_eos: bool = True,
                max_blocks: int | None = None, progress: bool = False) -> torch.Tensor:
    """Pack documents into an ``[N, seq_len]`` int64 tensor of training blocks.

    Deterministic: the same documents, tokenizer and ``seed`` give the same tensor.
    ``max_length`` is the model's limit (see :func:`model_max_length`); ``max_blocks`` keeps
    only the first blocks after shuffling, for quick runs.
    """
    check_seq_len(seq_len, max_length)
    stream = tokenize_documents(documents, tokenizer, add_eos=add_eos, progress=progress)
    count = stream.numel() // seq_len
    if count == 0:
        raise DataError(f"the data gives {stream.numel()} tokens, fewer than one block of "
                        f"seq-len {seq_len}", hint="use more text or a shorter seq-len")
    blocks = stream[: count * seq_len].view(count, seq_len)
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        blocks = blocks[torch.randperm(count, generator=generator)]
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    return blocks.contiguous()


def pack_sources(documents_by_source: Mapping[str, Sequence[str]], tokenizer: Any,
                 seq_len: int, *, seed: int = 0, max_length: int | None = None,
                 progress: bool = False) -> dict[str, torch.Tensor]:
    """Pack each source separately (per-source sampling needs them apart); errors name it."""
    packed = {}
    for index, (name, documents) in enumerate(documents_by_source.items()):
        try:
            packed[name] = pack_blocks(documents, tokenizer, seq_len, seed=seed + index,
                                       max_length=max_length, progress=progress)
        except DataError as exc:
            raise DataError(f"source {name}: {exc.message}", hint=exc.hint) from exc
    return packed


@dataclass(frozen=True)
class InstructionBatch:
    """Instruction examples as padded rows; labels are IGNORE_INDEX outside the response."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    dropped: int = 0
    """Examples left out because their prompt alone fills ``seq_len``."""


def encode_instructions(records: Sequence[InstructionRecord], tokenizer: Any, seq_len: int, *,
                        prompt_style: str = "alpaca", max_length: int | None = None
                        ) -> InstructionBatch:
    """Encode instruction records one per row: prompt + response + EOS, right-padded.

    ``prompt_style`` is ``alpaca`` (the Alpaca template) or ``chat`` (the tokenizer's chat
    template, which instruct models were tuned with). Loss falls on the response only.
    """
    check_seq_len(seq_len, max_length)
    if prompt_style not in ("alpaca", "chat"):
        raise DataError(f"unknown prompt style {prompt_style!r}", hint="use alpaca or chat")
    if prompt_style == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError("prompt style 'chat' needs a tokenizer with a chat template",
                        hint="use prompt style alpaca")
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    rows, label_rows, dropped = [], [], 0
    for record in records:
        if prompt_style == "chat":
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": record.user_message()}], tokenize=False,
                add_generation_prompt=True)
        else:
            prompt = record.alpaca_prompt()
        prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        response_ids = list(tokenizer(record.output, add_special_tokens=False)["input_ids"])
        if eos is not None:
            response_ids.append(eos)
        if len(prompt_ids) >= seq_len:
            dropped += 1
            continue
        ids = (prompt_ids + response_ids)[:seq_len]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:seq_len]
        rows.append(ids)
        label_rows.append(labels)
    if not rows:
        raise DataError(f"every instruction prompt is at least seq-len {seq_len} tokens long",
                        hint="use a longer seq-len")
    input_ids = torch.full((len(rows), seq_len), pad, dtype=torch.int64)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.int64)
    for row, (ids, row_labels) in enumerate(zip(rows, label_rows, strict=True)):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        labels[row, :len(row_labels)] = torch.tensor(row_labels, dtype=torch.int64)
        attention_mask[row, :len(ids)] = 1
    return InstructionBatch(input_ids, labels, attention_mask, dropped)
