"""A HellaSwag-style multiple-choice task built from held-out local text.

No commonsense benchmark data is reachable offline, so accuracy is measured on a task we build
ourselves: a context of a few consecutive sentences, then four endings, one of which is the
sentence that really follows and three distractors drawn (seeded) from far away in the same
text. Like lm-eval's HellaSwag, each ending is scored by its log-likelihood given the context;
``acc`` picks the highest sum, ``acc_norm`` the highest sum per character of the ending.
Chance is 1 / choices; a model that has lost its grasp of discourse drifts towards it.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from lorashear.errors import DataError
from lorashear.eval._scoring import score_continuations

#: Name of the task in `lorashear eval --tasks` and in lm-eval runs.
LOCAL_TASK_NAME = "local-hellaswag"

# A sentence ends at . ! ? (maybe followed by closing quotes or brackets) before whitespace and
# an opening quote, bracket, capital or digit. Abbreviations are glued back afterwards.
_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)\]]))\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")
_ABBREVIATION = re.compile(
    r"(?:\b(?:Mr|Mrs|Ms|Dr|St|Sr|Jr|Col|Capt|Gen|Rev|Prof|vs|etc|viz|cf|e\.g|i\.e|No|Vol)\.|"
    r"\b[A-Z]\.)$")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def split_paragraphs(text: str) -> list[str]:
    """Split a text into paragraphs: at blank lines in hard-wrapped text (Gutenberg style), at
    every line break in text that keeps one paragraph per line (as our extractors write)."""
    lines = text.count("\n") + 1
    blank_breaks = len(_PARAGRAPH_BREAK.findall(text))
    pieces = _PARAGRAPH_BREAK.split(text) if blank_breaks * 100 >= lines else text.split("\n")
    return [piece for piece in pieces if piece.strip()]


def split_sentences(paragraph: str) -> list[str]:
    """Split one paragraph into sentences, with whitespace collapsed to single spaces."""
    flat = " ".join(paragraph.split())
    if not flat:
        return []
    pieces = _SENTENCE_END.split(flat)
    sentences: list[str] = []
    for piece in pieces:
        if sentences and _ABBREVIATION.search(sentences[-1]):
            sentences[-1] = f"{sentences[-1]} {piece}"
        else:
            sentences.append(piece)
    return sentences


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question: a context and its candidate endings, one of them true."""

    context: str
    """A few consecutive sentences of the text."""
    endings: tuple[str, ...]
    """Candidate next sentences, in presentation order."""
    label: int
    """Index in ``endings`` of the sentence that really follows ``context``."""

    def to_dict(self) -> dict[str, object]:
        return {"context": self.context, "endings": list(self.endings), "label": self.label}


def build_local_task(text: str, *, n_items: int = 200, context_sentences: int = 3,
                     n_choices: int = 4, seed: int = 0, min_words: int = 4,
                     max_words: int = 40, min_distance: int = 50) -> list[MultipleChoiceItem]:
    """Build up to ``n_items`` multiple-choice items from ``text``.

    An item's context is ``context_sentences`` consecutive sentences of one paragraph and its
    true ending the paragraph's next sentence. Distractors are sentences at least
    ``min_distance`` sentences away, of ``min_words``..``max_words`` words (as the true
    ending), preferably of a similar length so that length alone gives little away, and never
    equal to the true ending or to each other. Item positions come from one seeded shuffle and
    each item's distractors from its own seeded generator, so the first items of a larger task
    are exactly the items of a smaller one.
    """
    if n_choices < 2:
        raise DataError(f"a multiple-choice item needs at least 2 choices, got {n_choices}")
    sentences: list[str] = []
    paragraph_of: list[int] = []
    for paragraph_index, paragraph in enumerate(split_paragraphs(text)):
        for sentence in split_sentences(paragraph):
            sentences.append(sentence)
            paragraph_of.append(paragraph_index)

    def usable(index: int) -> bool:
        return min_words <= len(sentences[index].split()) <= max_words

    pool = [index for index in range(len(sentences)) if usable(index)]
    positions = [
        index for index in range(context_sentences, len(sentences))
        if usable(index) and paragraph_of[index - context_sentences] == paragraph_of[index]
    ]
    if not positions or len(pool) < n_choices:
        raise DataError(
            f"the text yields {len(positions)} usable contexts and {len(pool)} usable sentences",
            hint="give a longer held-out text of ordinary prose")
    random.Random(seed).shuffle(positions)
    items: list[MultipleChoiceItem] = []
    for position in positions:
        if len(items) == n_items:
            break
        rng = random.Random(f"{seed}:{position}")
        true_ending = sentences[position]
        far = [index for index in pool if abs(index - position) >= min_distance
               and sentences[index] != true_ending]
        true_words = len(true_ending.split())
        similar = [index for index in far
                   if 0.5 * true_words <= len(sentences[index].split()) <= 2 * true_words]
        candidates = similar if len(set(sentences[i] for i in similar)) >= n_choices - 1 else far
        distractors: list[str] = []
        for index in rng.sample(candidates, len(candidates)):
            if sentences[index] not in distractors:
                distractors.append(sentences[index])
            if len(distractors) == n_choices - 1:
                break
        if len(distractors) < n_choices - 1:
            continue
        label = rng.randrange(n_choices)
        endings = distractors[:label] + [true_ending] + distractors[label:]
        context = " ".join(sentences[position - context_sentences:position])
        items.append(MultipleChoiceItem(context=context, endings=tuple(endings), label=label))
    if not items:
        raise DataError("no item has enough distinct distant distractors",
                        hint="give a longer text or a smaller min_distance")
    return items


@dataclass(frozen=True)
class MultipleChoiceResult:
    """Accuracy of one model on a multiple-choice task."""

    acc: float
    """Share of items whose true ending has the highest log-likelihood."""
    acc_norm: float
    """Share of items whose true ending has the highest log-likelihood per character."""
    acc_stderr: float
    """Standard error of ``acc`` (binomial, as lm-eval reports it)."""
    acc_norm_stderr: float
    items: int
    chance: float
    """Accuracy of guessing: 1 / choices."""

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1.0 - p) / (n - 1)) if n > 1 else float("nan")


def score_multiple_choice(model: object, tokenizer: object, items: Sequence[MultipleChoiceItem],
                          *, batch_size: int = 16, max_length: int = 2048,
                          progress: bool = True) -> MultipleChoiceResult:
    """Score ``items`` with ``model`` by the log-likelihood of each ending after its context.

    Tokenization follows lm-eval: the ending is appended with one space, the whole string is
    tokenized, and the ending's tokens are those after the context's own tokens.
    ``model`` is any callable ``model(input_ids=..., attention_mask=...)`` with ``.logits``.
    """
    if not items:
        raise DataError("no multiple-choice items to score")

    def encode(piece: str) -> list[int]:
        return list(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])

    requests: list[tuple[list[int], list[int]]] = []
    for item in items:
        context_ids = encode(item.context)
        for ending in item.endings:
            whole = encode(f"{item.context} {ending}")
            continuation = whole[len(context_ids):] if whole[:len(context_ids)] == context_ids \
                else []
            # A merge across the boundary would leave no clean split: score the ending alone.
            requests.append((context_ids, continuation or encode(f" {ending}")))
    scores = score_continuations(model, requests, batch_size=batch_size, max_length=max_length,
                                 progress=progress, description=LOCAL_TASK_NAME)
    correct = correct_norm = 0
    cursor = 0
    for item in items:
        item_scores = scores[cursor:cursor + len(item.endings)]
        cursor += len(item.endings)
        sums = [score.loglikelihood for score in item_scores]
        per_char = [value / len(ending)
                    for value, ending in zip(sums, item.endings, strict=True)]
        correct += int(max(range(len(sums)), key=sums.__getitem__) == item.label)
        correct_norm += int(max(range(len(per_char)), key=per_char.__getitem__) == item.label)
    n = len(items)
    acc, acc_norm = correct / n, correct_norm / n
    return MultipleChoiceResult(acc=acc, acc_norm=acc_norm, acc_stderr=_stderr(acc, n),
                                acc_norm_stderr=_stderr(acc_norm, n), items=n,
                                chance=sum(1 / len(item.endings) for item in items) / n)
