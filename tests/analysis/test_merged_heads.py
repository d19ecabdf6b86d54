"""Eager attention that merges its heads into the batch (XGLM, MVP, TrOCR:
``[B, heads, S, d] -> ["heads*B", S, d]`` for ``bmm``; GPT-NeoX-Japanese: ``baddbmm`` onto
``zeros(["heads*B", S, S])``): the compound size ``"4*B"`` is a batch factor and a heads
factor, so ``discover`` finds the heads as ``attn`` groups, and ``compress`` rewrites both the
size (``"3*B"``) and the ``sym.mul(B, 4)`` that computes it; random groups compress exactly,
in PyTorch and in ONNX Runtime."""

from __future__ import annotations

import torch

from lorashear.analysis.coupling_rules.shapes import dim_product
from lorashear.analysis.masking import zero_groups
from lorashear.ir.core import clone_module
from lorashear.passes import PassManager
from lorashear.passes.compress import compress_module
from tests.conftest import ir_logits, lower_exactly, onnx_runner


def test_dim_product_reads_products_of_symbols_and_integers():
    assert dim_product(8) == ((), 8)
    assert dim_product("16*B") == (("B",), 16)
    assert dim_product("B*S") == (("B", "S"), 1)
    assert dim_product("S+1") == (("S+1",), 1)  # anything else: one opaque symbol


def test_heads_merged_into_the_batch_are_attention_groups(tmp_path):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, XGLMConfig

    from tests.conftest import with_lora

    torch.manual_seed(0)
    config = XGLMConfig(vocab_size=64, d_model=32, ffn_dim=48, num_layers=2, attention_heads=4,
                        max_position_embeddings=64)
    base = AutoModelForCausalLM.from_config(config).eval()
    model = with_lora(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    module, ids, mask = lower_exactly(model, 64)
    assert any(isinstance(d, str) and "4*" in d for op in module.graph.ops for r in op.results
               if hasattr(r.type, "shape") for d in r.type.shape)

    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    heads = [f for f in groups.families if f.kind == "attn"]
    assert sorted(f.layer for f in heads) == [0, 1] and all(f.size == 4 for f in heads)
    q_rows = {m.stride for f in heads for m in f.members if m.param == "model.layers.0.self_attn.q_proj.weight"}
    assert q_rows == {8}  # a head is 8 consecutive rows of q_proj

    # one head of layer 0: the merged batch of that layer becomes "3*B", computed as sym.mul(B, 3)
    layer0 = next(f for f in heads if f.layer == 0)
    one = clone_module(module)
    compress_module(one, groups, {layer0.id: (1,)})
    assert one.params["model.layers.0.self_attn.q_proj.weight"].type.shape == (24, 32)
    merged = {d for op in one.graph.ops if op.loc == "model.layers.0.self_attn" for r in op.results
              if hasattr(r.type, "shape") for d in r.type.shape if isinstance(d, str) and "*B" in d}
    assert merged == {"3*B"}
    assert any(op.kind == "sym.mul" and op.args[1] == 3 for op in one.graph.ops)
    masked_one = clone_module(module)
    zero_groups(masked_one, groups, {layer0.id: (1,)})
    assert (ir_logits(one, ids, mask) - ir_logits(masked_one, ids, mask)).abs()[mask.bool()].max().item() <= 1e-5

    PassManager.parse("prune{ratio=0.3,metric=random,kinds=attn,mlp}").run(module)
    masked = ir_logits(module, ids, mask)
    compressed = clone_module(module)
    PassManager.parse("compress").run(compressed)
    assert compressed.num_parameters() < module.num_parameters()
    small = ir_logits(compressed, ids, mask)
    assert (small - masked).abs()[mask.bool()].max().item() <= 1e-5

    got = onnx_runner(compressed, tmp_path / "m.onnx")(ids, mask)
    assert (got - small).abs()[mask.bool()].max().item() <= 1e-4


def test_baddbmm_onto_a_constant_fill_keeps_heads_prunable(tmp_path):
    """GPT-NeoX-Japanese scores heads with ``baddbmm(zeros([4*B, S, S]), q, k^T)``, its q | k | v
    cut inside each head of ``query_key_value``: the heads are ``attn`` groups (the per-head
    cut is pinned, a head's rows are one block), and random groups compress exactly, with the
    ``zeros`` sized by the new head count."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, GPTNeoXJapaneseConfig

    from tests.conftest import with_lora

    torch.manual_seed(0)
    config = GPTNeoXJapaneseConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_multiple_size=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2)
    model = with_lora(AutoModelForCausalLM.from_config(config).eval(),
                      LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    module, ids, mask = lower_exactly(model, 64)
    assert any(op.kind == "baddbmm" for op in module.graph.ops)

    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    heads = [f for f in groups.families if f.kind == "attn"]
    assert sorted(f.layer for f in heads) == [0, 1] and all(f.size == 4 for f in heads)
    qkv = "gpt_neox_japanese.layers.0.attention.query_key_value.weight"
    assert {m.stride for f in heads for m in f.members if m.param == qkv} == {24}  # q | k | v of a head: 24 rows
    layer0 = next(f for f in heads if f.layer == 0)
    masked, compressed = clone_module(module), clone_module(module)
    zero_groups(masked, groups, {layer0.id: (0, 2)})
    compress_module(compressed, groups, {layer0.id: (0, 2)})
    assert compressed.params[qkv].type.shape == (48, 32)
    fills = [op for op in compressed.graph.ops if op.kind == "zeros" and op.loc.endswith("layers.0.attention")]
    assert fills and all(r.type.shape[0] == "2*B" for op in fills for r in op.results)
    small = ir_logits(compressed, ids, mask)
    assert (small - ir_logits(masked, ids, mask)).abs()[mask.bool()].max().item() <= 1e-5

    got = onnx_runner(compressed, tmp_path / "m.onnx")(ids, mask)
    assert (got - small).abs()[mask.bool()].max().item() <= 1e-4
