"""Run-only options: declared once, with ``option(..., run_only=True)``, and the resume
fingerprint (the pipeline's and a training pass's own checkpoint owner) leaves out exactly
those."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from lorashear.passes import lhspg, recover, resume
from lorashear.passes.pipeline import format_pass, parse_pipeline
from lorashear.passes.registry import get_pass
from lorashear.passes.resume import result_text, run_only_options

TRAINING_RUN_ONLY = {"log", "checkpoint_dir", "progress", "device", "grad_checkpoint", "shard"}

#: A pass text and, for every option of the pass, another value it accepts.
OTHER_VALUES = {
    "lhspg{data=a.ids,metric=taylor}": {
        "ratio": 0.4, "periods": 2, "steps": 5, "lr": 0.01, "warmup": 3, "lam": 0.5, "eps": 0.1,
        "reconstruct": True, "damp": 0.01, "batches": 8, "settle": 0.5, "metric": "wanda", "rescore": True, "kinds": ("mlp",), "scope": "global",
        "attn_share": 0.5, "uniform": True, "align": 64, "data": "b.ids", "seq_len": 64, "batch": 2,
        "seed": 1, "log": "l.jsonl",
        "checkpoint_dir": "ck", "progress": False, "cuda_graph": True, "device": "cpu",
        "precision": "bf16", "grad_checkpoint": True, "shard": "fsdp2"},
    "recover{data=spec.yaml,reference=ref.ir}": {
        "data": "other.yaml", "steps": 30, "stage1_steps": 10, "probe_every": 5, "sampling": "static",
        "loss": "kd", "reference": "other.ir", "lr": 0.01, "base_lr": 3e-4, "schedule": "cosine", "warmup": 0,
        "train": "all", "hidden_weight": 0.5,
        "seq_len": 64, "batch": 2, "seed": 1, "probe_windows": 4, "log": "l.jsonl",
        "checkpoint_dir": "ck", "progress": False, "device": "cuda:1", "precision": "fp16",
        "grad_checkpoint": True, "shard": "fsdp2"},
    "knowledge{data=a.ids}": {
        "gamma": 0.2, "spread": 0.5, "kinds": ("mlp",), "data": "b.ids", "batches": 2, "batch": 1,
        "seq_len": 64, "seed": 1, "progress": False, "device": "cpu", "precision": "bf16",
        "layerwise": True},
}


def test_the_training_passes_declare_the_same_run_only_options():
    assert set(run_only_options(lhspg.Lhspg)) == TRAINING_RUN_ONLY
    assert set(run_only_options(recover.Recover)) == TRAINING_RUN_ONLY
    (knowledge,) = parse_pipeline("knowledge")
    # device and layerwise: where and how a pass runs the model, as lhspg's device is run-only
    assert run_only_options(knowledge) == ("progress", "device", "layerwise")
    assert result_text(dataclasses.replace(knowledge, progress=False)) == "knowledge"
    assert get_pass("prune") and run_only_options(get_pass("prune")) == ("device", "layerwise")


@pytest.mark.parametrize("text", list(OTHER_VALUES))
def test_the_fingerprint_ignores_exactly_the_run_only_options(text):
    (p,) = parse_pipeline(text)
    others = OTHER_VALUES[text]
    assert set(others) == {f.name for f in p.option_fields()}, "a new option needs a value here"
    for name, value in others.items():
        changed = dataclasses.replace(p, **{name: value})
        assert format_pass(changed) != format_pass(p), name
        if name in run_only_options(p):
            assert result_text(changed) == result_text(p), f"{name} is run-only"
        else:
            assert result_text(changed) != result_text(p), f"{name} changes the result"


def test_the_declaration_is_the_only_list():
    """No module keeps a list of its own: the old constant is gone, and the training passes
    take their checkpoint owner from result_text instead of resetting options by hand."""
    assert not hasattr(resume, "RUN_ONLY_OPTIONS")
    for module in (lhspg, recover):
        source = inspect.getsource(module)
        assert "result_text(self)" in source
        assert 'checkpoint_dir=""' not in source and "grad_checkpoint=False" not in source
