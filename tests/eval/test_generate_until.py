"""lm-eval generation tasks (``generate_until``) on lorashear's emitted models: the same text as
lm-eval's own HF backend on the transformers model, stop strings and ``max_gen_toks`` obeyed,
and a generation task scored end to end through lm-eval, offline."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")

from lorashear.eval.harness import HarnessError, make_lm, run_lm_eval  # noqa: E402

CONTEXTS = ("Anne walked to the garden", "Mary was glad , and", "Henry looked at")


@pytest.fixture(scope="module")
def ir_model(tiny_llama):
    from lorashear.frontend.lower import lower
    from lorashear.runtime.executor import emit_torch

    return emit_torch(lower(tiny_llama))


def _requests(gen_kwargs: dict) -> list:
    return [SimpleNamespace(args=(context, dict(gen_kwargs))) for context in CONTEXTS]


def test_same_text_as_lm_evals_hf_backend(ir_model, tiny_llama, tokenizer):
    kwargs = {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}
    ours = make_lm(ir_model, tokenizer, backend="callable").generate_until(_requests(kwargs), True)
    theirs = make_lm(tiny_llama, tokenizer, backend="hf", batch_size=1).generate_until(
        _requests(kwargs), True)
    assert ours == theirs
    assert all(0 < len(text.split()) <= 8 for text in ours)  # max_gen_toks words, or EOS sooner


def test_stop_strings_and_max_gen_toks(ir_model, tokenizer):
    lm = make_lm(ir_model, tokenizer, backend="callable")
    (full,) = lm.generate_until([SimpleNamespace(args=(CONTEXTS[1], {"until": [], "max_gen_toks": 10}))],
                                True)
    words = full.split()
    assert len(words) == 10
    stop = f" {words[3]}"
    want = full.split(stop)[0]
    (cut,) = lm.generate_until([SimpleNamespace(args=(CONTEXTS[1], {"until": [stop], "max_gen_toks": 10}))],
                               True)
    assert cut == want and len(cut) < len(full)
    (short,) = lm.generate_until([SimpleNamespace(args=(CONTEXTS[1], {"until": "\n", "max_gen_toks": 4}))],
                                 True)
    assert short.split() == words[:4]


def test_a_generation_task_through_lm_eval(ir_model, tokenizer):
    lm = make_lm(ir_model, tokenizer, backend="callable")
    kwargs = {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}
    answers = lm.generate_until(_requests(kwargs), True)
    rows = [{"question": c, "answer": a if i else "not what it says"}
            for i, (c, a) in enumerate(zip(CONTEXTS, answers, strict=True))]

    def load(**_):
        import datasets

        return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

    task = {"task": "lorashear_tiny_generation", "custom_dataset": load, "output_type": "generate_until",
            "test_split": "test", "doc_to_text": "question", "doc_to_target": "answer",
            "target_delimiter": "", "generation_kwargs": kwargs,
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0}}
    results = run_lm_eval(ir_model, tokenizer, [task], backend="callable")
    assert results["lorashear_tiny_generation"]["exact_match"] == pytest.approx(2 / 3)


def test_a_model_without_generate_is_a_clear_error(oracle, tokenizer):
    lm = make_lm(oracle, tokenizer, backend="callable")
    with pytest.raises(HarnessError, match="generate"):
        lm.generate_until(_requests({"until": ["\n"]}), True)
