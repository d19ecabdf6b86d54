"""Normalisation ops as single IR ops: ``rms_norm`` prunes its hidden channels exactly (the
coupling, zero and compress rules), ``layer_norm`` pins them and says why."""

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
from lorashear.ir.verifier import verify
from lorashear.passes import PassManager
from lorashear.passes.compress import compress_module
from lorashear.passes.discover import summarize_groups
from lorashear.runtime.executor import emit_torch
from tests.conftest import random_batch

VOCAB, HIDDEN, INNER = 40, 12, 20


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.rand(HIDDEN) + 0.5)
        self.up = nn.Linear(HIDDEN, INNER, bias=False)
        self.down = nn.Linear(INNER, HIDDEN, bias=False)


class TinyNormModel(nn.Module):
    """Embedding, a pre-norm residual MLP, a final norm and a head; ``norm`` picks how the
    norms are written: ``rms`` (``F.rms_norm``, the second without eps), ``decomposed`` (the
    pow/mean/rsqrt/mul a Llama export spells out), ``layer`` (``F.layer_norm``), ``rms-bare``
    (``F.rms_norm`` without a weight)."""

    def __init__(self, norm: str, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.kind = norm
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([_Block()])
        self.norm = nn.Parameter(torch.rand(HIDDEN) + 0.5)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def _norm(self, h: torch.Tensor, weight: torch.Tensor, eps: float | None) -> torch.Tensor:
        shape = (h.shape[-1],)
        if self.kind == "rms":
            return F.rms_norm(h, shape, weight, eps)
        if self.kind == "rms-bare":
            return F.rms_norm(h, shape, None, 1e-5)
        if self.kind == "layer":
            return F.layer_norm(h, shape, weight, None, 1e-5)
        eps = torch.finfo(h.dtype).eps if eps is None else eps
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids)
        block = self.layers[0]
        h = h + block.down(F.silu(block.up(self._norm(h, block.norm, 1e-5))))
        return CausalLMOutput(logits=self.head(self._norm(h, self.norm, None)))


def _discovered(norm: str, seed: int = 0):
    module = lower(TinyNormModel(norm, seed))
    PassManager.parse("discover").run(module)
    return module


def _families(module):
    return sorted((f.kind, f.size, tuple(sorted((m.param, m.axis, m.stride) for m in f.members)))
                  for f in module.attributes["groups"].families)


def test_rms_norm_couples_like_the_decomposed_norm():
    module = _discovered("rms")
    assert [op.kind for op in module.graph.ops].count("rms_norm") == 2
    kinds = {f.kind: f for f in module.attributes["groups"].families}
    assert kinds["hidden"].size == HIDDEN and kinds["mlp"].size == INNER
    assert {m.param for m in kinds["hidden"].members} == {
        "embed.weight", "layers.0.norm", "layers.0.up.weight", "layers.0.down.weight", "norm",
        "head.weight"}
    assert _families(module) == _families(_discovered("decomposed"))


@pytest.mark.parametrize("seed", range(4))
def test_rms_norm_masked_equals_compressed(seed):
    module = _discovered("rms", seed)
    groups = module.attributes["groups"]
    rng = random.Random(seed)
    removed = {f.id: tuple(sorted(rng.sample(range(f.size), rng.randint(1, f.size - 1))))
               for f in groups.families}
    assert any(groups.families[f].kind == "hidden" for f in removed)
    masked = clone_module(module)
    zero_groups(masked, groups, removed)
    compressed = clone_module(module)
    stats = compress_module(compressed, groups, removed)
    verify(compressed)
    kept = HIDDEN - len(removed[next(f.id for f in groups.families if f.kind == "hidden")])
    norms = [op for op in compressed.graph.ops if op.kind == "rms_norm"]
    assert [op.bound_args()["normalized_shape"] for op in norms] == [[kept], [kept]]
    assert stats["means rewritten"] == 2
    ids, mask = random_batch(VOCAB, batch=2, seq=7, seed=seed)
    with torch.no_grad():
        a = emit_torch(masked)(ids, attention_mask=mask).logits
        b = emit_torch(compressed)(ids, attention_mask=mask).logits
        full = emit_torch(module)(ids, attention_mask=mask).logits
    assert (a - full).abs().max() > 1e-3  # the removal really changes the model
    assert (a - b).abs().max().item() <= 1e-4


def test_compressed_rms_norm_model_runs_in_onnx_runtime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from lorashear.runtime.onnx_emit import emit_onnx

    module = _discovered("rms")
    groups = module.attributes["groups"]
    removed = {f.id: tuple(range(0, f.size, 3)) for f in groups.families}
    compressed = clone_module(module)
    compress_module(compressed, groups, removed)
    session = ort.InferenceSession(str(emit_onnx(compressed, tmp_path / "m.onnx")),
                                   providers=["CPUExecutionProvider"])
    ids, mask = random_batch(VOCAB, seq=9)
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        want = emit_torch(compressed)(ids, attention_mask=mask).logits
    assert (torch.from_numpy(got) - want).abs().max() <= 1e-4


def test_layer_norm_pins_hidden_channels_with_its_reason():
    module = _discovered("layer")
    groups = module.attributes["groups"]
    assert {f.kind for f in groups.families} == {"mlp"}
    reasons = dict(((name, axis), reason) for name, axis, reason in groups.unprunable)
    assert reasons[("layers.0.norm", 0)].startswith("mean-centred and normalised over")
    assert "op layer_norm" in reasons[("layers.0.norm", 0)]
    assert "mean-centred and normalised over" in summarize_groups(module, groups)


def test_rms_norm_without_its_own_weight_pins_with_its_reason():
    module = _discovered("rms-bare")
    groups = module.attributes["groups"]
    assert "hidden" not in {f.kind for f in groups.families}
    reasons = dict(((name, axis), reason) for name, axis, reason in groups.unprunable)
    assert "no weight of its own" in reasons[("embed.weight", 1)]
