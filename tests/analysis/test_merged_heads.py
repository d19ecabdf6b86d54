"""Eager attention that merges its heads into the batch (XGLM, MVP, TrOCR:
``[B, heads, S, d] -> ["heads*B", S, d]`` for ``bmm``): the compound size ``"4*B"`` is a
batch factor and a heads factor, so ``discover`` finds the heads as ``attn`` groups, and
``compress`` rewrites both the size (``"3*B"``) and the ``sym.mul(B, 4)`` that computes it;
random groups compress exactly, in PyTorch and in ONNX Runtime."""

from __future__ import annotations

import pytest
import torch

from lorashear.analysis.coupling_rules.shapes import dim_product
from lorashear.analysis.masking import zero_groups
from lorashear.frontend.lower import lower
from lorashear.ir.core import clone_module
from lorashear.passes import PassManager
from lorashear.passes.compress import compress_module
from lorashear.runtime.executor import emit_torch
from tests.conftest import random_batch


def _logits(module, ids, mask):
    with torch.no_grad():
        return emit_torch(module)(ids, attention_mask=mask).logits


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
    module = lower(model)
    ids, mask = random_batch(64, batch=2, seq=7)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    assert (_logits(module, ids, mask) - want).abs()[mask.bool()].max().item() <= 1e-4
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
    assert (_logits(one, ids, mask) - _logits(masked_one, ids, mask)).abs()[mask.bool()].max().item() <= 1e-5

    PassManager.parse("prune{ratio=0.3,metric=random,kinds=attn,mlp}").run(module)
    masked = _logits(module, ids, mask)
    compressed = clone_module(module)
    PassManager.parse("compress").run(compressed)
    assert compressed.num_parameters() < module.num_parameters()
    small = _logits(compressed, ids, mask)
    assert (small - masked).abs()[mask.bool()].max().item() <= 1e-5

    ort = pytest.importorskip("onnxruntime")
    from lorashear.runtime.onnx_emit import emit_onnx

    emit_onnx(compressed, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert (torch.as_tensor(got) - small).abs()[mask.bool()].max().item() <= 1e-4
