"""Attention whose key is shared by every query head through a broadcast: multi-query
attention (GPTBigCode: one key/value head ``expand``-ed to all query heads) and multi-head
latent attention (DeepSeek-V3: the rotary part of the key is one ``k_pe`` expanded to every
head). The broadcast's copies are a whole heads axis there, so they take the heads' units:
``discover`` finds the query heads (the latent attention's q/kv_b_proj heads) as ``attn``
groups, the shared key is kept whole, and random groups compress exactly. Grouped-query
attention's copies (``[kv, copies]`` merged into the query heads) stay pinned, so its unit is
still the KV head (checked on Llama)."""

from __future__ import annotations

import pytest
import torch

from lorashear.analysis.masking import zero_groups
from lorashear.frontend.lower import lower
from lorashear.ir.core import clone_module
from lorashear.passes import PassManager
from lorashear.passes.compress import compress_module
from tests.conftest import ir_logits, lower_exactly, onnx_runner, random_batch


def _bigcode():
    from transformers import GPTBigCodeConfig

    return GPTBigCodeConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64,
                            multi_query=True)


def _deepseek_v3():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                            num_hidden_layers=2, first_k_dense_replace=2, num_attention_heads=4,
                            num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
                            qk_rope_head_dim=4, v_head_dim=8, head_dim=4, max_position_embeddings=64,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize("family,q_param,rows_per_head", [
    ("bigcode", "transformer.h.0.attn.c_attn.weight", 8),
    ("deepseek_v3", "model.layers.0.self_attn.q_b_proj.weight", 12)])
def test_heads_behind_a_shared_key_are_attention_groups(family, q_param, rows_per_head, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = {"bigcode": _bigcode, "deepseek_v3": _deepseek_v3}[family]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    module, ids, mask = lower_exactly(model, 64)

    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    heads = [f for f in groups.families if f.kind == "attn" and f.layer == 0]
    assert len(heads) == 1 and heads[0].size == 4
    assert {m.stride for m in heads[0].members if m.param == q_param} == {rows_per_head}
    removed = {heads[0].id: (1, 2)}
    masked, compressed = clone_module(module), clone_module(module)
    zero_groups(masked, groups, removed)
    compress_module(compressed, groups, removed)
    rows = compressed.params[q_param].type.shape[0]
    assert rows == module.params[q_param].type.shape[0] - 2 * rows_per_head
    assert compressed.num_parameters() < module.num_parameters()
    small = ir_logits(compressed, ids, mask)
    assert (small - ir_logits(masked, ids, mask)).abs()[mask.bool()].max().item() <= 1e-5

    got = onnx_runner(compressed, tmp_path / "m.onnx")(ids, mask)
    assert (got - small).abs()[mask.bool()].max().item() <= 1e-4


def test_grouped_query_copies_stay_pinned():
    """Llama with 4 query heads over 2 KV heads: one attn family per layer, of the 2 KV heads
    (each with its 2 query heads), never a family of "query head j of every group"."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    for implementation in ("sdpa", "eager"):
        module = lower(AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval())
        PassManager.parse("discover").run(module)
        heads = [f for f in module.attributes["groups"].families if f.kind == "attn" and f.layer == 0]
        assert [f.size for f in heads] == [2], implementation
        q = "model.layers.0.self_attn.q_proj.weight"
        assert {m.stride for m in heads[0].members if m.param == q} == {16}, implementation


def test_latent_attention_pruned_uniformly_reloads_in_transformers(tmp_path):
    """DeepSeek-V3 with one head removed in every layer: the emitted config says 3 heads, and
    stock transformers builds q_b_proj, kv_b_proj and o_proj from it, with the same logits."""
    from transformers import AutoModelForCausalLM

    from lorashear.runtime.hf import save_model_dir

    torch.manual_seed(0)
    module = lower(AutoModelForCausalLM.from_config(_deepseek_v3(), attn_implementation="sdpa").eval())
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    compress_module(module, groups, {f.id: (1,) for f in groups.families if f.kind == "attn"})
    save_model_dir(module, tmp_path / "hf", merge=True)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert stock.config.num_attention_heads == 3
    ids, mask = random_batch(64, batch=2, seq=7)
    with torch.no_grad():
        got = stock(input_ids=ids, attention_mask=mask).logits
    assert (got - ir_logits(module, ids, mask)).abs()[mask.bool()].max().item() <= 1e-5
