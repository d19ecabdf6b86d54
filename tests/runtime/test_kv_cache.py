"""The KV-cache rewrite: decoding over the cache equals recomputing the whole sequence.

Exact where it can be: prefill + steps == the full forward (to float rounding) on every tiny
family, with and without LoRA, with padding, sliding windows and after non-uniform pruning;
greedy, sampling and beam search equal transformers' own ``generate`` token for token.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorashear.errors import PassError
from lorashear.ir.core import clone_module
from lorashear.ir.parser import parse_module
from lorashear.ir.printer import print_module
from lorashear.ir.verifier import verify
from lorashear.passes.compress import compress_module
from lorashear.passes.manager import PassManager
from lorashear.runtime.executor import emit_torch
from lorashear.runtime.kv_cache import (
    KVCacheError,
    add_kv_cache,
    cache_layout,
    has_kv_cache,
)
from tests.conftest import FAMILIES, build_tiny, random_batch

TOL = 1e-5


def _chunked(model, ids, mask, sizes):
    """Logits of ``ids`` fed in chunks of ``sizes`` over one cache."""
    cache, out, start = None, [], 0
    for size in sizes:
        end = start + size
        step = model(ids[:, start:end], attention_mask=mask[:, :end], cache=cache, use_cache=True)
        cache = step.cache
        out.append(step.logits)
        start = end
    return torch.cat(out, 1), cache


def _check_steps(module, sizes, *, seed=1):
    vocab = module.attributes["config"].config["vocab_size"]
    ids, mask = random_batch(vocab, batch=3, seq=sum(sizes), seed=seed)
    model = emit_torch(module)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got, cache = _chunked(model, ids, mask, sizes)
    keep = mask.bool()
    assert (got - want).abs()[keep].max() <= TOL
    assert all(k.shape[2] == sum(sizes) for k, _ in cache)
    return cache


@pytest.mark.parametrize("with_lora", [False, True])
@pytest.mark.parametrize("family", [*FAMILIES, "llama-mha"])
def test_prefill_then_steps_equal_full_forward(lowered, tiny_models, tmp_path_factory, family, with_lora):
    if family == "llama-mha":
        tm = build_tiny(family, tmp_path_factory.mktemp("mha"))
        from lorashear.frontend.pretrained import lower_pretrained
        module = lower_pretrained(tm.model_dir, adapter=tm.adapter_dir if with_lora else None)
    else:
        module = lowered(family, with_lora)
    cache = _check_steps(module, [6, 1, 1, 3, 1])
    layout = cache_layout(add_kv_cache(module))
    cfg = module.attributes["config"].config
    assert len(layout) == cfg["num_hidden_layers"]
    assert all(e.kv_heads == cfg["num_key_value_heads"] for e in layout)  # cached before the repeat
    assert cache[0][0].shape[1] == cfg["num_key_value_heads"]


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=5))
def test_any_chunking_equals_full_forward(lowered, sizes):
    _check_steps(lowered("llama", True), sizes, seed=len(sizes))


def test_sliding_window_mask_follows_the_offset(tmp_path):
    """Mistral with a 4-token window: a step's mask is the window at its own position."""
    from lorashear.frontend.pretrained import lower_pretrained

    tm = build_tiny("mistral", tmp_path, config_overrides={"sliding_window": 4})
    module = lower_pretrained(tm.model_dir, adapter=tm.adapter_dir)
    _check_steps(module, [5, 1, 1, 1, 2])


def test_pruned_non_uniform_model_decodes_exactly(lowered):
    module = clone_module(lowered("qwen2", True))
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    rng = random.Random(3)
    removed = {f.id: tuple(sorted(rng.sample(range(f.size), rng.randint(1, f.size - 1))))
               for f in groups.families if f.kind in ("attn", "mlp")}
    compress_module(module, groups, removed)
    layout = cache_layout(add_kv_cache(module))
    assert len({e.kv_heads for e in layout}) > 1 or any(
        e.kv_heads < module.attributes["config"].config["num_key_value_heads"] for e in layout)
    _check_steps(module, [4, 1, 2, 1])


def test_step_graph_prints_parses_and_verifies(lowered):
    step = add_kv_cache(lowered("llama", True))
    verify(step)
    assert has_kv_cache(step) and not has_kv_cache(lowered("llama", True))
    again = parse_module(print_module(step))
    verify(again)
    assert print_module(again) == print_module(step)
    names = step.graph.output_names
    assert names[0] == "logits" and names[1:3] == ["present.0.key", "present.0.value"]


def test_pass_in_a_pipeline_and_its_fixed_point(lowered):
    module = clone_module(lowered("mistral", True))
    result = PassManager.parse("kv-cache").run(module)
    verify(module)
    assert has_kv_cache(module)
    text = print_module(module)
    PassManager.parse("kv-cache").run(module)
    assert print_module(module) == text
    assert result is not None


def test_graph_without_attention_is_refused():
    text = "\n".join([
        "lorashear-ir 1",
        "param @emb.weight : f32[10, 4] = meta",
        "input %input_ids : i64[B, S]",
        "%0 = embedding(@emb.weight, %input_ids) : f32[B, S, 4]",
        "%1 = linear(%0, @emb.weight) : f32[B, S, 10]",
        "output logits = %1",
    ])
    module = parse_module(text)
    with pytest.raises(KVCacheError, match="no attention op"):
        add_kv_cache(module)
    with pytest.raises(PassError, match="kv-cache: the graph has no attention op"):
        PassManager.parse("kv-cache").run(module)
    assert not _supports_cache(module)  # generate() then decodes without a cache


def _supports_cache(module) -> bool:
    from lorashear.ir.storage import DataStorage
    for p in module.params.values():
        p.storage = DataStorage(torch.zeros(p.type.shape))
    return emit_torch(module).supports_cache()


def test_greedy_sampling_and_beam_equal_transformers_generate(tiny_models):
    """Dense base models: lorashear's generate() and transformers' give the same tokens."""
    from transformers import AutoModelForCausalLM

    from lorashear.frontend.pretrained import lower_pretrained

    for family in FAMILIES:
        tm = tiny_models[family]
        hf = AutoModelForCausalLM.from_pretrained(tm.model_dir).eval()
        ours = emit_torch(lower_pretrained(tm.model_dir))
        ids = torch.randint(3, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
        kw = dict(max_new_tokens=10, pad_token_id=0)
        for options in (dict(do_sample=False), dict(num_beams=3, do_sample=False),
                        dict(do_sample=True, top_k=20, temperature=0.9)):
            torch.manual_seed(11)
            want = hf.generate(ids, **options, **kw)
            torch.manual_seed(11)
            got = ours.generate(ids, **options, **kw)
            assert torch.equal(got, want), (family, options)


def test_cached_generation_equals_uncached(lowered):
    """Same tokens and the same scores at every step (an uncached decode that fed a step's
    cache back would drift from the second token on)."""
    model = emit_torch(lowered("qwen2", True))
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    plain, cached = model.generate(ids, use_cache=False, **kw), model.generate(ids, **kw)
    assert torch.equal(plain.sequences, cached.sequences)
    assert len(plain.scores) == len(cached.scores) == 12
    for a, b in zip(plain.scores, cached.scores, strict=True):
        assert (a - b).abs().max() <= TOL


def test_training_forward_is_untouched_by_the_step_graph(lowered):
    """Building the step graph shares the parameters and leaves the plain forward bitwise."""
    model = emit_torch(lowered("llama", True))
    ids, mask = random_batch(128)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        model(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        after = model(ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    assert model.step_ir is not model.ir
    assert set(model.step_ir.params) == set(model.ir.params)
