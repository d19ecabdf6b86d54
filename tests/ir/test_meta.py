"""Lowering on `meta`: a large shape lowers with no weight data held and a small `.ir`."""

from __future__ import annotations

import resource

from lorashear.frontend.pretrained import lower_pretrained
from lorashear.ir.fileformat import load_ir, save_ir
from lorashear.ir.storage import MetaStorage


def test_large_shape_on_meta_holds_no_weights(tmp_path):
    from transformers import LlamaConfig

    # LLaMA-7B layer shapes with GQA (2 layers keep the test quick; bench/ runs all 32)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
    cfg.save_pretrained(tmp_path / "m")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    module = lower_pretrained(tmp_path / "m", meta=True, lora_rank=8)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    weights = [p for p in module.params.values() if not p.buffer]
    assert module.num_parameters() > 400_000_000  # ~0.9 GB of fp32 weights...
    assert all(isinstance(p.storage, MetaStorage) for p in weights)
    assert grown_mb < 400  # ...none of which was ever allocated
    assert sum(op.kind == "lora_linear" for op in module.graph.ops) == 2 * 7
    save_ir(module, tmp_path / "m.ir")
    assert (tmp_path / "m.ir").stat().st_size < 100 * 1024
    assert load_ir(tmp_path / "m.ir").num_parameters() == module.num_parameters()
