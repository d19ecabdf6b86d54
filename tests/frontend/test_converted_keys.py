"""Checkpoint keys that transformers converts on load (issue #22, item 1), bound by reference.

HRM-Text saves each attention's gate, query, key and value projections fused as one
``gqkv_proj`` tensor, which transformers splits on load: ``lower_pretrained`` binds each
projection to a :class:`ConvertedStorage` that reads the fused tensor and splits it with
transformers' own conversion when loaded (nothing held in memory; ``--meta`` reads nothing).
HRM also runs its layers several times (its cycles), so one adapter serves several
``lora_linear`` ops: folding it for ONNX must happen once.
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
