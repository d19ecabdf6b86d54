"""Lowering the LLaMA-7B shape on `meta`, with LoRA r=8 on all seven projections (GQA and not).

Measures wall time and peak resident memory of `lorashear-lower --meta` in a fresh process
per case (so imports and peak RSS are the command's own), and the size of the `.ir` file,
for each lowering path in `BENCH_PATHS` (default `fast,full`: two decoder layers traced and the
others copied, the default; every layer traced, `trace_all_layers=True`). Writes
bench/out/lower_meta.json and prints a Markdown table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "llama-7b": dict(num_key_value_heads=32),
    "llama-7b-gqa8": dict(num_key_value_heads=8),
}
PATHS = [p for p in os.environ.get("BENCH_PATHS", "fast,full").split(",") if p]

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from lorashear.frontend.pretrained import lower_pretrained
from lorashear.ir.fileformat import save_ir
t_import = time.perf_counter() - t0
t1 = time.perf_counter()
module = lower_pretrained(sys.argv[1], meta=True, lora_rank=8 if sys.argv[3] == "lora" else None,
                          trace_all_layers=sys.argv[4] == "full")
t_lower = time.perf_counter() - t1
save_ir(module, sys.argv[2])
import torch
held = sum(p.storage.load().numel() for p in module.params.values() if p.storage.has_data)
print(json.dumps({"ops": len(module.graph.ops), "params": len(module.params),
                  "weights": module.num_parameters(), "seconds_lower": t_lower,
                  "seconds_import": t_import, "tensor_elements_in_memory": held,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> int:
    from transformers import LlamaConfig

    out_dir = Path(__file__).parent / "out"
    out_dir.mkdir(exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in CASES.items():
            cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, vocab_size=32000, **extra)
            model_dir = Path(tmp) / name
            cfg.save_pretrained(model_dir)
            for lora in ("none", "lora"):
                for path in PATHS:
                    ir = Path(tmp) / f"{name}-{lora}-{path}.ir"
                    start = time.perf_counter()
                    done = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(ir), lora, path],
                                          capture_output=True, text=True)
                    if done.returncode != 0:
                        print(done.stderr, file=sys.stderr)
                        return 1
                    stats = json.loads(done.stdout.strip().splitlines()[-1])
                    stats.update(case=name, lora=lora, path=path, process_seconds=time.perf_counter() - start,
                                 ir_bytes=ir.stat().st_size)
                    rows.append(stats)
                if {"fast", "full"} <= set(PATHS):  # the two paths must write the same .ir, byte for byte
                    same = (Path(tmp) / f"{name}-{lora}-fast.ir").read_bytes() == \
                        (Path(tmp) / f"{name}-{lora}-full.ir").read_bytes()
                    for r in rows[-len(PATHS):]:
                        r["same_ir_both_paths"] = same
    (out_dir / "lower_meta.json").write_text(json.dumps(rows, indent=2))
    print("| shape | LoRA r=8 | layers traced | ops | lower (s) | process (s) | peak RSS (MB) | .ir size (KB) "
          "| weight elements in memory | .ir equal across paths |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        traced = "all" if r["path"] == "full" else "2, rest copied"
        print(f"| {r['case']} | {r['lora']} | {traced} | {r['ops']} | {r['seconds_lower']:.1f} | "
              f"{r['process_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['ir_bytes'] / 1024:.0f} | "
              f"{r['tensor_elements_in_memory']} | {r.get('same_ir_both_paths', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
