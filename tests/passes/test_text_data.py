"""``data=`` of the passes that read text: one file, a JSON file, or a weighted YAML data spec."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from lorashear.data.calibration import (
    CalibrationOptions,
    batch_for_step,
    calibration_batches,
    share_counts,
    text_data,
)
from lorashear.errors import PassError
from lorashear.frontend.pretrained import lower_pretrained
from lorashear.ir.core import clone_module
from lorashear.passes import PassManager
from tests.conftest import build_tiny, save_word_tokenizer

SEQ = 8
WORDS = "the sun rose over the quiet sea and the boats went out to fish before the wind".split()


@pytest.fixture(scope="module")
def worded(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer beside it, and a book it can read."""
    root = tmp_path_factory.mktemp("text-data")
    book = " ".join(WORDS[i % len(WORDS)] for i in range(400))
    tm = build_tiny("llama", root, seed=2)
    save_word_tokenizer(tm.model_dir, [book], vocab_size=128)
    module = lower_pretrained(tm.model_dir, adapter=tm.adapter_dir)
    PassManager.parse("discover").run(module)
    (root / "book.txt").write_text(book)
    return module, root, book


def _ids(root, name, values):
    path = root / name
    path.write_text(" ".join(map(str, values)))
    return path


def _spec(root, name, sources):
    path = root / name
    path.write_text("sources:\n" + "".join(
        f"  - path: {p.name}\n    weight: {w}\n" for p, w in sources))
    return path


def test_a_spec_reads_its_sources_not_its_own_yaml(worded):
    from transformers import AutoTokenizer

    module, root, book = worded
    tokenizer = AutoTokenizer.from_pretrained(module.attributes["source"].model)
    expected = tokenizer(book, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    spec = _spec(root, "book.yaml", [(root / "book.txt", 1)])
    for data in (root / "book.txt", spec):
        (source,) = text_data(module, str(data), SEQ, "test").sources
        assert source.windows.flatten().tolist() == expected[:len(expected) // SEQ * SEQ]
    records = root / "book.jsonl"
    records.write_text(json.dumps({"text": book}) + "\n")
    (source,) = text_data(module, str(records), SEQ, "test").sources
    assert source.windows.flatten().tolist() == expected[:len(expected) // SEQ * SEQ]


def test_one_source_draws_as_one_window_pool(worded):
    """A single file keeps the draws it always had (results of earlier runs stay valid)."""
    module, root, _ = worded
    windows = (torch.arange(40 * SEQ) % 128).view(40, SEQ)
    data = text_data(module, str(_ids(root, "pool.ids", windows.flatten().tolist())), SEQ, "test")
    chosen = torch.randperm(40, generator=torch.Generator().manual_seed(5))[:6]
    assert torch.equal(data.draw(3, 2, seed=5), windows[chosen].view(3, 2, SEQ))
    for step in (0, 7, 25):
        assert torch.equal(data.training_batch(4, 5, step), batch_for_step(windows, 4, 5, step))


def test_weighted_sources_share_draws_and_steps(worded):
    module, root, _ = worded
    # window j of a source holds the id j (low) or 50 + j (high) in every position
    low = _ids(root, "low.ids", [j for j in range(45) for _ in range(SEQ)])
    high = _ids(root, "high.ids", [50 + j for j in range(30) for _ in range(SEQ)])
    data = text_data(module, str(_spec(root, "mix.yaml", [(low, 3), (high, 1)])), SEQ, "test")
    assert [(s.name, round(s.weight, 2), len(s.windows)) for s in data.sources] == [
        ("low", 0.75, 45), ("high", 0.25, 30)]
    drawn = data.draw(4, 2, seed=1)
    per_window = ["high" if int(w[0]) >= 50 else "low" for w in drawn.view(-1, SEQ)]
    assert Counter(per_window) == {"low": 6, "high": 2}
    assert len({tuple(w.tolist()) for w in drawn.view(-1, SEQ)}) == 8  # none twice
    steps = [data.training_batch(4, 0, step) for step in range(400)]
    kinds = [{bool(w[0] >= 50) for w in batch} for batch in steps]
    assert all(len(k) == 1 for k in kinds)  # a step reads one source
    share = sum(k == {False} for k in kinds) / len(kinds)
    assert 0.68 < share < 0.82
    assert all(torch.equal(a, data.training_batch(4, 0, i)) for i, a in enumerate(steps[:20]))


@pytest.mark.parametrize(("weights", "total", "expected"), [
    ([3, 1], 8, [6, 2]), ([1, 1, 1], 8, [3, 3, 2]), ([0.2, 0.8], 3, [1, 2]), ([5], 4, [4])])
def test_share_counts(weights, total, expected):
    assert share_counts(weights, total) == expected


def test_lhspg_and_knowledge_take_a_spec(worded):
    module, root, _ = worded
    low = _ids(root, "a.ids", [i % 50 for i in range(80 * SEQ)])
    high = _ids(root, "b.ids", [50 + i % 50 for i in range(80 * SEQ)])
    spec = _spec(root, "ab.yaml", [(low, 1), (high, 1)])
    result = clone_module(module)
    PassManager.parse(f"knowledge{{gamma=0.2,data={spec},seq-len={SEQ},progress=false}},"
                      f"lhspg{{ratio=0.2,periods=1,steps=3,seq-len={SEQ},batch=2,data={spec},"
                      "progress=false}").run(result)
    assert result.attributes["prune-mask"].as_dict()
    batches = calibration_batches(result, CalibrationOptions(str(spec), 2, 2, SEQ, 0), "test")
    assert {bool(w[0] >= 50) for w in batches.view(-1, SEQ)} == {False, True}


def test_data_errors_name_the_source(worded):
    module, root, _ = worded
    big = _ids(root, "big.ids", [1] * (40 * SEQ))
    small = _ids(root, "small.ids", [1] * (3 * SEQ))
    spec = _spec(root, "uneven.yaml", [(big, 1), (small, 1)])
    with pytest.raises(PassError, match=r"source small .*small\.ids.* holds 3 windows .* fewer than one batch of 4"):
        PassManager.parse(f"lhspg{{data={spec},seq-len={SEQ},batch=4,progress=false}}").run(clone_module(module))
    with pytest.raises(PassError, match=r"source small .* holds 3 windows .* fewer than the 4 asked for"):
        text_data(module, str(spec), SEQ, "test").draw(4, 2, seed=0)
    with pytest.raises(PassError, match=r"lhspg: data 'nowhere' is neither an existing file nor a known"):
        PassManager.parse("lhspg{data=nowhere,progress=false}").run(clone_module(module))
    with pytest.raises(PassError, match=r"test: .*out\.ids: token ids must lie in \[0, 128\)"):
        text_data(module, str(_ids(root, "out.ids", [500] * 20)), SEQ, "test")
