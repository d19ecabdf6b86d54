"""The executor's suffix loss: rerunning from the first segment that reads the changed
parameters gives the full forward's loss, and runs fewer ops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorashear.analysis.manager import AnalysisManager
from lorashear.ir.core import clone_module
from lorashear.passes.discover import Discover
from lorashear.runtime.executor import SuffixLoss, emit_torch
from tests.conftest import FAMILIES


def _full_loss(model, batches) -> float:
    with torch.no_grad():
        return sum(float(model(b, labels=b).loss) for b in batches) / len(batches)


@pytest.fixture(scope="module")
def models(lowered):
    """family -> (model, module with groups, batches)."""
    out = {}
    for family in FAMILIES:
        module = clone_module(lowered(family, True))
        module.attributes.pop("groups", None)
        Discover().run(module, AnalysisManager(module))
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, 128, (2, 16), generator=generator) for _ in range(2)]
        out[family] = (emit_torch(module), module, batches)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_suffix_loss_of_each_family_zeroed_is_the_full_forward_loss(models, family):
    model, module, batches = models[family]
    losses = SuffixLoss(model, batches)
    assert losses.base == _full_loss(model, batches)
    for f in module.attributes["groups"].families:
        names = {m.param for m in f.members}
        saved = {n: model.tensor(n).detach().clone() for n in names}
        with torch.no_grad():
            for n in names:
                model.tensor(n).zero_()
            assert losses.loss(names) == _full_loss(model, batches), (f.kind, f.layer)
            for n, t in saved.items():
                model.tensor(n).copy_(t)


@settings(max_examples=25, deadline=None)
@given(family=st.sampled_from(FAMILIES), picks=st.lists(st.integers(0, 10 ** 6), min_size=1, max_size=3),
       scale=st.floats(-2.0, 2.0))
def test_suffix_loss_after_any_parameter_change(models, family, picks, scale):
    """Any parameters (LoRA factors, norms, embeddings), scaled: the same loss as a full forward."""
    model, module, batches = models[family]
    losses = SuffixLoss(model, batches)
    params = sorted(module.params)
    names = {params[i % len(params)] for i in picks}
    saved = {n: model.tensor(n).detach().clone() for n in names}
    try:
        with torch.no_grad():
            for n in names:
                model.tensor(n).mul_(scale)
        assert losses.loss(names) == _full_loss(model, batches)
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                model.tensor(n).copy_(t)


def test_suffix_loss_reruns_only_from_the_changed_layer(models, monkeypatch):
    model, module, batches = models["llama"]
    losses = SuffixLoss(model, batches)
    ran = []
    real = type(model)._run_ops
    monkeypatch.setattr(type(model), "_run_ops", lambda self, ops, *a, **kw: ran.append(len(ops)) or real(self, ops, *a, **kw))
    families = module.attributes["groups"].families
    last_mlp = max((f for f in families if f.kind == "mlp"), key=lambda f: f.layer)
    losses.loss({m.param for m in last_mlp.members})
    suffix = sum(ran)
    ran.clear()
    _full_loss(model, batches)
    assert 0 < suffix < sum(ran) / 2  # the last of two layers and the head, for each batch
    assert losses.loss({"no-such-parameter"}) == losses.base


def test_hidden_states_are_the_decoder_layers_outputs(tiny_models, lowered):
    """output_hidden_states gives what transformers calls each layer's hidden state."""
    from lorashear.runtime.executor import emit_torch

    tm = tiny_models["mistral"]
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tm.peft(ids, output_hidden_states=True).hidden_states
        got = emit_torch(lowered("mistral", True))(ids, output_hidden_states=True).hidden_states
    assert len(got) == len(want) - 1  # transformers also lists the embeddings
    for ours, theirs in zip(got[:-1], want[1:-1], strict=True):  # its last one is after the norm
        assert (ours - theirs).abs().max() <= 1e-5
