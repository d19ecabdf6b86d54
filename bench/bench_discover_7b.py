"""Dependency analysis at LLaMA-7B shape on `meta`: lorashear vs Torch-Pruning, same machine.

lorashear: `lower_pretrained(meta=True, lora_rank=8)` (LoRA on all seven projections) then
`discover`. Torch-Pruning (pip package `torch-pruning`, its LLM recipe: eager attention,
attention_mask given, every parameter requiring grad): `DependencyGraph.build_dependency`
then `get_all_groups`. Each case runs in a fresh process under a timeout; time and peak RSS
are the child's own. Torch-Pruning ignores LoRA here (it is given the plain model): that is
the most favourable setting for it. Writes bench/out/discover_7b.json and a Markdown table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMEOUT_S = int(os.environ.get("BENCH_TP_TIMEOUT", "200"))

LORASHEAR = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from lorashear.frontend.pretrained import lower_pretrained
from lorashear.passes import PassManager
module = lower_pretrained(sys.argv[1], meta=True, lora_rank=8)
t1 = time.perf_counter()
PassManager.parse("discover").run(module)
t2 = time.perf_counter()
g = module.attributes["groups"]
counts = {k: sum(f.size for f in g.families if f.kind == k) for k in ("attn", "mlp", "hidden")}
print(json.dumps({"lower_s": t1 - t0, "groups_s": t2 - t1, "total_s": t2 - t0, "ops": len(module.graph.ops),
                  "groups": counts, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""

TORCH_PRUNING = r"""
import json, resource, sys, time
import torch
t0 = time.perf_counter()
import torch_pruning as tp
from transformers import AutoConfig, AutoModelForCausalLM
cfg = AutoConfig.from_pretrained(sys.argv[1])
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
for p in model.parameters():
    p.requires_grad_(True)
ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
t1 = time.perf_counter()
dg = tp.DependencyGraph().build_dependency(
    model, example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False})
t2 = time.perf_counter()
groups = list(dg.get_all_groups())
t3 = time.perf_counter()
print(json.dumps({"graph_s": t2 - t1, "groups_s": t3 - t2, "total_s": t3 - t0, "groups": len(groups),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def _run(code: str, model_dir: Path, timeout: int) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout} s", "process_s": time.perf_counter() - start}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"status": f"failed: {last[:160]}", "process_s": time.perf_counter() - start}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(status="ok", process_s=time.perf_counter() - start)
    return result


def main() -> int:
    from transformers import LlamaConfig

    out_dir = Path(__file__).parent / "out"
    out_dir.mkdir(exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kv in (("LLaMA-7B (MHA)", 32), ("LLaMA-7B shape, GQA 8 KV heads", 8)):
            model_dir = Path(tmp) / str(kv)
            LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=kv, vocab_size=32000).save_pretrained(model_dir)
            rows.append({"shape": name, "tool": "lorashear (LoRA r=8, 7 projections)",
                         **_run(LORASHEAR, model_dir, 900)})
            try:
                import torch_pruning  # noqa: F401
                rows.append({"shape": name, "tool": "Torch-Pruning (no LoRA)",
                             **_run(TORCH_PRUNING, model_dir, TIMEOUT_S)})
            except ImportError:
                rows.append({"shape": name, "tool": "Torch-Pruning", "status": "not installed (pip install torch-pruning)"})
    (out_dir / "discover_7b.json").write_text(json.dumps(rows, indent=2))
    print("| shape | tool | status | total (s) | process (s) | peak RSS (GB) | groups |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        total = f"{r['total_s']:.1f}" if "total_s" in r else "-"
        rss = f"{r['peak_rss_gb']:.2f}" if "peak_rss_gb" in r else "-"
        print(f"| {r['shape']} | {r['tool']} | {r['status']} | {total} | {r['process_s']:.1f} | {rss} | "
              f"{r.get('groups', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
