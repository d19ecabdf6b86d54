"""Lowering + text round trip + torch/hf emission against the original HF / peft models."""

from __future__ import annotations

import pytest
import torch

from lorashear.ir.fileformat import load_ir, save_ir
from lorashear.ir.parser import parse_module
from lorashear.ir.printer import print_module
from lorashear.runtime.executor import emit_torch
from lorashear.runtime.hf import load_pretrained, save_model_dir
from tests.conftest import FAMILIES, random_batch

CASES = [(f, lora) for f in FAMILIES for lora in (False, True)]


def _reference(tm, with_lora):
    return tm.peft if with_lora else tm.base


def _max_diff(a, b, mask=None):
    diff = (a - b).abs()
    if mask is not None:  # padded query positions are undefined in HF too
        diff = diff[mask.bool()]
    return diff.max().item()


@pytest.mark.parametrize("family,with_lora", CASES)
def test_print_parse_print_is_identity(lowered, family, with_lora):
    module = lowered(family, with_lora)
    text = print_module(module)
    assert print_module(parse_module(text)) == text
    assert sum(op.kind == "lora_linear" for op in module.graph.ops) == (
        7 * module.attributes["config"].config["num_hidden_layers"] if with_lora else 0)


@pytest.mark.parametrize("family,with_lora", CASES)
def test_emitted_torch_matches_original(tiny_models, lowered, family, with_lora):
    tm = tiny_models[family]
    ref_model = _reference(tm, with_lora)
    model = emit_torch(lowered(family, with_lora))
    ids, mask = random_batch(tm.base.config.vocab_size)
    with torch.no_grad():
        if with_lora:
            tm.peft.enable_adapter_layers()
        else:
            tm.peft.disable_adapter_layers()
        try:
            assert _max_diff(model(ids).logits, ref_model(input_ids=ids).logits) <= 1e-4
            got = model(ids, attention_mask=mask).logits
            want = ref_model(input_ids=ids, attention_mask=mask).logits
            assert _max_diff(got, want, mask) <= 1e-4
        finally:
            tm.peft.enable_adapter_layers()


@pytest.mark.parametrize("family", FAMILIES)
def test_ir_file_and_model_dirs_reload_equal(tiny_models, lowered, family, tmp_path):
    """`.ir` save/load, the torch dir and the hf dir all give the peft model's logits."""
    from transformers import AutoModelForCausalLM

    tm = tiny_models[family]
    module = lowered(family, True)
    ids, mask = random_batch(tm.base.config.vocab_size, seed=7)
    with torch.no_grad():
        want = tm.peft(input_ids=ids, attention_mask=mask).logits
        save_ir(module, tmp_path / "m.ir")
        from_ir = emit_torch(load_ir(tmp_path / "m.ir"))(ids, attention_mask=mask).logits
        save_model_dir(module, tmp_path / "torch", merge=False)
        torch_dir = load_pretrained(tmp_path / "torch")
        assert any(p.requires_grad for p in torch_dir.parameters()), "LoRA stays trainable"
        save_model_dir(module, tmp_path / "hf", merge=True)
        hf_dir = load_pretrained(tmp_path / "hf")(ids, attention_mask=mask).logits
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        from_stock = stock(input_ids=ids, attention_mask=mask).logits
        for got in (from_ir, torch_dir(ids, attention_mask=mask).logits, hf_dir, from_stock):
            assert _max_diff(got, want, mask) <= 1e-4
    # the .ir references the checkpoint instead of copying it
    assert (tmp_path / "m.ir").stat().st_size < 64 * 1024
    assert "file(" in (tmp_path / "m.ir").read_text()


def test_executor_trains_lora_only(lowered, tiny_models):
    model = emit_torch(lowered("llama", True)).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    ids, _ = random_batch(tiny_models["llama"].base.config.vocab_size)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in trainable), n


def test_lower_in_memory_peft_model(tiny_models):
    """`lorashear.lower(model)` on a live PeftModel gives the same logits."""
    import lorashear

    tm = tiny_models["qwen2"]
    module = lorashear.lower(tm.peft)
    ids, mask = random_batch(tm.base.config.vocab_size, seed=3)
    with torch.no_grad():
        got = lorashear.emit_torch(module)(ids, attention_mask=mask).logits
        want = tm.peft(input_ids=ids, attention_mask=mask).logits
    assert _max_diff(got, want, mask) <= 1e-4


def test_fresh_lora_keeps_function(tiny_models):
    from lorashear.frontend.pretrained import lower_pretrained

    tm = tiny_models["mistral"]
    module = lower_pretrained(tm.model_dir, lora_rank=2, lora_targets=["q_proj", "down_proj"])
    assert sum(op.kind == "lora_linear" for op in module.graph.ops) == 2 * 3
    ids, _ = random_batch(tm.base.config.vocab_size)
    with torch.no_grad(), tm.peft.disable_adapter():  # peft injected its layers into `base`
        assert _max_diff(emit_torch(module)(ids).logits, tm.base(input_ids=ids).logits) <= 1e-4
