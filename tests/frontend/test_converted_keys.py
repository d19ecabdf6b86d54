"""Checkpoint keys that transformers converts on load (issue #22, item 1), bound by reference.

HRM-Text saves each attention's gate, query, key and value projections fused as one
``gqkv_proj`` tensor, which transformers splits on load: ``lower_pretrained`` binds each
projection to a :class:`ConvertedStorage` that reads the fused tensor and splits it with
transformers' own conversion when loaded (nothing held in memory; ``--meta`` reads nothing).
HRM also runs its layers several times (its cycles), so one adapter serves several
``lora_linear`` ops: folding it for ONNX must happen once. SarvamMoE's fused ``query_key_value``
is split by the sizes of the projections (transformers asks the model for them).
"""

from __future__ import annotations

import pytest
import torch

from lorashear.frontend.pretrained import ConvertedStorage, checkpoint_index, lower_pretrained
from lorashear.ir.lora import merge_lora
from lorashear.ir.storage import MetaStorage
from lorashear.runtime.executor import emit_torch
from tests.conftest import random_batch, with_lora

VOCAB = 48


def _hrm(root):
    from peft import LoraConfig
    from transformers import HrmTextConfig, HrmTextForCausalLM

    torch.manual_seed(0)
    config = HrmTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                           head_dim=16, max_position_embeddings=32, num_layers_per_stack=1, H_cycles=2,
                           L_cycles=2, L_bp_cycles=[1])
    base = HrmTextForCausalLM(config).eval()
    base.save_pretrained(root / "model")
    return with_lora(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj"]), root / "adapter")


def test_fused_checkpoint_keys_bind_by_reference_and_lower_exactly(tmp_path):
    peft = _hrm(tmp_path)
    keys = checkpoint_index(tmp_path / "model")
    assert not any("q_proj" in k for k in keys) and any("gqkv_proj" in k for k in keys)

    module = lower_pretrained(tmp_path / "model", adapter=tmp_path / "adapter")
    q = next(p for name, p in module.params.items() if name.endswith("self_attn.q_proj.weight"))
    assert isinstance(q.storage, ConvertedStorage) and q.storage._tensor is None  # read when loaded
    ids, mask = random_batch(VOCAB, batch=2, seq=6)
    with torch.no_grad():
        want = peft(input_ids=ids, attention_mask=mask).logits
        got = emit_torch(module)(ids, attention_mask=mask).logits
    assert (got - want).abs()[mask.bool()].max().item() <= 1e-4

    users = sum(1 for op in module.graph.ops if op.kind == "lora_linear" and q in op.params())
    assert users > 1  # the layer runs once per cycle
    merge_lora(module)
    with torch.no_grad():
        merged = emit_torch(module)(ids, attention_mask=mask).logits
    assert (merged - want).abs()[mask.bool()].max().item() <= 1e-4

    meta = lower_pretrained(tmp_path / "model", meta=True)
    assert all(isinstance(p.storage, MetaStorage) for p in meta.params.values() if not p.buffer)


def test_a_converted_key_of_the_wrong_shape_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    from lorashear.errors import ModelLoadError

    _hrm(tmp_path)
    path = tmp_path / "model" / "model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("gqkv_proj.weight"))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="converted from"):
        lower_pretrained(tmp_path / "model")


def test_a_fused_qkv_split_by_the_projections_sizes_binds_by_reference(tmp_path):
    """SarvamMoE (as Param2MoE) saves ``attention.query_key_value`` fused and transformers
    splits it on load into q, k and v of different sizes (grouped-query attention), asking the
    model for each projection's shape: the conversion runs with the skeleton's parameter shapes
    standing in for the model, on ``meta`` to find the shapes and on the file when loaded."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, SarvamMoEConfig

    torch.manual_seed(0)
    config = SarvamMoEConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_intermediate_size=16,
                             n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                             max_position_embeddings=64)
    base = AutoModelForCausalLM.from_config(config).eval()
    base.save_pretrained(tmp_path / "model")
    peft = with_lora(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"]),
                     tmp_path / "adapter")
    keys = checkpoint_index(tmp_path / "model")
    assert any("query_key_value" in k for k in keys) and not any("k_proj" in k for k in keys)

    module = lower_pretrained(tmp_path / "model", adapter=tmp_path / "adapter")
    k = module.params["model.layers.0.self_attn.k_proj.weight"]
    assert isinstance(k.storage, ConvertedStorage) and k.type.shape == (2 * 8, 32)
    assert module.params["model.layers.0.self_attn.q_proj.weight"].type.shape == (4 * 8, 32)
    ids, mask = random_batch(VOCAB, batch=2, seq=6)
    with torch.no_grad():
        want = peft(input_ids=ids, attention_mask=mask).logits
        got = emit_torch(module)(ids, attention_mask=mask).logits
    assert (got - want).abs()[mask.bool()].max().item() <= 1e-4
