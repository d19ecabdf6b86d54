"""Token windows from one local file: calibration data for the data-driven saliency metrics
and the split search, and ``lhspg``'s training data (:func:`token_windows` reads a file once;
:func:`draw_batches` draws calibration batches from windows already read).

``data=`` names either a plain text file, tokenised with the tokenizer saved next to the model
the module was lowered from (``source`` attribute), or, when the name ends in ``.ids``, a file
of whitespace-separated integer token ids (no tokenizer needed: tests and pre-tokenised
corpora). The token stream is cut into non-overlapping windows of ``seq_len`` tokens and
``batches x batch`` of them are drawn at random (seeded), so scores do not depend on the
opening pages of a book alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorashear.errors import PassError
from lorashear.ir.attributes import SourceAttr
from lorashear.ir.core import Module, Param

#: Suffix of a data file read as token ids instead of text.
TOKEN_ID_SUFFIX = ".ids"


@dataclass(frozen=True)
class CalibrationOptions:
    """Where calibration windows come from and how many: ``batches`` x ``batch`` x ``seq_len``."""

    data: str
    batches: int
    batch: int
    seq_len: int
    seed: int


def vocabulary_size(module: Module) -> int | None:
    """Rows of the token embedding (the first ``embedding`` op's table), if the graph has one."""
    for op in module.graph.ops:
        if op.kind == "embedding" and op.args and isinstance(op.args[0], Param):
            return int(op.args[0].type.shape[0])
    return None


def model_max_length(module: Module) -> int | None:
    """The longest sequence the module's model takes, from its HF config (``config`` attribute:
    ``max_position_embeddings`` or its older names, also inside a ``text_config``)."""
    config = getattr(module.attributes.get("config"), "config", None)
    for table in (config, config.get("text_config") if isinstance(config, dict) else None):
        if not isinstance(table, dict):
            continue
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = table.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_seq_len(module: Module, seq_len: int, who: str) -> int | None:
    """Refuse a ``seq-len`` above the model's maximum before any data is read or trained on
    (positions past it have no meaning, and RoPE models degrade silently); return the maximum."""
    limit = model_max_length(module)
    if limit is not None and seq_len > limit:
        raise PassError(f"{who}: seq-len {seq_len} exceeds the model's maximum of {limit} tokens "
                        "(max_position_embeddings)", hint=f"use seq-len <= {limit}")
    return limit


def read_token_ids(path: Path) -> torch.Tensor:
    """All integers of a ``.ids`` file, in order, as one long tensor."""
    try:
        ids = [int(word) for word in path.read_text().split()]
    except ValueError as exc:
        raise PassError(f"{path} must hold whitespace-separated integer token ids: {exc}") from None
    return torch.tensor(ids, dtype=torch.long)


def tokenize_text_file(module: Module, path: Path) -> torch.Tensor:
    """Token ids of a text file, with the tokenizer of the module's source model directory."""
    source = module.attributes.get("source")
    if not isinstance(source, SourceAttr):
        raise PassError(f"cannot tokenize {path}: the module does not record its source model",
                        hint=f"give a {TOKEN_ID_SUFFIX} file of token ids instead")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.model)
    except (OSError, ValueError) as exc:
        raise PassError(f"no tokenizer next to the source model {source.model} to tokenize {path}: "
                        f"{type(exc).__name__}", hint=f"give a {TOKEN_ID_SUFFIX} file of token ids") from None
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(module: Module, data: str, seq_len: int, purpose: str) -> torch.Tensor:
    """All non-overlapping ``seq_len`` windows of the data file ``data``, ``[N, seq_len]``.

    A text file is tokenised with the source model's tokenizer, a ``.ids`` file read as token
    ids; the ids must index the module's embedding. ``purpose`` names what needs the data
    (``"metric 'taylor'"``, ``"lhspg"``) in error messages.
    """
    if not data:
        raise PassError(f"{purpose} needs calibration text: data=PATH (a text file, or a "
                        f"{TOKEN_ID_SUFFIX} file of token ids)")
    path = Path(data).expanduser()
    if not path.is_file():
        raise PassError(f"{purpose}: data file {path} does not exist")
    if seq_len < 2:
        raise PassError(f"{purpose}: need seq-len >= 2, got {seq_len}")
    check_seq_len(module, seq_len, purpose)
    ids = read_token_ids(path) if path.name.endswith(TOKEN_ID_SUFFIX) else tokenize_text_file(module, path)
    vocab = vocabulary_size(module)
    if ids.numel() and (int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab)):
        raise PassError(f"{path}: token ids must lie in [0, {vocab}), found {int(ids.min())}.."
                        f"{int(ids.max())}")
    count = ids.numel() // seq_len
    return ids[:count * seq_len].view(count, seq_len)


def draw_batches(windows: torch.Tensor, batches: int, batch: int, seed: int, data: str) -> torch.Tensor:
    """``batches x batch`` of ``windows`` (``[N, seq_len]``, from :func:`token_windows` of the
    file ``data``), drawn at random under ``seed``, as ``[batches, batch, seq_len]``."""
    wanted = batches * batch
    available, seq_len = windows.shape
    if available < wanted:
        raise PassError(f"{data} holds {available} windows of {seq_len} tokens, fewer than the "
                        f"{wanted} asked for (batches x batch)",
                        hint="lower batches, batch or seq-len, or give more text")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:wanted]
    return windows[chosen].view(batches, batch, seq_len)


def calibration_batches(module: Module, options: CalibrationOptions, purpose: str) -> torch.Tensor:
    """A ``[batches, batch, seq_len]`` tensor of token ids drawn from ``options.data``.

    ``purpose`` names what needs the data (``"metric 'taylor'"``) in error messages.
    """
    if min(options.batches, options.batch) < 1:
        raise PassError(f"{purpose}: need batches >= 1 and batch >= 1")
    windows = token_windows(module, options.data, options.seq_len, purpose)
    return draw_batches(windows, options.batches, options.batch, options.seed, options.data)
