"""Tracing two decoder layers and copying the rest gives the IR of tracing every layer.

Each case lowers the same model both ways (``trace_all_layers=True`` is the reference) and
compares the printed modules, and for in-memory weights the tensors behind every parameter;
a spy on ``stamp_layers`` makes sure the fast path was really taken (or really refused).
"""

from __future__ import annotations

import pytest
import torch

from lorashear.frontend import layers as layers_mod
from lorashear.frontend import lower as lower_mod
from lorashear.frontend.lower import lower
from lorashear.frontend.pretrained import lower_pretrained
from lorashear.ir.printer import print_module
from tests.conftest import build_tiny, tiny_config

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: family -> decoder layers (each above the two traced ones, all kinds of GQA)
DEPTHS = {"llama": 5, "mistral": 4, "qwen2": 3, "llama-mha": 4}


@pytest.fixture
def stamped(monkeypatch):
    """The results of stamp_layers during the test (True: the graph was extended)."""
    calls: list[bool] = []
    real = lower_mod.stamp_layers

    def spy(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(lower_mod, "stamp_layers", spy)
    return calls


@pytest.fixture(scope="module")
def deep_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    return {f: build_tiny(f, root, config_overrides={"num_hidden_layers": n}) for f, n in DEPTHS.items()}


def _both(fn):
    fast, slow = fn(trace_all_layers=False), fn(trace_all_layers=True)
    return fast, slow


def _assert_same(fast, slow):
    assert print_module(fast) == print_module(slow)
    for name, p in slow.params.items():
        q = fast.params[name]
        assert type(q.storage) is type(p.storage) and q.buffer == p.buffer
        if p.storage.has_data:
            assert torch.equal(q.storage.load(), p.storage.load()), name


@pytest.mark.parametrize("family", list(DEPTHS))
@pytest.mark.parametrize("case", ["adapter", "plain", "meta-lora"])
def test_pretrained_fast_equals_full_trace(deep_models, stamped, family, case):
    tm = deep_models[family]
    kwargs = {"adapter": dict(adapter=tm.adapter_dir), "plain": {},
              "meta-lora": dict(meta=True, lora_rank=8)}[case]
    fast, slow = _both(lambda **kw: lower_pretrained(tm.model_dir, **kwargs, **kw))
    assert stamped == [True]
    _assert_same(fast, slow)
    assert sum(op.loc.endswith(".mlp.down_proj") for op in fast.graph.ops) == DEPTHS[family]


def test_fresh_lora_factors_drawn_in_the_same_order(deep_models, stamped):
    """The random LoRA A factors come from one generator: the fast path must ask for the
    storages in the full trace's order, so every factor gets the same numbers."""
    tm = deep_models["llama"]
    fast, slow = _both(lambda **kw: lower_pretrained(tm.model_dir, lora_rank=2, seed=5, **kw))
    assert stamped == [True]
    _assert_same(fast, slow)
    assert any(".lora_A." in n and p.storage.load().abs().sum() > 0 for n, p in fast.params.items())


@pytest.mark.parametrize("layers,kv_heads,tied", [(3, 1, True), (4, 4, False), (6, 2, True)])
def test_in_memory_model_over_depths_and_gqa(stamped, layers, kv_heads, tied):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(layers)
    cfg = tiny_config("llama", num_hidden_layers=layers, num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    base = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    fast, slow = _both(lambda **kw: lower(base, **kw))  # without LoRA first: peft wraps `base` in place
    _assert_same(fast, slow)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.05, target_modules=ALL)).eval()
    fast, slow = _both(lambda **kw: lower(model, **kw))
    _assert_same(fast, slow)
    assert stamped == [True, True]


def _peft_tiny(layers: int, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=layers),
                                            attn_implementation="sdpa").eval()
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=ALL, **lora)).eval()


def test_layers_that_differ_take_the_full_trace(stamped):
    """LoRA on layer 3 only: the layers after the traced ones are not alike, no stamping."""
    model = _peft_tiny(5, layers_to_transform=[3])
    assert layers_mod.find_layer_stack(model.get_base_model()) is None
    fast, slow = _both(lambda **kw: lower(model, **kw))
    assert stamped == []
    _assert_same(fast, slow)
    assert sum(op.kind == "lora_linear" for op in fast.graph.ops) == 7


def test_a_first_layer_unlike_the_second_takes_the_full_trace(stamped):
    """LoRA on layer 0 only: the later layers are alike, but the traced pair is not one
    layer shifted, so stamp_layers refuses and the full trace runs."""
    model = _peft_tiny(4, layers_to_transform=[0])
    assert layers_mod.find_layer_stack(model.get_base_model()) is not None
    fast, slow = _both(lambda **kw: lower(model, **kw))
    assert stamped == [False]
    _assert_same(fast, slow)
    assert [op.loc for op in fast.graph.ops if op.kind == "lora_linear"][0].startswith("model.layers.0.")


def test_shallow_models_are_traced_whole(tiny_models, stamped):
    assert layers_mod.find_layer_stack(tiny_models["llama"].base) is None  # two layers: nothing to copy
    lower(tiny_models["llama"].peft)
    assert stamped == []
