"""Routing ops of the #22 sweep's Mixture-of-Experts decoders beyond Mixtral's: DeepSeek-V3's
group-limited routing marks the chosen expert groups by scattering a scalar into a mask
(``group_mask.scatter_(1, group_idx, 1)``: GLM-4-MoE, Solar-Open, EXAONE-MoE, MiMo-V2...) and
JetMoE marks the chosen experts so (``zeros.scatter(1, top_k, 1)``). Both lower to
``scatter.value``, which pins the axes it writes along; a tiny model that weights its MLP by
such masks lowers to the same logits, and its MLP channels compress exactly, in PyTorch and in
ONNX Runtime."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from lorashear.analysis.coupling_rules import PIN_REASONS
from lorashear.frontend.lower import lower
from lorashear.passes import PassManager
from tests.conftest import compress_exactly

VOCAB, HIDDEN, INNER, EXPERTS, GROUPS = 32, 16, 12, 6, 3


class GroupLimitedRouting(nn.Module):
    """A router over ``EXPERTS`` scores in ``GROUPS`` groups: the best group's mask (scattered
    in place, as DeepSeek-V3) and the top-2 experts' mask (scattered out of place, as JetMoE)
    weight a gated MLP's output per token."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.router = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.gate = nn.Linear(HIDDEN, INNER, bias=False)
        self.up = nn.Linear(HIDDEN, INNER, bias=False)
        self.down = nn.Linear(INNER, HIDDEN, bias=False)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        batch, seq = input_ids.shape
        h = self.embed(input_ids)
        scores = self.router(h).sigmoid().view(-1, EXPERTS)
        group_scores = scores.view(-1, GROUPS, EXPERTS // GROUPS).sum(-1)
        group_idx = torch.topk(group_scores, k=1, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, GROUPS, EXPERTS // GROUPS).reshape(-1, EXPERTS)
        chosen = torch.topk(scores.masked_fill(~score_mask.bool(), 0.0), k=2, dim=-1)[1]
        expert_mask = torch.zeros(batch * seq, EXPERTS, dtype=h.dtype).scatter(1, chosen, 1)
        weight = (scores * expert_mask).sum(-1).view(batch, seq, 1)
        h = h + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h)) * weight
        return CausalLMOutput(logits=self.head(h))


def test_scattered_scalar_masks_lower_and_prune_exactly(tmp_path):
    model = GroupLimitedRouting().eval()
    module = lower(model)
    assert sum(op.kind == "scatter.value" for op in module.graph.ops) == 2
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    mlp = next(f for f in groups.families if {("gate.weight", 0), ("down.weight", 1)}
               <= {(m.param, m.axis) for m in f.members})
    assert mlp.size == INNER
    # the router's rows (the experts) are pinned by the top-k and the scatters
    assert ("router.weight", 0) not in {(m.param, m.axis) for f in groups.families for m in f.members}
    compressed = compress_exactly(model, module, VOCAB, {mlp.id: (0, 3, 4, 11)}, tmp_path)
    assert compressed.params["down.weight"].type.shape == (HIDDEN, INNER - 4)


def test_scatter_value_pins_with_its_reason():
    assert "data-dependent positions" in PIN_REASONS["scatter.value"]
