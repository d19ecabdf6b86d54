"""Token windows for the passes that read text: calibration data for the data-driven saliency
metrics, the split search and ``knowledge``, and ``lhspg``'s training data.

``data=`` takes what ``recover`` takes (:func:`lorashear.data.spec.load_spec`): one local file
(plain text, JSON/JSONL or Parquet records, or, when the name ends in ``.ids``, whitespace-
separated integer token ids that need no tokenizer: tests and pre-tokenised corpora), the name
of a cached source (``data=austen``), or a YAML data spec of several weighted sources. Text is
tokenised with the tokenizer saved next to the model the module was lowered from (``source``
attribute), an EOS token after each document, as ``recover`` does; instruction records are read
as their rendered text. Each source's stream is cut into its own non-overlapping windows of
``seq_len`` tokens (:class:`TextData`), and batches are drawn from them at random (seeded), so
scores do not depend on the opening pages of a book alone. With several sources the spec's
weights decide how many windows each source gives a calibration draw and which source each
training step reads (:meth:`TextData.training_batch`, the same draw as ``recover``'s static
sampling); with one source the draws are those of a single window pool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorashear.data.loaders import TOKEN_ID_SUFFIX
from lorashear.errors import DataError, PassError
from lorashear.ir.attributes import SourceAttr
from lorashear.ir.core import Module, Param

if TYPE_CHECKING:
    from lorashear.data.spec import SourceSpec


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
        table = op.bound_args().get("weight") if op.kind == "embedding" else None
        if isinstance(table, Param):
            return int(table.type.shape[0])
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


def source_tokenizer(module: Module, what: str, purpose: str):
    """The tokenizer saved next to the module's source model, to tokenise ``what``."""
    source = module.attributes.get("source")
    if not isinstance(source, SourceAttr):
        raise PassError(f"{purpose}: cannot tokenize {what}: the module does not record its source model",
                        hint=f"give {TOKEN_ID_SUFFIX} files of token ids instead")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.model)
    except (OSError, ValueError) as exc:
        raise PassError(f"{purpose}: no tokenizer next to the source model {source.model} to tokenize "
                        f"{what}: {type(exc).__name__}", hint=f"give {TOKEN_ID_SUFFIX} files of token ids") from None


def check_token_ids(module: Module, ids: torch.Tensor, where: str) -> None:
    """Refuse token ids outside the module's embedding table."""
    vocab = vocabulary_size(module)
    if ids.numel() and (int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab)):
        raise PassError(f"{where}: token ids must lie in [0, {vocab}), found {int(ids.min())}.."
                        f"{int(ids.max())}")


def lazy_tokenizer(module: Module, purpose: str) -> Callable[[str], Any]:
    """``get(what)``: the source model's tokenizer, loaded on the first call (to tokenise ``what``)."""
    loaded: list[Any] = []

    def get(what: str) -> Any:
        if not loaded:
            loaded.append(source_tokenizer(module, what, purpose))
        return loaded[0]
    return get


def source_token_ids(module: Module, source: SourceSpec, purpose: str,
                     tokenizer: Callable[[str], Any]) -> torch.Tensor:
    """One data-spec source's token stream: a ``.ids`` file read as ids, anything else loaded as
    documents and tokenised (``tokenizer``: a :func:`lazy_tokenizer`), an EOS after each document."""
    from lorashear.data.blocks import tokenize_documents

    if source.path is not None and source.path.name.endswith(TOKEN_ID_SUFFIX):
        ids = read_token_ids(source.path)
    else:
        try:
            documents = source.load_documents()
        except DataError as exc:
            raise PassError(f"{purpose}: {exc.message}", hint=exc.hint) from None
        ids = tokenize_documents(documents, tokenizer(source.location()))
    check_token_ids(module, ids, f"{purpose}: {source.location()}")
    return ids


@dataclass(frozen=True)
class TextWindows:
    """One source's ``[N, seq_len]`` windows and its sampling weight (normalised over the data)."""

    name: str
    location: str
    weight: float
    windows: torch.Tensor


@dataclass(frozen=True)
class TextData:
    """The windows of every source of a ``data=`` value, read once."""

    data: str
    sources: tuple[TextWindows, ...]

    @property
    def count(self) -> int:
        """Windows in all."""
        return sum(len(s.windows) for s in self.sources)

    def check_batch(self, batch: int, purpose: str) -> None:
        """Every source must fill one batch, since a training step reads one source."""
        for source in self.sources:
            if len(source.windows) < batch:
                raise PassError(f"{purpose}: {self._where(source)} holds {len(source.windows)} windows of "
                                f"{source.windows.shape[1]} tokens: fewer than one batch of {batch}",
                                hint="lower batch or seq-len, or give more text")

    def draw(self, batches: int, batch: int, seed: int) -> torch.Tensor:
        """``batches x batch`` windows drawn at random under ``seed``, ``[batches, batch, seq_len]``;
        each source gives its weight's share of them (largest remainders), none twice."""
        wanted = batches * batch
        if len(self.sources) == 1:
            windows = self.sources[0].windows
            self._check_enough(self.sources[0], wanted, "")
            chosen = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:wanted]
            return windows[chosen].view(batches, batch, windows.shape[1])
        counts = share_counts([s.weight for s in self.sources], wanted)
        drawn = []
        for index, (source, count) in enumerate(zip(self.sources, counts, strict=True)):
            self._check_enough(source, count, f" (its weight's share of {wanted})")
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            drawn.append(source.windows[torch.randperm(len(source.windows), generator=generator)[:count]])
        mixed = torch.cat(drawn)[torch.randperm(wanted, generator=torch.Generator().manual_seed(seed))]
        return mixed.view(batches, batch, mixed.shape[1])

    def _where(self, source: TextWindows) -> str:
        """How an error names ``source``: the data itself when it is the only one."""
        return self.data if len(self.sources) == 1 else f"source {source.name} ({source.location}) of {self.data}"

    def _check_enough(self, source: TextWindows, wanted: int, why: str) -> None:
        if len(source.windows) < wanted:
            raise PassError(f"{self._where(source)} holds {len(source.windows)} windows of {source.windows.shape[1]} "
                            f"tokens, fewer than the {wanted} asked for{why or ' (batches x batch)'}",
                            hint="lower batches, batch or seq-len, or give more text")

    def training_batch(self, batch: int, seed: int, step: int) -> torch.Tensor:
        """The windows of training step ``step``, a function of the step alone (resumable): the
        step's source drawn with the weights (:func:`source_for_step`), then its windows
        (:func:`batch_for_step`, seeded by ``seed`` plus the source's index)."""
        if len(self.sources) == 1:
            return batch_for_step(self.sources[0].windows, batch, seed, step)
        names = [s.name for s in self.sources]
        index = names.index(source_for_step(names, {s.name: s.weight for s in self.sources}, seed, step))
        return batch_for_step(self.sources[index].windows, batch, seed + index, step)


def share_counts(weights: list[float], total: int) -> list[int]:
    """``total`` split in proportion to ``weights``: floors, then the largest remainders."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[:total - sum(counts)]:
        counts[i] += 1
    return counts


def batch_for_step(windows: torch.Tensor, batch: int, seed: int, step: int) -> torch.Tensor:
    """The windows of training step ``step``: epochs over a seeded permutation, fresh each
    epoch. A function of the step alone, so a resumed run sees exactly the same data."""
    per_epoch = len(windows) // batch
    epoch, index = divmod(step, per_epoch)
    perm = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return windows[perm[index * batch:(index + 1) * batch]]


def source_for_step(names: list[str], weights: dict[str, float], seed: int, step: int) -> str:
    """The source of step ``step``: drawn with ``weights``, a function of seed, step and weights."""
    probabilities = torch.tensor([weights[n] for n in names], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step + 7_919)
    return names[int(torch.multinomial(probabilities, 1, generator=generator))]


def text_data(module: Module, data: str, seq_len: int, purpose: str) -> TextData:
    """Every source of ``data`` (a file, a cached source name or a YAML spec) cut into
    non-overlapping ``seq_len`` windows. ``purpose`` names what needs the data (``"metric
    'taylor'"``, ``"lhspg"``) in error messages."""
    from lorashear.data.spec import load_spec

    if not data:
        raise PassError(f"{purpose} needs calibration text: data=PATH (a text, JSON or Parquet file, a "
                        f"{TOKEN_ID_SUFFIX} file of token ids, a cached source name or a YAML data spec)")
    if seq_len < 2:
        raise PassError(f"{purpose}: need seq-len >= 2, got {seq_len}")
    check_seq_len(module, seq_len, purpose)
    try:
        spec = load_spec(data)
    except DataError as exc:
        raise PassError(f"{purpose}: {exc.message}", hint=exc.hint) from None
    weights = spec.weights()
    tokenizer = lazy_tokenizer(module, purpose)
    sources = []
    for source in spec.sources:
        ids = source_token_ids(module, source, purpose, tokenizer)
        count = ids.numel() // seq_len
        if count == 0:
            raise PassError(f"{purpose}: source {source.name} ({source.location()}) holds {ids.numel()} "
                            f"tokens, not one window of {seq_len}", hint="lower seq-len or give more text")
        sources.append(TextWindows(source.name, source.location(), weights[source.name],
                                   ids[:count * seq_len].view(count, seq_len)))
    return TextData(data, tuple(sources))


def calibration_batches(module: Module, options: CalibrationOptions, purpose: str) -> torch.Tensor:
    """A ``[batches, batch, seq_len]`` tensor of token ids drawn from ``options.data``.

    ``purpose`` names what needs the data (``"metric 'taylor'"``) in error messages.
    """
    if min(options.batches, options.batch) < 1:
        raise PassError(f"{purpose}: need batches >= 1 and batch >= 1")
    return text_data(module, options.data, options.seq_len, purpose).draw(
        options.batches, options.batch, options.seed)
