"""Checkpoints whose keys transformers renames on load lower by reference (issue #22, item 1).

transformers 5 saves a GPT-NeoX/Pythia model's head as ``embed_out.weight`` (its legacy name)
and renames it to ``lm_head.weight`` on load; ``lower_pretrained`` binds through the same
renaming, so such a directory lowers (weights still read from the file), prunes, compresses
and reloads.
"""

from __future__ import annotations

import torch

from lorashear.frontend.pretrained import checkpoint_index, lower_pretrained
from lorashear.ir.core import clone_module
from lorashear.ir.storage import FileStorage, MetaStorage
from lorashear.passes import PassManager
from lorashear.runtime.executor import emit_torch
from lorashear.runtime.hf import load_pretrained, save_model_dir
from tests.conftest import random_batch, with_lora


def _gpt_neox(root):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    base = AutoModelForCausalLM.from_config(config).eval()
    base.save_pretrained(root / "model")
    return with_lora(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value", "dense",
                                                                              "dense_h_to_4h", "dense_4h_to_h"]), root / "adapter")


def test_gpt_neox_checkpoint_lowers_prunes_and_reloads(tmp_path):
    peft = _gpt_neox(tmp_path)
    keys = checkpoint_index(tmp_path / "model")
    assert "embed_out.weight" in keys and "lm_head.weight" not in keys  # the renamed key

    module = lower_pretrained(tmp_path / "model", adapter=tmp_path / "adapter")
    head = module.params["lm_head.weight"].storage
    assert isinstance(head, FileStorage) and head.key == "embed_out.weight"  # by reference
    ids, mask = random_batch(96, seed=3)
    with torch.no_grad():
        want = peft(input_ids=ids, attention_mask=mask).logits
        got = emit_torch(module)(ids, attention_mask=mask).logits
    assert (got - want).abs()[mask.bool()].max().item() <= 1e-4

    PassManager.parse("discover,prune{ratio=0.3,metric=random}").run(module)
    kinds = {f.kind for f in module.attributes["groups"].families}
    assert {"attn", "mlp"} <= kinds
    compressed = PassManager.parse("compress").run(clone_module(module))
    assert compressed.params["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"].type.shape[0] < 64
    save_model_dir(compressed, tmp_path / "hf", merge=True)
    with torch.no_grad():
        masked = emit_torch(module)(ids, attention_mask=mask).logits
        reloaded = load_pretrained(tmp_path / "hf")(ids, attention_mask=mask).logits
    assert (reloaded - masked).abs()[mask.bool()].max().item() <= 1e-4


def test_gpt_neox_meta_lowering_reads_no_weights(tmp_path):
    _gpt_neox(tmp_path)
    module = lower_pretrained(tmp_path / "model", adapter=tmp_path / "adapter", meta=True)
    assert all(isinstance(p.storage, MetaStorage) for p in module.params.values() if not p.buffer)
    assert "lm_head.weight" in module.params
