"""The demo's greedy generations (tools/demo.py ``greedy``) through ``generate()`` over the KV
cache give the answer the old loop gave by recomputing the whole prefix per token, for the
PyTorch executor and for the ONNX decoder in ONNX Runtime."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from lorashear.frontend.pretrained import lower_pretrained
from lorashear.runtime.executor import emit_torch
from lorashear.runtime.onnx_emit import emit_onnx
from lorashear.runtime.onnx_generate import onnx_generator
from tests.conftest import save_word_tokenizer

pytest.importorskip("onnxruntime")

DEMO = Path(__file__).resolve().parents[2] / "tools" / "demo.py"
#: enough words that every id of the tiny model's 128 decodes to one
WORDS = "what is the capital of france answer in one sentence paris".split() + [f"w{i}" for i in range(130)]


def _demo():
    spec = importlib.util.spec_from_file_location("lorashear_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prefix_loop(model, tokenizer, prompt: str, new_tokens: int) -> str:
    """The demo's former greedy loop: the whole prefix through the model for every token."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if nxt.item() == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip().replace("\n", " ")


def test_demo_greedy_equals_the_prefix_loop(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    source = tmp_path / "source"
    shutil.copytree(tiny_models["qwen2"].model_dir, source)
    save_word_tokenizer(source, [" ".join(WORDS)] * 2, vocab_size=128)
    (source / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}")
    tokenizer = AutoTokenizer.from_pretrained(source)
    module = lower_pretrained(source, adapter=tiny_models["qwen2"].adapter_dir)
    model = emit_torch(module)
    demo = _demo()
    prompt = "what is the capital of france"
    want = _prefix_loop(model, tokenizer, prompt, 24)
    assert want
    assert demo.greedy(model, tokenizer, prompt) == want
    decoder = onnx_generator(emit_onnx(module, tmp_path / "model.onnx", kv_cache=True))
    assert demo.greedy(decoder, tokenizer, prompt) == want
