"""ONNX decoding: the decoder with past key values, under transformers' generate in ONNX Runtime.

On the tiny Llama-GQA, Mistral and Qwen2 (LoRA merged at emission), and on a Llama pruned
non-uniformly (random groups, compressed): greedy tokens and per-step scores in ONNX Runtime
equal the PyTorch executor's, the cached decoder equals the scoring-only graph decoding the
whole prefix each step (and ``generate(use_cache=False)``), and beam search and seeded sampling match too. The emitted decoder's
inputs and outputs have the names and dynamic axes ONNX Runtime's decoders expect.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from lorashear.errors import EmissionError, ModelLoadError
from lorashear.ir.core import DTypeArg, Graph, Module, Op, Value, clone_module
from lorashear.ir.types import TensorType
from lorashear.passes import PassManager
from lorashear.runtime.executor import emit_torch
from lorashear.runtime.onnx_emit import emit_onnx
from lorashear.runtime.onnx_generate import onnx_generator
from tests.conftest import FAMILIES

pytest.importorskip("onnxruntime")

NEW_TOKENS = 8
TOLERANCE = 1e-4


def _prompt(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 7 tokens, the second left-padded by 2."""
    ids = torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    return ids, mask


def _greedy(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=0, eos_token_id=None, output_scores=True,
                          return_dict_in_generate=True, **kwargs)


def _assert_same_decoding(module, tmp_path) -> None:
    """Greedy in ONNX Runtime (cached and not) equals greedy in the PyTorch executor."""
    vocab = module.attributes["config"].config["vocab_size"]
    ids, mask = _prompt(vocab)
    torch_model = emit_torch(module)
    onnx_model = onnx_generator(emit_onnx(module, tmp_path / "kv.onnx", kv_cache=True))
    want = _greedy(torch_model, ids, mask)
    runs = {"onnx cached": _greedy(onnx_model, ids, mask),
            # the whole prefix each step: the scoring-only graph, and generate(use_cache=False)
            "onnx plain graph": _greedy(onnx_generator(emit_onnx(module, tmp_path / "plain.onnx")),
                                        ids, mask),
            "onnx use_cache=False": _greedy(onnx_model, ids, mask, use_cache=False),
            "torch use_cache=False": _greedy(torch_model, ids, mask, use_cache=False)}
    assert want.sequences.shape == (2, 7 + NEW_TOKENS)
    for name, run in runs.items():
        assert torch.equal(run.sequences, want.sequences), name
        for got, ref in zip(run.scores, want.scores, strict=True):
            assert (got - ref).abs().max().item() <= TOLERANCE, name


def test_decoder_inputs_and_outputs(lowered, tmp_path):
    module = lowered("llama", True)
    path = emit_onnx(module, tmp_path / "m.onnx", kv_cache=True)
    graph = onnx.load(str(path)).graph

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {v.name: dims(v) for v in graph.input}
    outputs = {v.name: dims(v) for v in graph.output}
    layers = module.attributes["config"].config["num_hidden_layers"]
    assert list(inputs) == ["input_ids", "attention_mask"] + [
        f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    assert list(outputs) == ["logits"] + [f"present.{i}.{kind}" for i in range(layers)
                                          for kind in ("key", "value")]
    batch, new = inputs["input_ids"]
    past = inputs["past_key_values.0.key"][2]
    total = inputs["attention_mask"][1]
    assert len({batch, new, past, total}) == 4 and all(isinstance(d, str) for d in (batch, new, past, total))
    assert inputs["past_key_values.1.value"] == [batch, 2, past, 16]  # tiny llama: 2 KV heads of 16
    assert outputs["present.1.value"] == [batch, 2, total, 16]
    assert outputs["logits"] == [batch, new, 128]
    # the module itself is untouched: emitting without the flag gives the scoring-only graph
    assert [v.name for v in onnx.load(str(emit_onnx(module, tmp_path / "p.onnx"))).graph.input] \
        == ["input_ids", "attention_mask"]


@pytest.mark.parametrize("family, with_lora", [(f, True) for f in FAMILIES] + [("llama", False)])
def test_greedy_equals_pytorch_runtime(lowered, family, with_lora, tmp_path):
    """LoRA merged at emission (the executor keeps it unmerged), and a dense model."""
    _assert_same_decoding(lowered(family, with_lora), tmp_path)


def test_pruned_non_uniform_model_decodes(lowered, tmp_path):
    module = clone_module(lowered("llama", True))
    module.attributes.pop("groups", None)
    PassManager.parse("discover,prune{ratio=0.3,metric=random,seed=5},compress").run(module)
    widths = {p.type.shape[0] for n, p in module.params.items() if n.endswith("mlp.up_proj.weight")}
    assert len(widths) > 1 or min(widths) < 96  # really pruned
    _assert_same_decoding(module, tmp_path)


def test_beam_search_and_sampling_equal_pytorch_runtime(lowered, tmp_path):
    module = lowered("qwen2", False)
    ids, mask = _prompt(module.attributes["config"].config["vocab_size"], seed=3)
    torch_model = emit_torch(module)
    onnx_model = onnx_generator(emit_onnx(module, tmp_path / "kv.onnx", kv_cache=True))
    beams = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(onnx_model.generate(ids, attention_mask=mask, **beams),
                       torch_model.generate(ids, attention_mask=mask, **beams))
    sampled = []
    for model in (onnx_model, torch_model):
        torch.manual_seed(7)
        sampled.append(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True,
                                      top_k=20, temperature=0.8, pad_token_id=0, eos_token_id=None))
    assert torch.equal(sampled[0], sampled[1])


def test_cache_grows_in_place_of_the_sessions_arrays(lowered, tmp_path):
    """The cache holds the session's outputs as they are: P + S positions after each step."""
    from transformers.cache_utils import DynamicCache

    module = lowered("mistral", False)
    model = onnx_generator(emit_onnx(module, tmp_path / "kv.onnx", kv_cache=True))
    ids, mask = _prompt(128)
    outputs = []
    run = model.decoder.run

    def recording_run(*args, **kwargs):
        outputs.append(run(*args, **kwargs))
        return outputs[-1]

    model.decoder.run = recording_run
    cache = DynamicCache()
    out = model(ids, attention_mask=mask, cache=cache)
    assert out.cache is cache and cache.get_seq_length() == 7
    _, presents = outputs[-1]  # the session's arrays are the cache's tensors: no copy
    assert all(np.shares_memory(key, layer.keys.numpy()) and np.shares_memory(value, layer.values.numpy())
               for (key, value), layer in zip(presents, cache.layers, strict=True))
    step = model(ids[:, -1:], attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                 cache=cache)
    assert cache.get_seq_length() == 8 and len(cache.layers) == 3
    full = emit_torch(module)(torch.cat([ids, ids[:, -1:]], 1),
                              attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1))
    assert (step.logits[:, -1] - full.logits[:, -1]).abs().max().item() <= TOLERANCE


def test_errors_name_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no ONNX model"):
        onnx_generator(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="bad.onnx"):
        onnx_generator(tmp_path / "bad.onnx")
    ids = Value("input_ids", TensorType("i64", ("B", "S")))
    out = Value("y", TensorType("f32", ("B", "S")))
    module = Module(Graph([ids], [Op("cast", [ids, DTypeArg("f32")], {}, [out])], [out], ["logits"]))
    with pytest.raises(EmissionError, match="no attention op"):  # nothing to cache
        emit_onnx(module, tmp_path / "x.onnx", kv_cache=True)
    assert not (tmp_path / "x.onnx").exists()
