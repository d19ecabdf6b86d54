"""DeepSeek-V3-style routers (GLM-4-MoE here): sigmoid scores plus a load-balancing bias
(``e_score_correction_bias``) rank the experts, optionally within the best expert groups
(``n_group``: the mask of chosen groups is a ``scatter.value``). They lower exactly; a removed
expert is exact too, because the expert mask's ``-inf`` reaches the ranking's top-k, not only
the router's logits: with a bias that ranks the masked expert's score (zero) above the kept
ones', it would otherwise take a kept expert's place. And a token that names one expert twice
(LongCat's zero experts) gets both weights, as transformers' eager experts loop gives it."""

from __future__ import annotations

import pytest
import torch

from lorashear.analysis.masking import zero_groups
from lorashear.frontend.lower import lower
from lorashear.ir.core import clone_module
from lorashear.passes import PassManager
from lorashear.passes.compress import compress_module
from lorashear.runtime.executor import emit_torch

EXPERTS = 4


def _glm4_moe(n_group: int):
    from transformers import AutoModelForCausalLM, Glm4MoeConfig

    torch.manual_seed(0)
    config = Glm4MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           n_routed_experts=EXPERTS, num_experts_per_tok=2, n_group=n_group,
                           topk_group=1, first_k_dense_replace=1, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.normal_(0, 0.2)
        # experts 1.. score below zero: a masked expert 0 (score sigmoid(-inf) + 0 = 0) outranks them
        model.model.layers[1].mlp.gate.e_score_correction_bias.copy_(torch.tensor([0.0, -2.0, -2.0, -2.0]))
    return model


def _logits(module, ids):
    with torch.no_grad():
        return emit_torch(module)(ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("n_group", [1, 2])
def test_biased_router_lowers_exactly(n_group):
    model = _glm4_moe(n_group)
    module = lower(model)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert (_logits(module, ids) - want).abs().max().item() <= 1e-5
    assert any(op.kind == "scatter.value" for op in module.graph.ops)  # the chosen groups
    PassManager.parse("discover").run(module)
    experts = [f for f in module.attributes["groups"].families if f.kind == "expert"]
    # an expert group's block of the router's axis (n_group > 1) is not one expert: no family
    assert len(experts) == (1 if n_group == 1 else 0)


def test_removing_an_expert_of_a_biased_router_is_exact():
    module = lower(_glm4_moe(1))
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    (experts,) = [f for f in groups.families if f.kind == "expert"]
    assert ("model.layers.1.mlp.gate.e_score_correction_bias", 0) in {(m.param, m.axis) for m in experts.members}
    masked, compressed = clone_module(module), clone_module(module)
    zero_groups(masked, groups, {experts.id: (0,)})
    compress_module(compressed, groups, {experts.id: (0,)})
    assert compressed.params["model.layers.1.mlp.gate.weight"].type.shape[0] == EXPERTS - 1
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    assert (_logits(masked, ids) - _logits(module, ids)).abs().max().item() > 1e-3  # the expert mattered
    assert (_logits(masked, ids) - _logits(compressed, ids)).abs().max().item() <= 1e-5


def test_dense_experts_add_the_weights_of_an_expert_named_twice():
    """LongCat's zero experts are renamed to real experts with weight 0, so a token can name
    one expert twice: the eager loop adds both terms (``index_add``), and so must the dense
    forward's routing matrix (``scatter_add``, not ``scatter``)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from lorashear.frontend.moe import dense_experts_forward

    torch.manual_seed(0)
    experts = MixtralExperts(MixtralConfig(hidden_size=8, intermediate_size=6, num_local_experts=3))
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(4, 8)
    index = torch.tensor([[0, 0], [1, 2], [2, 2], [1, 0]])
    weights = torch.tensor([[0.7, 0.0], [0.4, 0.6], [0.0, 0.9], [0.5, 0.5]])
    with torch.no_grad():
        want = experts(x, index, weights)  # transformers' eager loop
        got = dense_experts_forward(experts, x, index, weights)
    assert (got - want).abs().max().item() <= 1e-6
