"""Perplexity over non-overlapping windows: the number itself, the windows, the budget."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lorashear.eval._scoring import EvaluationError
from lorashear.eval.perplexity import perplexity, split_windows, text_perplexity, tokenize_text


def test_split_windows_drops_the_tail_and_respects_the_budget():
    ids = list(range(1000))
    windows = split_windows(ids, 128)
    assert windows.shape == (7, 128)
    assert windows[1, 0].item() == 128 and windows[-1, -1].item() == 7 * 128 - 1
    assert split_windows(ids, 128, max_windows=3).shape == (3, 128)
    assert split_windows(ids, 128, max_windows=50).shape == (7, 128)
    spread = split_windows(ids, 128, max_windows=3, spread=True)
    assert spread[:, 0].tolist() == [0, 2 * 128, 4 * 128]


def test_too_short_a_text_is_a_clear_error():
    with pytest.raises(EvaluationError, match="fewer than one window"):
        split_windows(list(range(100)), 128)
    with pytest.raises(EvaluationError):
        split_windows(list(range(100)), 1)
    with pytest.raises(EvaluationError):
        split_windows(list(range(1000)), 128, max_windows=0)


def test_perplexity_is_exp_of_the_mean_token_nll(tiny_llama, tokenizer, story):
    ids = tokenize_text(tokenizer, story)
    result = perplexity(tiny_llama, ids, window_length=64, max_windows=5, batch_size=2,
                        progress=False)
    nlls = []
    with torch.no_grad():
        for window in range(5):
            chunk = torch.tensor(ids[window * 64:(window + 1) * 64])[None]
            log_probs = F.log_softmax(tiny_llama(input_ids=chunk).logits[0], dim=-1)
            nlls += [-log_probs[t, chunk[0, t + 1]].item() for t in range(63)]
    assert result.windows == 5 and result.tokens == 5 * 63 and result.window_length == 64
    assert result.mean_nll == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


def test_batch_size_does_not_change_the_result(tiny_llama, tokenizer, story):
    ids = tokenize_text(tokenizer, story)
    one = perplexity(tiny_llama, ids, window_length=32, max_windows=6, batch_size=1,
                     progress=False)
    four = perplexity(tiny_llama, ids, window_length=32, max_windows=6, batch_size=4,
                      progress=False)
    assert one.ppl == pytest.approx(four.ppl, rel=1e-5)


def test_a_model_that_knows_the_text_beats_a_random_one(tiny_llama, oracle, tokenizer, story):
    random_model = text_perplexity(tiny_llama, tokenizer, story, window_length=64,
                                   max_windows=4, progress=False)
    knowing = text_perplexity(oracle, tokenizer, story, window_length=64, max_windows=4,
                              progress=False)
    assert knowing.ppl < 2.0 < len(tokenizer) / 4 < random_model.ppl


def test_the_budget_tokenizes_only_a_prefix_consistently(tokenizer, story):
    whole = tokenize_text(tokenizer, story)
    prefix = tokenize_text(tokenizer, story, min_tokens=100)
    assert len(prefix) > 100 and whole[:len(prefix)] == prefix


def test_evaluation_restores_training_mode(tiny_llama, tokenizer, story):
    tiny_llama.train()
    try:
        text_perplexity(tiny_llama, tokenizer, story, window_length=32, max_windows=1,
                        progress=False)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()


def test_a_model_without_logits_is_a_clear_error(tokenizer, story):
    def no_logits(input_ids, attention_mask):
        return {"hidden": input_ids}

    with pytest.raises(EvaluationError, match="logits"):
        text_perplexity(no_logits, tokenizer, story, window_length=32, max_windows=1,
                        progress=False)
