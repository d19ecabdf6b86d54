"""More ops of the #22 sweep's decoders, in two tiny models that lower to the same logits,
whose attention and MLP groups ``discover`` finds, and whose random groups compress exactly,
in PyTorch and in ONNX Runtime:

- a fused ``query_key_value`` viewed as ``[.., heads, 3, head_dim]`` and picked apart with
  ``select`` (BLOOM, Persimmon, Fuyu), with a query/key LayerNorm over head_dim (Persimmon);
  a causal ``pad`` and a depthwise ``conv1d`` over the sequence (LFM, Zaya), a dense
  ``conv1d`` as output projection, an ``einsum`` (ProphetNet) and ``eye`` (XLNet);
- grouped-query attention by ``repeat`` (DiffLlama), keys assembled in a ``new_empty``
  buffer slice by slice (MiniCPM3's and DeepSeek's latent attention), and a ``torch.no_grad``
  region inside the forward (HunYuan's indexer).
"""

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

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INNER, KERNEL = 32, 16, 4, 2, 4, 12, 3


class FusedSweepOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.qkv = nn.Linear(HIDDEN, HEADS * 3 * HEAD_DIM)
        self.q_norm = nn.LayerNorm(HEAD_DIM)
        self.k_norm = nn.LayerNorm(HEAD_DIM)
        self.o = nn.Conv1d(HEADS * HEAD_DIM, HIDDEN, 1)  # a dense convolution as output projection
        self.up = nn.Linear(HIDDEN, INNER)
        self.conv = nn.Conv1d(INNER, INNER, KERNEL, groups=INNER)  # depthwise, over the sequence
        self.down = nn.Linear(INNER, HIDDEN, bias=False)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        batch, seq = input_ids.shape
        h = self.embed(input_ids)
        qkv = self.qkv(h).view(batch, seq, HEADS, 3, HEAD_DIM)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        q, k = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True)
        attn = attn.transpose(1, 2).reshape(batch, seq, HEADS * HEAD_DIM)
        h = h + self.o(attn.transpose(1, 2)).transpose(1, 2)
        u = F.pad(self.up(h).transpose(1, 2), (KERNEL - 1, 0))  # causal: past positions only
        u = torch.tanh(self.conv(u)).transpose(1, 2)
        h = h + torch.einsum("bsi,oi->bso", u, self.down.weight)
        diagonal = torch.eye(seq, dtype=h.dtype).sum(-1)[None, :, None]
        return CausalLMOutput(logits=self.head(h * diagonal))


class FilledKeys(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.q = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)
        self.gate = nn.Linear(HIDDEN, INNER, bias=False)
        self.down = nn.Linear(INNER, HIDDEN, bias=False)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        batch, seq = input_ids.shape
        h = self.embed(input_ids)
        q = self.q(h).view(batch, seq, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k(h).view(batch, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v(h).view(batch, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        key = k.new_empty(batch, KV_HEADS, seq, HEAD_DIM)
        key[..., :HEAD_DIM // 2].copy_(k[..., :HEAD_DIM // 2] * 2)
        key[..., HEAD_DIM // 2:].copy_(k[..., HEAD_DIM // 2:])
        key = key.repeat(1, HEADS // KV_HEADS, 1, 1)  # query head i reads KV head i % KV_HEADS
        v = v.repeat(1, HEADS // KV_HEADS, 1, 1)
        attn = F.scaled_dot_product_attention(q, key, v, is_causal=True)
        h = h + self.o(attn.transpose(1, 2).reshape(batch, seq, HEADS * HEAD_DIM))
        with torch.no_grad():
            gate = torch.sigmoid(self.gate(h))
        return CausalLMOutput(logits=self.head(h + self.down(gate * gate)))


def _family(groups, axes: set[tuple[str, int]]):
    """The family running along every one of ``axes`` (parameter, axis)."""
    return next(f for f in groups.families if axes <= {(m.param, m.axis) for m in f.members})


def test_fused_select_convolutions_einsum_and_eye(tmp_path):
    model = FusedSweepOps().eval()
    module = lower(model)
    kinds = {op.kind for op in module.graph.ops}
    assert {"select", "layer_norm", "pad", "conv1d", "einsum", "eye"} <= kinds
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    attn = _family(groups, {("qkv.weight", 0), ("qkv.bias", 0), ("o.weight", 1)})
    assert attn.kind == "attn" and attn.size == HEADS  # a head of the fused projection
    assert "q_norm.weight" not in {m.param for m in attn.members}  # normalised over: head_dim
    mlp = _family(groups, {("up.weight", 0), ("conv.weight", 0), ("conv.bias", 0), ("down.weight", 1)})
    assert mlp.size == INNER  # (kind "other": the toy model has no numbered layers)
    compressed = compress_exactly(model, module, VOCAB, {attn.id: (0, 2), mlp.id: (1, 4, 5, 9)}, tmp_path)
    assert compressed.params["qkv.weight"].type.shape == (2 * 3 * HEAD_DIM, HIDDEN)
    assert compressed.params["conv.weight"].type.shape == (INNER - 4, 1, KERNEL)
    assert compressed.params["o.weight"].type.shape == (HIDDEN, 2 * HEAD_DIM, 1)


def test_repeated_heads_filled_buffer_and_no_grad_region(tmp_path):
    model = FilledKeys().eval()
    module = lower(model)
    kinds = {op.kind for op in module.graph.ops}
    assert {"repeat", "concat"} <= kinds and "new_empty" not in kinds
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    attn = _family(groups, {("q.weight", 0), ("k.weight", 0), ("v.weight", 0), ("o.weight", 1)})
    assert attn.kind == "attn" and attn.size == KV_HEADS  # a KV head with its tiled copies
    mlp = _family(groups, {("gate.weight", 0), ("down.weight", 1)})
    compressed = compress_exactly(model, module, VOCAB, {attn.id: (1,), mlp.id: (0, 3, 7)}, tmp_path)
    assert compressed.params["k.weight"].type.shape == (HEAD_DIM, HIDDEN)
    assert compressed.params["q.weight"].type.shape == (HEAD_DIM * HEADS // KV_HEADS, HIDDEN)


class HalfFilled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids)
        buffer = h.new_empty(*h.shape)
        buffer[..., :HIDDEN // 2].copy_(h[..., :HIDDEN // 2])
        return CausalLMOutput(logits=buffer)


def test_a_buffer_left_partly_empty_is_refused():
    with pytest.raises(LoweringError, match="not filled whole by copies"):
        lower(HalfFilled())


class BooleanArithmetic(nn.Module):
    """Multiplies and adds boolean masks (Reformer): ONNX has no boolean Mul or Add."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        both = (input_ids > 3) * (input_ids < 20)
        either = (input_ids < 2) + (input_ids > 30)
        h = self.embed(input_ids).masked_fill(both[..., None], 0.5).masked_fill(either[..., None], -1.0)
        return CausalLMOutput(logits=self.head(h))


def test_boolean_arithmetic_emits_as_logic(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from lorashear.runtime.onnx_emit import emit_onnx

    model = BooleanArithmetic().eval()
    module = lower(model)
    emit_onnx(module, tmp_path / "bool.onnx")
    session = ort.InferenceSession(str(tmp_path / "bool.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.arange(VOCAB).view(2, VOCAB // 2)
    (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()})
    with torch.no_grad():
        want = model(ids).logits
    assert (torch.as_tensor(got) - want).abs().max().item() <= 1e-5
