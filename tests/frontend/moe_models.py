"""The tiny Mixture-of-Experts models the MoE tests share: a seeded Mixtral, Qwen2-MoE (with a
shared expert) or Qwen3-MoE whose routers and experts are drawn away from their tiny init (so
routing varies between tokens), and one batch to compare logits on."""

from __future__ import annotations

import torch

from lorashear.frontend.lower import lower
from lorashear.runtime.executor import emit_torch

EXPERTS, TOP_K, LAYERS, HIDDEN = 4, 2, 2, 64


def moe_config(family: str):
    """``(config, key of the expert MLP width)`` of a tiny ``family`` model."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=128, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=TOP_K)
    if family == "mixtral":
        return MixtralConfig(**common, intermediate_size=48, num_local_experts=EXPERTS), "intermediate_size"
    if family == "qwen2_moe":  # with a shared expert beside the routed ones
        return Qwen2MoeConfig(**common, intermediate_size=80, moe_intermediate_size=32, num_experts=EXPERTS,
                              shared_expert_intermediate_size=40), "moe_intermediate_size"
    return Qwen3MoeConfig(**common, intermediate_size=80, moe_intermediate_size=32, num_experts=EXPERTS,
                          head_dim=16), "moe_intermediate_size"


def routed_base(family: str):
    """``(model, config, width key)``: the seeded tiny ``family`` model, its MLP weights
    redrawn at std 0.2."""
    from transformers import AutoModelForCausalLM

    config, width_key = moe_config(family)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if ".mlp." in name:
                p.normal_(0, 0.2)
    return base, config, width_key


class LoweredMoE:
    """A peft model, its logits on one seeded batch (``want``), and its lowering."""

    def __init__(self, peft_model) -> None:
        self.peft_model = peft_model
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 128, (2, 9), generator=g)
        self.mask = torch.ones_like(self.ids)
        with torch.no_grad():
            self.want = peft_model(input_ids=self.ids, attention_mask=self.mask).logits
        self.lowered = lower(peft_model)

    def logits(self, module) -> torch.Tensor:
        """``module``'s logits on the batch, through the executor."""
        with torch.no_grad():
            return emit_torch(module)(self.ids, attention_mask=self.mask).logits
