"""GPT-2's ``Conv1D`` (a linear layer with its weight stored ``[in, out]``, run as ``addmm``
on a flattened input) and fused projections cut into equal pieces (GPT-2's ``c_attn`` into
q, k, v; Phi-3's ``gate_up_proj`` into gate and up): ``discover`` finds their attention and
MLP groups, and random groups compress exactly, in PyTorch and in ONNX Runtime."""

from __future__ import annotations

import random

import pytest
import torch

from lorashear.analysis.masking import zero_groups
from lorashear.frontend.lower import lower
from lorashear.ir.core import clone_module
from lorashear.passes import PassManager
from lorashear.passes.compress import compress_module
from lorashear.runtime.executor import emit_torch
from tests.conftest import random_batch


def _gpt2():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64)


def _phi3():
    from transformers import Phi3Config

    return Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      pad_token_id=0)


def _logits(module, ids, mask):
    with torch.no_grad():
        return emit_torch(module)(ids, attention_mask=mask).logits


@pytest.mark.parametrize("family,mlp_param,attn", [("gpt2", "transformer.h.0.mlp.c_fc.weight", True),
                                                   ("phi3", "model.layers.0.mlp.gate_up_proj.weight", False)])
def test_fused_projection_groups_compress_exactly(family, mlp_param, attn, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = {"gpt2": _gpt2, "phi3": _phi3}[family]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    module = lower(model)
    ids, mask = random_batch(64, batch=2, seq=7)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    assert (_logits(module, ids, mask) - want).abs()[mask.bool()].max().item() <= 1e-4

    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    mlp = [f for f in groups.families if f.kind == "mlp" and mlp_param in {m.param for m in f.members}]
    assert len(mlp) == 1 and mlp[0].size == 48
    heads = [f for f in groups.families if f.kind == "attn" and f.layer == 0]
    if attn:  # Phi-3 slices q, k and v out of qkv_proj by position: its heads stay pinned
        assert len(heads) == 1 and heads[0].size == 4
    rng = random.Random(0)
    removed = {mlp[0].id: tuple(sorted(rng.sample(range(48), 20)))}
    if attn:
        removed[heads[0].id] = (2,)
    masked, compressed = clone_module(module), clone_module(module)
    zero_groups(masked, groups, removed)
    compress_module(compressed, groups, removed)
    fused = compressed.params[mlp_param].type.shape
    assert 28 in fused or 56 in fused  # 48 - 20 channels (twice for gate and up)
    assert compressed.num_parameters() < module.num_parameters()
    assert (_logits(masked, ids, mask) - _logits(compressed, ids, mask)).abs()[mask.bool()].max().item() <= 1e-4

    ort = pytest.importorskip("onnxruntime")
    from lorashear.runtime.onnx_emit import emit_onnx

    emit_onnx(compressed, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert (torch.as_tensor(got) - _logits(compressed, ids, mask)).abs()[mask.bool()].max().item() <= 1e-4
