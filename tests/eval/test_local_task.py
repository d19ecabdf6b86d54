"""The local HellaSwag-style task: how items are built, and how they are scored."""

from __future__ import annotations

import pytest

from lorashear.errors import DataError
from lorashear.eval.local_task import build_local_task, score_multiple_choice, split_sentences


def test_sentences_split_at_ends_but_not_after_titles():
    text = 'Mr. Elliot came in. "Is it you?" said Anne. She smiled! Dr. J. Smith left.'
    assert split_sentences(text) == ["Mr. Elliot came in.", '"Is it you?" said Anne.',
                                     "She smiled!", "Dr. J. Smith left."]


def test_items_hold_the_true_next_sentence_and_distinct_distractors(story):
    items = build_local_task(story, n_items=40, seed=3)
    assert len(items) == 40
    for item in items:
        assert len(item.endings) == 4 and len(set(item.endings)) == 4
        true_ending = item.endings[item.label]
        assert f"{item.context} {true_ending}" in " ".join(story.split())
        for index, ending in enumerate(item.endings):
            if index != item.label:
                assert f"{item.context} {ending}" not in " ".join(story.split())


def test_items_are_seeded_and_a_larger_task_extends_a_smaller_one(story):
    small = build_local_task(story, n_items=10, seed=1)
    assert build_local_task(story, n_items=10, seed=1) == small
    assert build_local_task(story, n_items=25, seed=1)[:10] == small
    assert build_local_task(story, n_items=10, seed=2) != small


def test_labels_are_spread_over_positions(story):
    labels = {item.label for item in build_local_task(story, n_items=40)}
    assert labels == {0, 1, 2, 3}


def test_a_text_without_sentences_is_a_clear_error():
    with pytest.raises(DataError, match="usable"):
        build_local_task("no sentences here at all")


def test_the_oracle_always_picks_the_true_ending(oracle, tokenizer, story):
    items = build_local_task(story, n_items=30, seed=0)
    result = score_multiple_choice(oracle, tokenizer, items, batch_size=8, progress=False)
    assert result.acc == 1.0 and result.acc_norm == 1.0
    assert result.items == 30 and result.chance == pytest.approx(0.25)


def test_a_random_model_scores_near_chance_and_batching_is_invariant(tiny_llama, tokenizer,
                                                                       story):
    items = build_local_task(story, n_items=40, seed=0)
    one = score_multiple_choice(tiny_llama, tokenizer, items, batch_size=1, progress=False)
    many = score_multiple_choice(tiny_llama, tokenizer, items, batch_size=16, progress=False)
    assert one == many
    assert one.acc < 0.75
