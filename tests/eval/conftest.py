"""Fixtures for the evaluators: a synthetic story, a word-level tokenizer trained on it, a tiny
random Llama, and an oracle model that knows the story by heart. No hub, no network."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from types import SimpleNamespace

import pytest
import torch

# The tiny models gain nothing from threads, and the machine's two cores are shared.
torch.set_num_threads(1)

NAMES = ["Anne", "Harriet", "Edmund", "Frederick", "Louisa", "Charles", "Mary", "Walter",
         "Henry", "Julia", "Robert", "Fanny"]
VERBS = ["walked to", "wrote to", "thought of", "spoke of", "looked at", "waited for",
         "laughed at", "returned to", "hurried past", "smiled at"]
PLACES = ["the garden", "the shrubbery", "the parsonage", "the great house", "the village",
          "the library", "the sea wall", "the old church", "the drawing room", "the lane"]
TIMES = ["in the morning", "after dinner", "before the rain", "at noon", "that evening",
         "on Sunday", "with some reluctance", "without a word"]
FEELINGS = ["was glad", "was vexed", "felt uneasy", "seemed tired", "grew cheerful",
            "was silent", "looked pale", "was much surprised"]


def make_story(paragraphs: int = 60, seed: int = 0) -> str:
    """A deterministic prose-like text: paragraphs of 4-8 short sentences."""
    rng = random.Random(seed)
    lines = []
    for _ in range(paragraphs):
        sentences = []
        for _ in range(rng.randint(4, 8)):
            if rng.random() < 0.5:
                sentence = (f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(PLACES)} "
                            f"{rng.choice(TIMES)}.")
            else:
                sentence = (f"{rng.choice(NAMES)} {rng.choice(FEELINGS)}, and "
                            f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(NAMES)}.")
            sentences.append(sentence)
        lines.append(" ".join(sentences))
    return "\n\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def story() -> str:
    return make_story()


@pytest.fixture(scope="session")
def tokenizer(story):
    """A word-level tokenizer over the story's words, wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(
        [story], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]",
                                   unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    """A random 2-layer Llama (hidden 64, GQA 4/2 heads) over the tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=0, eos_token_id=2,
                         bos_token_id=2)
    return LlamaForCausalLM(config).eval()


class OracleLM:
    """A causal LM callable that has memorised a token stream.

    At each position it finds the longest suffix (up to ``order`` tokens) of the input that
    occurs in the stream and puts ``confidence`` of the mass on the tokens that followed it
    there (by count), the rest spread uniformly. On the stream itself it is nearly always
    right; after a context that never led to a token, it gives that token little mass.
    """

    def __init__(self, stream: list[int], vocab_size: int, order: int = 16,
                 confidence: float = 0.98) -> None:
        self.vocab_size, self.order, self.confidence = vocab_size, order, confidence
        self.followers: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        for end in range(1, len(stream)):
            for n in range(1, order + 1):
                if end - n >= 0:
                    self.followers[tuple(stream[end - n:end])][stream[end]] += 1

    def _distribution(self, prefix: list[int]) -> torch.Tensor:
        probs = torch.full((self.vocab_size,), (1 - self.confidence) / self.vocab_size)
        for n in range(min(self.order, len(prefix)), 0, -1):
            counts = self.followers.get(tuple(prefix[-n:]))
            if counts:
                total = sum(counts.values())
                for token, count in counts.items():
                    probs[token] += self.confidence * count / total
                return probs
        return torch.full((self.vocab_size,), 1.0 / self.vocab_size)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        rows = []
        for row in input_ids.tolist():
            rows.append(torch.stack([self._distribution(row[:t + 1]).log()
                                     for t in range(len(row))]))
        return SimpleNamespace(logits=torch.stack(rows))


@pytest.fixture(scope="session")
def oracle(story, tokenizer) -> OracleLM:
    stream = tokenizer(story, add_special_tokens=False)["input_ids"]
    return OracleLM(stream, len(tokenizer))
