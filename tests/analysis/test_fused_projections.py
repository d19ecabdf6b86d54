"""GPT-2's ``Conv1D`` (a linear layer with its weight stored ``[in, out]``, lowered to a
``linear`` on the weight read transposed) and fused projections cut into pieces, equal
(GPT-2's ``c_attn`` into q, k, v; Phi-3's ``gate_up_proj`` into gate and up) or unequal
(Phi-3's ``qkv_proj`` sliced into q | k | v with grouped-query attention): ``discover`` finds
their attention and MLP groups, and random groups compress exactly, in PyTorch and in ONNX
Runtime; a Conv1D with peft's LoRA lowers from a checkpoint by reference and emits back in
the checkpoint's layout."""

from __future__ import annotations

import random

import pytest
import torch

from lorashear.analysis.masking import zero_groups
from lorashear.frontend.lower import lower
from lorashear.ir.core import clone_module
from lorashear.passes import PassManager
from lorashear.passes.compress import compress_module
from tests.conftest import ir_logits, lower_exactly, onnx_runner, random_batch


def _gpt2():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64)


def _phi3():
    from transformers import Phi3Config

    return Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0)


@pytest.mark.parametrize("family,mlp_param,heads_size", [("gpt2", "transformer.h.0.mlp.c_fc.weight", 4),
                                                         ("phi3", "model.layers.0.mlp.gate_up_proj.weight", 2)])
def test_fused_projection_groups_compress_exactly(family, mlp_param, heads_size, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = {"gpt2": _gpt2, "phi3": _phi3}[family]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    module, ids, mask = lower_exactly(model, 64)

    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    mlp = [f for f in groups.families if f.kind == "mlp" and mlp_param in {m.param for m in f.members}]
    assert len(mlp) == 1 and mlp[0].size == 48
    heads = [f for f in groups.families if f.kind == "attn" and f.layer == 0]
    assert len(heads) == 1 and heads[0].size == heads_size  # KV heads (Phi-3: 2, each with 2 query heads)
    rng = random.Random(0)
    removed = {mlp[0].id: tuple(sorted(rng.sample(range(48), 20))), heads[0].id: (1,)}
    masked, compressed = clone_module(module), clone_module(module)
    zero_groups(masked, groups, removed)
    compress_module(compressed, groups, removed)
    fused = compressed.params[mlp_param].type.shape
    assert 28 in fused or 56 in fused  # 48 - 20 channels (twice for gate and up)
    assert compressed.num_parameters() < module.num_parameters()
    assert (ir_logits(masked, ids, mask) - ir_logits(compressed, ids, mask)).abs()[mask.bool()].max().item() <= 1e-4

    got = onnx_runner(compressed, tmp_path / "m.onnx")(ids, mask)
    assert (got - ir_logits(compressed, ids, mask)).abs()[mask.bool()].max().item() <= 1e-4


def test_phi3_qkv_pieces_are_row_ranges(tmp_path):
    """Phi-3's ``qkv_proj`` rows are q (4 heads x 8) | k (2 x 8) | v (2 x 8): the KV-head family
    runs along each piece's own rows, and removing KV head 0 drops query heads 0-1, key head
    0 and value head 0 (rows 0-15, 32-39, 48-55), and the matching ``o_proj`` columns."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    module = lower(AutoModelForCausalLM.from_config(_phi3(), attn_implementation="sdpa").eval())
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    (heads,) = [f for f in groups.families if f.kind == "attn" and f.layer == 0]
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    ranges = sorted((m.start, m.stop, m.stride) for m in heads.members if m.param == qkv)
    assert ranges == [(0, 32, 16), (32, 48, 8), (48, 64, 8)]
    compressed = clone_module(module)
    compress_module(compressed, groups, {heads.id: (0,)})
    assert compressed.params[qkv].type.shape == (32, 32)
    assert compressed.params["model.layers.0.self_attn.o_proj.weight"].type.shape == (32, 16)
    masked = clone_module(module)
    zero_groups(masked, groups, {heads.id: (0,)})
    kept = torch.cat([torch.arange(16, 32), torch.arange(40, 48), torch.arange(56, 64)])
    assert torch.equal(compressed.params[qkv].storage.load(), masked.params[qkv].storage.load()[kept])
    ids, mask = random_batch(64, batch=2, seq=7)
    assert (ir_logits(masked, ids, mask) - ir_logits(compressed, ids, mask)).abs()[mask.bool()].max().item() <= 1e-5


def test_phi3_pruned_uniformly_reloads_in_transformers(tmp_path):
    """Phi-3 with one KV head (and its two query heads) removed in every layer: the emitted
    config says 2 heads over 1 KV head, and stock transformers sizes qkv_proj's q | k | v from
    it, with the same logits."""
    from transformers import AutoModelForCausalLM

    from lorashear.runtime.hf import save_model_dir

    torch.manual_seed(0)
    module = lower(AutoModelForCausalLM.from_config(_phi3(), attn_implementation="sdpa").eval())
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    compress_module(module, groups, {f.id: (1,) for f in groups.families if f.kind == "attn"})
    save_model_dir(module, tmp_path / "hf", merge=True)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (stock.config.num_attention_heads, stock.config.num_key_value_heads) == (2, 1)
    ids, mask = random_batch(64, batch=2, seq=7)
    with torch.no_grad():
        got = stock(input_ids=ids, attention_mask=mask).logits
    assert (got - ir_logits(module, ids, mask)).abs()[mask.bool()].max().item() <= 1e-5


def test_conv1d_lora_lowers_prunes_and_emits_in_checkpoint_layout(tmp_path):
    """GPT-2 with peft's LoRA on its Conv1D layers (``fan_in_fan_out``), lowered from saved
    directories: the weights stay references into the checkpoint (read transposed), the
    lowered logits are peft's, attention and MLP groups compress exactly, and the merged
    emission stores ``[in, out]`` again, so stock transformers reloads it with peft's logits."""
    from peft import LoraConfig
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    from lorashear.frontend.pretrained import lower_pretrained
    from lorashear.ir.storage import FileStorage
    from lorashear.runtime.hf import load_pretrained, save_model_dir
    from tests.conftest import with_lora

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_gpt2(), attn_implementation="sdpa").eval()
    base.save_pretrained(tmp_path / "model")
    peft_model = with_lora(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                            fan_in_fan_out=True), tmp_path / "adapter")
    ids, mask = random_batch(64, batch=2, seq=7)
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask).logits
    module = lower_pretrained(tmp_path / "model", adapter=tmp_path / "adapter")
    weight = module.params["transformer.h.0.attn.c_attn.weight"]
    assert weight.type.shape == (96, 32) and isinstance(weight.storage, FileStorage) and weight.storage.transposed
    assert sum(op.kind == "lora_linear" for op in module.graph.ops) == 8
    assert (ir_logits(module, ids, mask) - want).abs()[mask.bool()].max().item() <= 1e-4

    # merged and emitted unpruned: the checkpoint layout again, loadable by stock transformers
    save_model_dir(module, tmp_path / "merged", merge=True)
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert tuple(f.get_tensor("transformer.h.0.attn.c_attn.weight").shape) == (32, 96)
    stock = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (stock(input_ids=ids, attention_mask=mask).logits - want).abs()[mask.bool()].max().item() <= 1e-4
    assert (load_pretrained(tmp_path / "merged")(ids, attention_mask=mask).logits - want
            ).abs()[mask.bool()].max().item() <= 1e-4

    PassManager.parse("discover").run(module)
    kinds = {f.kind for f in module.attributes["groups"].families}
    assert {"attn", "mlp"} <= kinds
    PassManager.parse("prune{ratio=0.3,metric=random,kinds=attn,mlp}").run(module)
    masked = ir_logits(module, ids, mask)
    compressed = clone_module(module)
    PassManager.parse("compress").run(compressed)
    assert compressed.num_parameters() < module.num_parameters()
    small = ir_logits(compressed, ids, mask)
    assert (small - masked).abs()[mask.bool()].max().item() <= 1e-5
    save_model_dir(compressed, tmp_path / "pruned", merge=True)  # emitted pruned, reloaded by lorashear
    assert (load_pretrained(tmp_path / "pruned")(ids, attention_mask=mask).logits - small
            ).abs()[mask.bool()].max().item() <= 1e-4
