"""lm-eval integration: our local task runs through lm-eval offline and agrees with our scorer."""

from __future__ import annotations

import pytest

from lorashear.eval.local_task import build_local_task, score_multiple_choice

pytest.importorskip("lm_eval")

from lorashear.eval.harness import (  # noqa: E402
    HarnessError,
    make_lm,
    run_local_task_with_lm_eval,
)


def test_lm_eval_agrees_with_our_scorer_on_a_transformers_model(tiny_llama, tokenizer, story):
    items = build_local_task(story, n_items=24, seed=5)
    ours = score_multiple_choice(tiny_llama, tokenizer, items, progress=False)
    theirs = run_local_task_with_lm_eval(tiny_llama, tokenizer, items, batch_size=8)
    assert theirs["acc"] == pytest.approx(ours.acc)
    assert theirs["acc_norm"] == pytest.approx(ours.acc_norm)


def test_lm_eval_runs_any_callable_through_callable_lm(oracle, tokenizer, story):
    items = build_local_task(story, n_items=12, seed=5)
    assert type(make_lm(oracle, tokenizer)).__name__ == "CallableLM"
    theirs = run_local_task_with_lm_eval(oracle, tokenizer, items, batch_size=8)
    assert theirs["acc"] == 1.0 and theirs["acc_norm"] == 1.0


def test_callable_lm_rolling_loglikelihood_matches_perplexity(tiny_llama, tokenizer):
    from lm_eval.api.instance import Instance

    lm = make_lm(tiny_llama, tokenizer, backend="callable", max_length=8)
    text = "Anne walked to the garden in the morning . Mary was glad ."
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (total,) = lm.loglikelihood_rolling([request])
    hf = make_lm(tiny_llama, tokenizer, backend="hf", max_length=8)
    (expected,) = hf.loglikelihood_rolling([request], disable_tqdm=True)
    assert total == pytest.approx(expected, rel=1e-4)


def test_an_unknown_backend_is_a_clear_error(tiny_llama, tokenizer):
    with pytest.raises(HarnessError, match="backend"):
        make_lm(tiny_llama, tokenizer, backend="vllm")
