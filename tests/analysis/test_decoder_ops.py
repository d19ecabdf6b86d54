"""Ops of real decoders the #22 sweep met, in one tiny model: interleaved rotary and
grouped-query attention by ``repeat_interleave`` (Cohere, GLM, GPT-J), attention-sink style
``max(dim)`` (gpt-oss), ``2 ** x`` (``pow.Scalar``), ``where(c, scalar, x)`` (Gemma 4),
in-place ``mul_``, ``x.T`` (Falcon), ``view_as``/``reshape_as``/``expand_as``, ``max(a, b)``
(XGLM). The model lowers to the same logits, ``discover`` finds
its attention (KV heads with their copies) and MLP groups, and random groups compress exactly,
in PyTorch and in ONNX Runtime."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from lorashear.analysis.masking import zero_groups
from lorashear.errors import LoweringError
from lorashear.frontend.lower import lower
from lorashear.ir.core import clone_module
from lorashear.passes import PassManager
from lorashear.passes.compress import compress_module
from tests.conftest import ir_logits, random_batch

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INNER = 32, 16, 4, 2, 4, 12


class TinyDecoderOps(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.q = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)
        self.gate = nn.Linear(HIDDEN, INNER, bias=False)
        self.up = nn.Linear(HIDDEN, INNER, bias=False)
        self.down = nn.Linear(INNER, HIDDEN, bias=False)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.scale = nn.Parameter(torch.ones(1) * 0.5)

    def _rotate(self, x, cos, sin):
        """Interleaved rotary (GPT-J): pairs (0, 1), (2, 3), ... rotate together."""
        even, odd = x[..., ::2], x[..., 1::2]
        rotated = torch.stack((-odd, even), dim=-1).flatten(-2)
        return x * cos + rotated * sin

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        batch, seq = input_ids.shape
        h = self.embed(input_ids)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
        angles = torch.arange(seq, dtype=torch.float32)[:, None] * inv_freq[None, :]
        cos = angles.cos().repeat_interleave(2, dim=-1)  # interleaved rotary
        sin = angles.sin().repeat_interleave(2, dim=-1)
        q = self.q(h).view(batch, seq, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k(h).view(batch, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v(h).view(batch, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)  # grouped-query copies
        v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
        scores = q @ k.transpose(-1, -2) / HEAD_DIM ** 0.5
        causal = torch.ones(seq, seq, dtype=torch.bool).tril().T.T  # numpy_T, twice
        scores = scores.masked_fill(~causal, -1e9)
        scores = torch.max(scores, torch.tensor(-1e4))  # XGLM's clamp from below
        sink = scores.max(dim=-1, keepdim=True).values  # attention-sink style stabiliser
        probs = torch.softmax(scores - sink, dim=-1)
        attn = (probs @ v).transpose(1, 2)
        flat = self.q(h)
        attn = attn.reshape_as(flat)
        h = h + self.o(attn)
        gate = self.gate(h)
        act = torch.where(gate < 0, 0.0, gate)  # relu as where(c, scalar, x)
        act.mul_(self.up(h))  # in place
        padding = attention_mask[..., None].to(act.dtype)
        scale = (2.0 ** self.scale).view(1, 1, 1).expand_as(padding).reshape(-1).view_as(padding)
        h = h + self.down(act * scale)
        return CausalLMOutput(logits=self.head(h))


def test_decoder_ops_lower_discover_and_compress_exactly(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from lorashear.runtime.onnx_emit import emit_onnx

    model = TinyDecoderOps().eval()
    module = lower(model)
    kinds = {op.kind for op in module.graph.ops}
    assert {"repeat_interleave", "max.dim", "pow.scalar", "where.scalar_self", "maximum", "permute"} <= kinds
    ids, mask = random_batch(VOCAB, batch=2, seq=6)
    full = torch.ones_like(mask)
    with torch.no_grad():
        want = model(ids, attention_mask=full).logits
    assert (ir_logits(module, ids, full) - want).abs().max().item() <= 1e-5

    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    attn = next(f for f in groups.families if f.kind == "attn")
    assert attn.size == KV_HEADS  # a KV head with its interleaved query-head copies
    assert {m.param for m in attn.members} >= {"q.weight", "k.weight", "v.weight", "o.weight"}
    mlp = next(f for f in groups.families if {m.param for m in f.members} == {"gate.weight", "up.weight",
                                                                               "down.weight"})
    assert mlp.size == INNER
    rng = random.Random(0)
    removed = {attn.id: (1,), mlp.id: tuple(sorted(rng.sample(range(INNER), 5)))}
    masked, compressed = clone_module(module), clone_module(module)
    zero_groups(masked, groups, removed)
    compress_module(compressed, groups, removed)
    assert compressed.params["k.weight"].type.shape == (HEAD_DIM, HIDDEN)
    assert compressed.params["q.weight"].type.shape == (HEAD_DIM * HEADS // KV_HEADS, HIDDEN)
    assert compressed.params["down.weight"].type.shape == (HIDDEN, INNER - 5)
    for batch_mask in (full,):
        assert (ir_logits(masked, ids, batch_mask) - ir_logits(compressed, ids, batch_mask)).abs().max().item() <= 1e-4

    path = tmp_path / "ops.onnx"
    emit_onnx(compressed, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for seq in (6, 9):
        ids, _ = random_batch(VOCAB, batch=2, seq=seq)
        full = torch.ones_like(ids)
        (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": full.numpy()})
        assert (torch.as_tensor(got) - ir_logits(compressed, ids, full)).abs().max().item() <= 1e-4


class InPlaceIntoReadTensor(nn.Module):
    """``x.mul_(2)`` where a view of x is read afterwards: out of place it would compute
    otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        x = self.embed(input_ids) + 1
        y = x.view(-1, HIDDEN)
        x.mul_(2)
        return CausalLMOutput(logits=self.head(y.view_as(x)))


def test_in_place_write_into_a_tensor_read_later_is_refused():
    with pytest.raises(LoweringError, match=r"in-place op aten\.mul_\.Tensor .* a view shares"):
        lower(InPlaceIntoReadTensor())


class TransposedLinearModel(nn.Module):
    """Falcon's linear layer (``x @ W.T``) under a peft LoRA, and Gemma 3's ``ids[mask] = v``."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.models.falcon.modeling_falcon import FalconLinear

        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.up = FalconLinear(HIDDEN, INNER, bias=False)
        self.down = FalconLinear(INNER, HIDDEN, bias=False)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        ids = input_ids.clone()
        ids[ids == VOCAB - 1] = 0  # index_put with one boolean mask
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(h)))
        return CausalLMOutput(logits=self.head(h))


def test_transposed_matmul_is_a_linear_layer_and_its_lora_fuses(tmp_path):
    from peft import LoraConfig, get_peft_model

    ort = pytest.importorskip("onnxruntime")
    from lorashear.runtime.onnx_emit import emit_onnx

    model = get_peft_model(TransposedLinearModel(), LoraConfig(r=2, lora_alpha=4, target_modules=["up", "down"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.eval()
    module = lower(model)
    kinds = [op.kind for op in module.graph.ops]
    assert kinds.count("lora_linear") == 2 and "matmul" not in kinds and "index_put" in kinds
    ids, _ = random_batch(VOCAB, batch=2, seq=6)
    ids[0, 1] = VOCAB - 1
    full = torch.ones_like(ids)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=full).logits
    assert (ir_logits(module, ids, full) - want).abs().max().item() <= 1e-5
    emit_onnx(module, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": full.numpy()})
    assert (torch.as_tensor(got) - want).abs().max().item() <= 1e-4


class ClippedPositions(nn.Module):
    """MPT's ALiBi clipped to a maximum length: a size ``min(S, 4)``, which the IR keeps;
    with ``cycle``, a size ``S mod 3 + 1``, which it has no arithmetic for."""

    def __init__(self, cycle: bool = False) -> None:
        super().__init__()
        self.cycle = cycle
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        seq = input_ids.shape[1]
        size = seq % 3 + 1 if self.cycle else torch.sym_min(seq, 4)
        bias = torch.arange(size, dtype=torch.float32).sum(0)
        return CausalLMOutput(logits=self.head(self.embed(input_ids)) + bias)


def test_a_min_of_sizes_lowers_and_a_size_outside_the_arithmetic_is_refused():
    model = ClippedPositions()
    module = lower(model)
    for seq in (3, 7):
        ids = torch.randint(0, VOCAB, (1, seq))
        assert (ir_logits(module, ids, torch.ones_like(ids)) - model(ids).logits).abs().max().item() <= 1e-6
    with pytest.raises(LoweringError, match=r"a size \(Mod\(S,3\)\)\+1 outside the IR's size arithmetic"):
        lower(ClippedPositions(cycle=True))


class BiasFreeLayerNorm(nn.Module):
    """OLMo's layer norm: no bias (and no weight)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN, elementwise_affine=True, bias=False)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids)
        h = torch.nn.functional.layer_norm(self.norm(h), (HIDDEN,))
        return CausalLMOutput(logits=self.head(h))


def test_a_bias_free_layer_norm_runs_in_onnx_runtime(tmp_path):
    """ONNX Runtime's optimiser crashed the process on LayerNormalization with an empty bias."""
    ort = pytest.importorskip("onnxruntime")
    from lorashear.runtime.onnx_emit import emit_onnx

    model = BiasFreeLayerNorm().eval()
    module = lower(model)
    emit_onnx(module, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    ids, _ = random_batch(VOCAB, batch=2, seq=5)
    (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()})
    with torch.no_grad():
        assert (torch.as_tensor(got) - model(ids).logits).abs().max().item() <= 1e-4


class DataDependentSizes(nn.Module):
    """JetMoE's router reads how many tokens each expert got into Python (``.tolist()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids)
        count = (input_ids > 3).sum((0, 1)).item()
        torch._check(count >= 0)
        torch._check(count <= input_ids.numel())
        chosen = h.reshape(-1, HIDDEN)[:count].sum(0)
        return CausalLMOutput(logits=(h + chosen)[..., :1].expand(-1, -1, VOCAB))


class FixedLengthMask(nn.Module):
    """CPM-Ant builds a mask from ``list(range(length))``: the length becomes a Python int."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        positions = torch.tensor(list(range(input_ids.shape[1]))[::-1])
        return CausalLMOutput(logits=self.head(self.embed(input_ids)) + positions[None, :, None])


def test_data_dependent_values_and_fixed_lengths_are_refused_with_the_reason():
    with pytest.raises(LoweringError, match=r"reads a tensor's value into Python \(aten.item"):
        lower(DataDependentSizes())
    with pytest.raises(LoweringError, match="fixes the sequence length"):
        lower(FixedLengthMask())
