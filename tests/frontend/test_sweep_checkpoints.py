"""Checkpoint directories of the #22 sweep that lower by reference: GPT-Neo, whose forward makes
``torch.tensor(finfo.min, device=weights' device)`` (a constant that tracing on ``meta`` would
leave without a value), and Emu3's text model saved on its own (its config, the text
sub-config, is not in the auto classes' mapping: the class is taken from ``architectures``)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers.utils import ModelOutput

from lorashear.frontend.pretrained import lower_pretrained
from lorashear.ir.storage import FileStorage
from lorashear.runtime.executor import emit_torch
from tests.conftest import random_batch

VOCAB = 48


def _lowers_like(model, directory) -> None:
    model.eval().save_pretrained(directory)
    module = lower_pretrained(directory)
    assert any(isinstance(p.storage, FileStorage) for p in module.params.values())  # by reference
    ids, mask = random_batch(VOCAB, batch=2, seq=6)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = emit_torch(module)(ids, attention_mask=mask).logits
    assert (got - want).abs()[mask.bool()].max().item() <= 1e-4


def test_gpt_neo_mask_constant_lowers_without_weights_in_memory(tmp_path):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    config = GPTNeoConfig(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                          max_position_embeddings=32, attention_types=[[["global", "local"], 1]], window_size=4)
    _lowers_like(GPTNeoForCausalLM(config), tmp_path / "neo")


def test_text_model_of_a_multimodal_family_lowers(tmp_path):
    from transformers import Emu3ForCausalLM
    from transformers.models.emu3.configuration_emu3 import Emu3TextConfig

    torch.manual_seed(0)
    config = Emu3TextConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    _lowers_like(Emu3ForCausalLM(config), tmp_path / "emu3")


@dataclass
class MemoryOutput(ModelOutput):
    logits: torch.Tensor | None = None
    mems: tuple | None = None


class WithMemories(torch.nn.Module):
    """Returns its memories beside the logits, as XLNet's ``mems``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.head = torch.nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids)
        return MemoryOutput(logits=self.head(h), mems=(h * 2, h + 1))


def test_the_logits_field_is_the_output_when_a_model_returns_more():
    from lorashear.frontend.lower import lower

    model = WithMemories().eval()
    module = lower(model)
    ids, mask = random_batch(VOCAB, batch=2, seq=5)
    with torch.no_grad():
        assert (emit_torch(module)(ids, attention_mask=mask).logits - model(ids).logits).abs().max() <= 1e-6
    assert [op.kind for op in module.graph.ops] == ["embedding", "linear"]  # the memories are dropped


def test_an_exact_floor_division_of_sizes_is_its_quotient():
    import sympy
    from torch.utils._sympy.functions import FloorDiv

    from lorashear.frontend.sizes import exact_quotients

    s, b = sympy.symbols("s0 s1", positive=True, integer=True)
    assert exact_quotients(FloorDiv(s**2, s)) == s  # XLNet's S**2 // S
    assert exact_quotients(FloorDiv(2 * s * b, 2 * b) + 1) == s + 1
    inexact = FloorDiv(s, 2)
    assert exact_quotients(inexact) == inexact


def test_xlm_lowers_from_its_checkpoint_and_to_onnx(tmp_path):
    """XLM always builds a cache, which starts from empty constant tensors (their values need no
    weights: there are none) that ``cat`` skips beside the keys; its forward asserts
    ``lengths.max().item() <= slen`` (a check, dropped with its comparison) and fills the
    scores in place through a mask shaped ``expand_as`` them (no view of the scores)."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    from transformers import XLMConfig, XLMWithLMHeadModel

    from lorashear.runtime.onnx_emit import emit_onnx

    torch.manual_seed(0)
    config = XLMConfig(vocab_size=VOCAB, emb_dim=16, n_layers=2, n_heads=2, max_position_embeddings=32,
                       causal=True)
    model = XLMWithLMHeadModel(config)
    _lowers_like(model, tmp_path / "xlm")
    module = lower_pretrained(tmp_path / "xlm")
    kinds = {op.kind for op in module.graph.ops}
    assert "concat" not in kinds or all(len(op.args[0]) > 1 for op in module.graph.ops if op.kind == "concat")
    emit_onnx(module, tmp_path / "xlm.onnx")
    session = ort.InferenceSession(str(tmp_path / "xlm.onnx"), providers=["CPUExecutionProvider"])
    ids, mask = random_batch(VOCAB, batch=2, seq=6)
    (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        want = emit_torch(module)(ids, attention_mask=mask).logits
    assert (torch.as_tensor(got) - want).abs()[mask.bool()].max().item() <= 1e-4
