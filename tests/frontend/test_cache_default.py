"""A causal LM whose forward takes no ``use_cache`` (GraniteMoE's passes ``**kwargs`` on, and its
model takes the config's default, True) would return its ``DynamicCache``, which
``torch.export`` cannot flatten: lowering traces with the config's default off, and restores it."""

from __future__ import annotations

import torch

from lorashear.frontend.lower import lower
from lorashear.runtime.executor import emit_torch


def test_a_forward_without_use_cache_lowers_without_its_cache():
    from transformers import AutoModelForCausalLM, GraniteMoeConfig

    torch.manual_seed(0)
    config = GraniteMoeConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=2, num_local_experts=2,
                              num_experts_per_tok=1, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.config.use_cache
    module = lower(model)
    assert model.config.use_cache  # restored
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = emit_torch(module)(ids, attention_mask=torch.ones_like(ids)).logits
    assert (got - want).abs().max().item() <= 1e-5
