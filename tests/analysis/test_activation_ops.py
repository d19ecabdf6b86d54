"""Activations of the decoders the #22 sweep met (relu^2 as ``square``, ``softplus``,
``log1p``, ``floor``, ``log_sigmoid``, one-sided clamps, ``floor_divide``): each lowers to one
IR op whose traits give it coupling and zero rules, so its MLP channels are found and prune
exactly, in PyTorch and in ONNX Runtime. A vector norm over the MLP channels (Zaya's q/k norm)
and ``squeeze()`` of a ``[1, n]`` parameter (Ernie-4.5-MoE's bias) prune exactly too."""

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
    "log_sigmoid": F.logsigmoid,  # Inkling's router
    "clamp_max": lambda x: torch.clamp_max(x, 0.1),  # Ergo's expert indices
    "clamp_min": lambda x: torch.clamp_min(x, -0.1),  # Zaya's norm floor
    "floor_divide": lambda x: torch.floor_divide(x * 4, torch.ones(()) * 1.5),  # LongCat
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


class TinyNormModel(nn.Module):
    """A gated MLP whose channels are divided by their L2 norm (clamped from below) and get a
    ``[1, INNER]`` bias read through ``squeeze()``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.gate = nn.Linear(HIDDEN, INNER, bias=False)
        self.up = nn.Linear(HIDDEN, INNER, bias=False)
        self.bias = nn.Parameter(torch.randn(1, INNER))
        self.down = nn.Linear(INNER, HIDDEN, bias=False)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids)
        u = F.silu(self.gate(h) + self.bias.squeeze()) * self.up(h)
        u = u / u.norm(p=2, dim=-1, keepdim=True).clamp_min(1e-6)
        return CausalLMOutput(logits=self.head(h + self.down(u)))


def test_vector_norm_and_squeeze_all_prune_exactly(tmp_path):
    from tests.conftest import compress_exactly

    model = TinyNormModel().eval()
    module = lower(model)
    kinds = {op.kind for op in module.graph.ops}
    assert {"linalg_vector_norm", "squeeze.dims", "clamp_min"} <= kinds
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    mlp = next(f for f in groups.families if {("gate.weight", 0), ("bias", 1), ("down.weight", 1)}
               <= {(m.param, m.axis) for m in f.members})
    compressed = compress_exactly(model, module, VOCAB, {mlp.id: (0, 5, 6, 13)}, tmp_path)
    assert compressed.params["bias"].type.shape == (1, INNER - 4)


def test_a_norm_of_order_below_one_pins_its_axis():
    class MinNorm(TinyNormModel):
        def forward(self, input_ids, attention_mask=None, use_cache=False):
            h = self.embed(input_ids)
            u = F.silu(self.gate(h)) * self.up(h)
            u = u / torch.linalg.vector_norm(u, ord=float("-inf"), dim=-1, keepdim=True).clamp_min(1e-6)
            return CausalLMOutput(logits=self.head(h + self.down(u)))

    module = lower(MinNorm().eval())
    PassManager.parse("discover").run(module)
    families = module.attributes["groups"].families
    assert not any(("gate.weight", 0) in {(m.param, m.axis) for m in f.members} for f in families)
