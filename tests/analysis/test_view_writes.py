"""In-place writes through views (Cohere-Compass's multimodal rotary writes strided slices of a
selected row, Gemma 3n's AltUp adds into a permuted product and into a slice) lower as new
values of the viewed tensors (``slice_scatter``, ``select_scatter``, inverse permutations),
and Gemma 3n's Gaussian top-k (``broadcast_tensors``, ``std``, a normal quantile through
``erfinv``, ``torch.distributions``' unused argument checks) and DeepSeek-V2's complex rotary
(complex values as real ``[..., 2]``) lower too: the tiny models give the same logits, their
channels compress exactly, and ONNX Runtime agrees."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from lorashear.errors import LoweringError
from lorashear.frontend.lower import lower
from lorashear.passes import PassManager
from tests.conftest import compress_exactly

VOCAB, HIDDEN, INNER = 32, 12, 16


class WritesThroughViews(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.mix = nn.Linear(HIDDEN, 3 * HIDDEN, bias=False)
        self.gate = nn.Linear(HIDDEN, INNER, bias=False)
        self.up = nn.Linear(HIDDEN, INNER, bias=False)
        self.down = nn.Linear(INNER, HIDDEN, bias=False)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        batch, seq = input_ids.shape
        h = self.embed(input_ids)
        freq = self.mix(h).view(batch, seq, 3, HIDDEN).permute(2, 0, 1, 3).sin()  # [3, B, S, H]
        first = freq[0]  # a view: the writes below change freq too
        for row, offset in ((1, 1), (2, 2)):
            first[..., offset:HIDDEN:3] = freq[row, ..., offset:HIDDEN:3]
        predictions = torch.matmul(freq.permute(1, 2, 3, 0), torch.ones(3, 3)).permute(3, 0, 1, 2)
        predictions += freq  # into a permuted product
        predictions[1:] += first  # into a slice, then read whole
        h = h + predictions.sum(0) + freq[2]
        return CausalLMOutput(logits=self.head(h + self.down(F.silu(self.gate(h)) * self.up(h))))


class StaleView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids) * 2
        early = h[..., :4]  # made before the write, read after it
        h[..., 4:8] += 1.0
        return CausalLMOutput(logits=torch.cat([early, h], -1))


class GaussianTopK(nn.Module):
    """Gemma 3n's sparse MLP activations: keep what lies above mean + z * std, z a normal
    quantile."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.gate = nn.Linear(HIDDEN, INNER, bias=False)
        self.up = nn.Linear(HIDDEN, INNER, bias=False)
        self.scale = nn.Parameter(torch.randn(HIDDEN))
        self.down = nn.Linear(INNER, HIDDEN, bias=False)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids)
        h, scale = torch.broadcast_tensors(h, self.scale)
        h = h * scale
        gate = self.gate(h)
        normal = torch.distributions.normal.Normal(0, 1)
        z = normal.icdf(torch.tensor(0.8, dtype=torch.float32))
        cutoff = gate.mean(-1, keepdim=True) + gate.std(-1, keepdim=True, unbiased=False) * z
        u = F.relu(gate - cutoff) * self.up(h)
        return CausalLMOutput(logits=self.head(h + self.down(u)))


def _mlp(module):
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    return next(f for f in groups.families if {("up.weight", 0), ("down.weight", 1)}
                <= {(m.param, m.axis) for m in f.members})


def test_writes_through_views_lower_as_values(tmp_path):
    model = WritesThroughViews().eval()
    module = lower(model)
    kinds = [op.kind for op in module.graph.ops]
    assert kinds.count("slice_scatter") >= 3 and kinds.count("select_scatter") == 2
    compressed = compress_exactly(model, module, VOCAB, {_mlp(module).id: (0, 3, 9)}, tmp_path)
    assert compressed.params["up.weight"].type.shape == (INNER - 3, HIDDEN)


def test_a_view_made_before_a_write_and_read_after_it_is_refused():
    with pytest.raises(LoweringError, match="made before the write is read after it"):
        lower(StaleView())


def test_gaussian_top_k_lowers(tmp_path):
    model = GaussianTopK().eval()
    module = lower(model)
    kinds = {op.kind for op in module.graph.ops}
    assert {"erfinv", "std", "expand"} <= kinds
    PassManager.parse("discover").run(module)
    families = module.attributes["groups"].families
    # the MLP channels are pinned by the mean and spread over them; the hidden ones are not
    assert not any(("gate.weight", 0) in {(m.param, m.axis) for m in f.members} for f in families)
    hidden = next(f for f in families if ("scale", 0) in {(m.param, m.axis) for m in f.members})
    compressed = compress_exactly(model, module, VOCAB, {hidden.id: (1, 2, 7)}, tmp_path)
    assert compressed.params["scale"].type.shape == (HIDDEN - 3,)


class ComplexRotary(nn.Module):
    """DeepSeek-V2's rotary in complex form: channel pairs as complex numbers rotated by
    ``polar(1, angle)``; with ``modulus``, a complex op the real layout does not cover."""

    def __init__(self, modulus: bool = False) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.modulus = modulus
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.q = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.register_buffer("inv_freq", torch.rand(HIDDEN // 2), persistent=False)
        self.up = nn.Linear(HIDDEN, INNER, bias=False)
        self.down = nn.Linear(INNER, HIDDEN, bias=False)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        batch, seq = input_ids.shape
        h = self.embed(input_ids)
        angles = torch.arange(seq, dtype=torch.float32)[:, None] * self.inv_freq  # [S, H/2]
        rotation = torch.polar(torch.ones_like(angles), angles) * 0.5
        pairs = torch.view_as_complex(self.q(h).float().reshape(batch, seq, -1, 2))
        if self.modulus:
            return CausalLMOutput(logits=self.head(pairs.abs().repeat(1, 1, 2)))
        rotated = torch.view_as_real(pairs * rotation.unsqueeze(0)).flatten(2)
        return CausalLMOutput(logits=self.head(h + rotated + self.down(F.relu(self.up(h)))))


def test_complex_rotary_lowers_in_real_layout(tmp_path):
    model = ComplexRotary().eval()
    module = lower(model)
    assert all(getattr(v.type, "dtype", None) != "c64" for op in module.graph.ops for v in op.results)
    assert {"cos", "sin", "stack", "select"} <= {op.kind for op in module.graph.ops}
    compress_exactly(model, module, VOCAB, {_mlp(module).id: (2, 5)}, tmp_path)


def test_other_complex_arithmetic_is_refused_naming_the_op():
    with pytest.raises(LoweringError, match="abs.default .* computes with complex numbers"):
        lower(ComplexRotary(modulus=True))
