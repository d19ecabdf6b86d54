"""Sizes that are the min or max of the sequence length and a constant: DeepSeek-V3.2's (and
GLM-MoE-DSA's, HunYuan-V4's) sparse attention keeps ``min(index_topk, S)`` keys, MPT slices
its ALiBi table from ``max(0, max_seq_len - S)``. Their value changes within the lengths the
model accepts, so the IR keeps them symbolic (``min(5,S)``): the lowered model is right on
both sides of the bound, in PyTorch and in ONNX Runtime, and prints and parses back."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from lorashear.frontend.lower import lower
from lorashear.ir.parser import parse_module
from lorashear.ir.printer import print_module
from lorashear.passes import PassManager
from lorashear.runtime.executor import emit_torch
from tests.conftest import compress_exactly, random_batch

VOCAB, HIDDEN, INNER, TOPK, TABLE = 32, 16, 12, 5, 12


class SparseKeys(nn.Module):
    """Each position weights its MLP by the softmax mass of its ``min(TOPK, S)`` best keys,
    plus the mean of the last ``min(TABLE, S)`` entries of a position table."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.q = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.k = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.table = nn.Parameter(torch.randn(TABLE))
        self.gate = nn.Linear(HIDDEN, INNER, bias=False)
        self.up = nn.Linear(HIDDEN, INNER, bias=False)
        self.down = nn.Linear(INNER, HIDDEN, bias=False)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        seq = input_ids.shape[1]
        h = self.embed(input_ids)
        scores = self.q(h) @ self.k(h).transpose(1, 2)
        keep = min(TOPK, scores.shape[-1])
        best = scores.gather(-1, scores.topk(keep, dim=-1).indices)
        weight = (best.softmax(-1) * best.sigmoid()).sum(-1, keepdim=True)
        recent = self.table[max(0, TABLE - seq):]
        h = h + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h)) * weight + recent.mean(0)
        return CausalLMOutput(logits=self.head(h))


def test_min_and_max_of_the_length_stay_symbolic(tmp_path):
    model = SparseKeys().eval()
    module = lower(model)
    text = print_module(module)
    assert '"min(5,S)"' in text and "max(0," in text
    assert print_module(parse_module(text)) == text
    for seq in (3, 9):  # fewer and more positions than TOPK
        ids, _ = random_batch(VOCAB, batch=2, seq=seq)
        full = torch.ones_like(ids)
        with torch.no_grad():
            got = emit_torch(module)(ids, attention_mask=full).logits
            want = model(ids, attention_mask=full).logits
        assert (got - want).abs().max().item() <= 1e-5
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    mlp = next(f for f in groups.families if {("gate.weight", 0), ("down.weight", 1)}
               <= {(m.param, m.axis) for m in f.members})
    compress_exactly(model, module, VOCAB, {mlp.id: (1, 2, 7)}, tmp_path, seqs=(3, 9))
