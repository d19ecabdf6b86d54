"""Activations of the decoders the #22 sweep met (relu^2 as ``square``, ``softplus``,
``log1p``, ``floor``): each lowers to one IR op whose traits give it coupling and zero rules,
so its MLP channels are found and prune exactly, in PyTorch and in ONNX Runtime."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from lorashear.analysis.masking import zero_groups
from lorashear.frontend.lower import lower
from lorashear.ir.core import clone_module
from lorashear.ir.ops import OP_DEFS
from lorashear.passes import PassManager
from lorashear.passes.compress import compress_module
from lorashear.runtime.executor import emit_torch
from tests.conftest import random_batch

VOCAB, HIDDEN, INNER = 32, 8, 16

ACTIVATIONS = {
    "square": lambda x: torch.square(F.relu(x)),  # Nemotron / Persimmon's relu^2
    "softplus": F.softplus,
    "log1p": lambda x: torch.log1p(F.relu(x)),
    "floor": lambda x: torch.floor(x * 4) / 4,
    "expm1": lambda x: torch.expm1(torch.clamp(x, max=1.0)),  # Apertus xIELU
}


class TinyActivationModel(nn.Module):
    """Embedding, one gated residual MLP with the activation ``name``, and a head."""

    def __init__(self, name: str, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.act = ACTIVATIONS[name]
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.gate = nn.Linear(HIDDEN, INNER, bias=False)
        self.up = nn.Linear(HIDDEN, INNER, bias=False)
        self.down = nn.Linear(INNER, HIDDEN, bias=False)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids)
        h = h + self.down(self.act(self.gate(h)) * self.up(h))
        return CausalLMOutput(logits=self.head(h))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_lowers_to_its_op_and_prunes_exactly(name):
    model = TinyActivationModel(name)
    module = lower(model)
    assert name in {op.kind for op in module.graph.ops}
    assert OP_DEFS[name].elementwise
    ids, mask = random_batch(VOCAB, batch=2, seq=6)
    with torch.no_grad():
        assert (emit_torch(module)(ids, attention_mask=mask).logits
                - model(ids).logits).abs().max().item() <= 1e-5
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    mlp = next(f for f in groups.families if f.size == INNER)
    rng = random.Random(0)
    removed = {mlp.id: tuple(sorted(rng.sample(range(INNER), INNER // 2)))}
    masked, compressed = clone_module(module), clone_module(module)
    zero_groups(masked, groups, removed)
    compress_module(compressed, groups, removed)
    assert compressed.params["down.weight"].type.shape == (HIDDEN, INNER - INNER // 2)
    with torch.no_grad():
        a = emit_torch(masked)(ids, attention_mask=mask).logits
        b = emit_torch(compressed)(ids, attention_mask=mask).logits
    assert (a - b).abs().max().item() <= 1e-4
