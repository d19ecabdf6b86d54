"""lora{rank=R}: the function is unchanged, the factors have the new rank, discover's groups stay
valid (masked == compressed after it), a masked model stays masked, the new capacity trains,
errors leave the module as it was."""

from __future__ import annotations

import random
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorashear.analysis.groups import PruneMaskAttr
from lorashear.analysis.masking import keep_masks, zero_groups
from lorashear.errors import PassError
from lorashear.frontend.pretrained import lower_pretrained
from lorashear.ir.core import clone_module
from lorashear.ir.printer import print_module
from lorashear.ir.storage import MetaStorage
from lorashear.ir.verifier import verify
from lorashear.passes import PassManager
from lorashear.passes.compress import compress_module
from lorashear.runtime.executor import emit_torch, lora_param_names
from tests.conftest import markov_tokens, random_batch


def _logits(module, ids, mask):
    with torch.no_grad():
        return emit_torch(module)(ids, attention_mask=mask).logits


def _adapters(module):
    return [op for op in module.graph.ops if op.kind == "lora_linear"]


@pytest.fixture(scope="module")
def adapted(lowered):
    """The tiny Llama with its trained-looking adapter (B non-zero), groups discovered."""
    module = clone_module(lowered("llama", True))
    PassManager.parse("discover").run(module)
    return module


def test_rerank_keeps_function_and_sets_rank(adapted):
    ids, mask = random_batch(adapted.attributes["config"].config["vocab_size"])
    before = _logits(adapted, ids, mask)
    old_scaling = {op.loc: op.kwargs["scaling"] for op in _adapters(adapted)}
    module = clone_module(adapted)
    manager = PassManager.parse("lora{rank=16}")
    manager.run(module)
    verify(module)
    assert (_logits(module, ids, mask) - before).abs()[mask.bool()].max() <= 1e-5
    for op in _adapters(module):
        weight, lora_a, lora_b = op.args[1], op.args[3], op.args[4]
        out_features, in_features = weight.type.shape
        assert lora_a.type.shape == (16, in_features) and lora_b.type.shape == (out_features, 16)
        assert tuple(lora_a.storage.load().shape) == (16, in_features)
        assert torch.count_nonzero(lora_a.storage.load()) > 0
        assert torch.count_nonzero(lora_b.storage.load()) == 0
        assert op.kwargs["scaling"] == old_scaling[op.loc]  # alpha=0: each keeps its scaling
    # the adapter's update so far now lives in the base weights
    w_old = adapted.params[_adapters(adapted)[0].args[1].name].storage.load()
    w_new = module.params[_adapters(module)[0].args[1].name].storage.load()
    assert not torch.equal(w_old, w_new)
    stats = manager.records[0].statistics
    assert stats["adapters re-ranked"] == len(_adapters(module))
    assert stats["LoRA parameters after"] == 4 * stats["LoRA parameters before"]  # r=4 -> 16
    # the text form round-trips with the new shapes
    assert "lora_A.weight : f32[16," in print_module(module)


def test_alpha_sets_scaling(adapted):
    module = clone_module(adapted)
    PassManager.parse("lora{rank=8,alpha=4}").run(module)
    assert {op.kwargs["scaling"] for op in _adapters(module)} == {0.5}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(rank=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_groups_stay_valid_after_rerank(adapted, rank, seed):
    """compress after lora{rank=R} needs no new discover and equals the masked model."""
    module = clone_module(adapted)
    PassManager.parse(f"lora{{rank={rank},seed={seed % 100}}}").run(module)
    groups = module.attributes["groups"]
    rng = random.Random(seed)
    removed = {f.id: tuple(sorted(rng.sample(range(f.size), rng.randint(1, f.size - 1))))
               for f in groups.families if rng.random() < 0.6}
    masked, compressed = clone_module(module), clone_module(module)
    zero_groups(masked, groups, removed)
    compress_module(compressed, groups, removed)
    verify(compressed)
    ids, mask = random_batch(module.attributes["config"].config["vocab_size"], seed=rank)
    assert (_logits(masked, ids, mask) - _logits(compressed, ids, mask)).abs()[mask.bool()].max() <= 1e-4
    assert all(op.args[3].type.shape[0] == rank for op in _adapters(compressed))


def test_masked_model_stays_masked(adapted):
    module = clone_module(adapted)
    groups = module.attributes["groups"]
    mlp = next(f for f in groups.families if f.kind == "mlp")
    hidden = next(f for f in groups.families if f.kind == "hidden")
    removed = {mlp.id: (0, 3, 5), hidden.id: (1, 2)}
    zero_groups(module, groups, removed)
    module.attributes["prune-mask"] = PruneMaskAttr.from_dict(removed)
    ids, mask = random_batch(module.attributes["config"].config["vocab_size"])
    before = _logits(module, ids, mask)
    PassManager.parse("lora{rank=6}").run(module)
    assert (_logits(module, ids, mask) - before).abs()[mask.bool()].max() <= 1e-5
    lora = lora_param_names(module)
    checked = 0
    for (name, axis), keep in keep_masks(module, groups, removed).items():
        tensor = module.params[name].storage.load()
        assert torch.count_nonzero(tensor.index_select(axis, torch.nonzero(~keep).flatten())) == 0, name
        checked += name in lora and name.endswith("lora_A.weight")
    assert checked  # fresh A columns on removed input units were zeroed


def test_recover_trains_the_new_factors(tmp_path, adapted):
    """recover after lora{rank=16} trains every fresh factor (B leaves zero) and lowers the loss."""
    ids = markov_tokens(3000, 5, 3, seed=0)
    (tmp_path / "a.ids").write_text(" ".join(map(str, ids.tolist())))
    module = clone_module(adapted)
    PassManager.parse("lora{rank=16}").run(module)
    windows = ids[:2048].view(-1, 32)[:8]
    with torch.no_grad():
        loss_before = emit_torch(module)(windows, labels=windows).loss.item()
    PassManager.parse(f"recover{{data={tmp_path / 'a.ids'},steps=12,stage1-steps=12,seq-len=32,batch=4,"
                      "probe-every=6,probe-windows=2,lr=0.01,progress=false}").run(module)
    for op in _adapters(module):
        assert op.args[3].type.shape[0] == 16
        assert torch.count_nonzero(op.args[4].storage.load()) > 0, op.loc
    with torch.no_grad():
        assert emit_torch(module)(windows, labels=windows).loss.item() < loss_before


def test_meta_module_gets_shapes_only(tiny_models):
    module = lower_pretrained(tiny_models["llama"].model_dir, adapter=tiny_models["llama"].adapter_dir, meta=True)
    PassManager.parse("lora{rank=3}").run(module)
    verify(module)
    op = _adapters(module)[0]
    assert op.args[3].type.shape[0] == 3 and not op.args[3].storage.has_data


def test_errors(lowered, adapted):
    with pytest.raises(PassError, match="rank >= 1"):
        PassManager.parse("lora{rank=0}")
    with pytest.raises(PassError, match="alpha >= 0"):
        PassManager.parse("lora{rank=4,alpha=-1}")
    with pytest.raises(PassError, match="no LoRA adapters"):
        PassManager.parse("lora{rank=4}").run(clone_module(lowered("llama", False)))
    module = clone_module(adapted)
    del module.attributes["groups"]
    module.attributes["prune-mask"] = PruneMaskAttr.from_dict({0: (1,)})
    text = print_module(module)
    with pytest.raises(PassError, match="prune-mask but no groups"):
        PassManager.parse("lora{rank=4}").run(module)
    assert print_module(module) == text  # nothing half-done


@pytest.mark.parametrize("passes", ["lora{rank=4}", "merge-lora"])
def test_adapter_mixing_data_and_shapes_is_an_error(adapted, passes):
    """A factor with no data folded into a weight with data would drop the weight's values: both
    folding passes refuse it, name the module, and change nothing (the last adapter is broken,
    so a pass that folded as it went would have changed the others)."""
    module = clone_module(adapted)
    broken = _adapters(module)[-1]
    broken.args[4].storage = MetaStorage()
    text = print_module(module)
    weights = {name: p.storage.load().clone() for name, p in module.params.items() if p.storage.has_data}
    with pytest.raises(PassError, match=re.escape(f"adapter at module {broken.loc} mixes data and shapes "
                                                  f"only: @{broken.args[4].name} has no data")):
        PassManager.parse(passes).run(module)
    assert print_module(module) == text
    assert all(torch.equal(module.params[name].storage.load(), w) for name, w in weights.items())
