"""Dependency analysis at LLaMA-7B shape on `meta`: lorashear vs Torch-Pruning, same machine.

lorashear: `lower_pretrained(meta=True, lora_rank=8)` (LoRA on all seven projections) then
`discover`, once as it lowers by default (two decoder layers traced, the others copied) and
once with `trace_all_layers=True` (every layer traced, the reference). Torch-Pruning (pip package `torch-pruning`, its LLM recipe: eager attention,
attention_mask given, every parameter requiring grad): `DependencyGraph.build_dependency`
then `get_all_groups`. Each case runs in a fresh process under a timeout; time and peak RSS
are the child's own. Torch-Pruning ignores LoRA here (it is given the plain model): that is
the most favourable setting for it. `import torch` precedes the clock in both children and
`total` counts everything after it. `lower` includes importing transformers and peft (done
inside `lower_pretrained`) and building the model; Torch-Pruning's `graph` is
`build_dependency` alone.

The cases run interleaved, `BENCH_REPEATS` rounds (default 1; the full trace only in the first
`BENCH_FULL_TRACE_ROUNDS`, default all), and the table gives medians. Writes
bench/out/discover_7b.json (every run) and a Markdown table.
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
REPEATS = int(os.environ.get("BENCH_REPEATS", "1"))
FULL_TRACE_ROUNDS = int(os.environ.get("BENCH_FULL_TRACE_ROUNDS", str(REPEATS)))

LORASHEAR = r"""
import json, resource, sys, time
import torch
t0 = time.perf_counter()
from lorashear.frontend.pretrained import lower_pretrained
from lorashear.passes import PassManager
t_import = time.perf_counter()
module = lower_pretrained(sys.argv[1], meta=True, lora_rank=8, trace_all_layers=sys.argv[2] == "full")
t1 = time.perf_counter()
PassManager.parse("discover").run(module)
t2 = time.perf_counter()
g = module.attributes["groups"]
counts = {k: sum(f.size for f in g.families if f.kind == k) for k in ("attn", "mlp", "hidden")}
print(json.dumps({"import_s": t_import - t0, "lower_s": t1 - t_import, "groups_s": t2 - t1, "total_s": t2 - t0,
                  "ops": len(module.graph.ops),
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


def _run(code: str, model_dir: Path, timeout: int, *args: str) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", code, str(model_dir), *args], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout} s", "process_s": time.perf_counter() - start}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"status": f"failed: {last[:160]}", "process_s": time.perf_counter() - start}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(status="ok", process_s=time.perf_counter() - start)
    return result


def _median(runs: list[dict], key: str) -> float | None:
    values = sorted(r[key] for r in runs if r.get("status") == "ok" and key in r)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def main() -> int:
    from transformers import LlamaConfig

    try:
        import torch_pruning  # noqa: F401
        have_tp = True
    except ImportError:
        have_tp = False
    out_dir = Path(__file__).parent / "out"
    out_dir.mkdir(exist_ok=True)
    shapes = (("LLaMA-7B (MHA)", 32), ("LLaMA-7B shape, GQA 8 KV heads", 8))
    tools = ("lorashear (LoRA r=8, 7 projections)", "lorashear, every layer traced", "Torch-Pruning (no LoRA)")
    runs: dict[tuple[str, str], list[dict]] = {(shape, tool): [] for shape, _ in shapes for tool in tools}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for name, kv in shapes:
            dirs[name] = Path(tmp) / str(kv)
            LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=kv, vocab_size=32000).save_pretrained(dirs[name])
        for round_ in range(REPEATS):
            for name, _ in shapes:
                runs[(name, tools[0])].append(_run(LORASHEAR, dirs[name], 900, "fast"))
                if round_ < FULL_TRACE_ROUNDS:
                    runs[(name, tools[1])].append(_run(LORASHEAR, dirs[name], 900, "full"))
                if have_tp:
                    runs[(name, tools[2])].append(_run(TORCH_PRUNING, dirs[name], TIMEOUT_S))
    rows = []
    for (shape, tool), done in runs.items():
        if not done:
            status = "not installed (pip install torch-pruning)" if tool == tools[2] and not have_tp else "not run"
            rows.append({"shape": shape, "tool": tool, "status": status, "runs": []})
            continue
        ok = [r for r in done if r["status"] == "ok"]
        row = {"shape": shape, "tool": tool, "status": "ok" if len(ok) == len(done) else done[-1]["status"],
               "runs": done, "n": len(ok)}
        for key in ("lower_s", "graph_s", "groups_s", "total_s", "process_s", "peak_rss_gb"):
            row[key] = _median(done, key)
        row["groups"] = ok[0]["groups"] if ok else "-"
        rows.append(row)
    (out_dir / "discover_7b.json").write_text(json.dumps(rows, indent=2))

    def fmt(v, digits=1):
        return "-" if v is None else f"{v:.{digits}f}"

    print("| shape | tool | status | runs | lower / graph (s) | groups (s) | sum (s) | total with imports (s) "
          "| process (s) | peak RSS (GB) | groups |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if not r["runs"]:
            print(f"| {r['shape']} | {r['tool']} | {r['status']} | 0 | - | - | - | - | - | - | - |")
            continue
        first = r["lower_s"] if r["lower_s"] is not None else r["graph_s"]
        both = None if first is None or r["groups_s"] is None else first + r["groups_s"]
        print(f"| {r['shape']} | {r['tool']} | {r['status']} | {r['n']} | {fmt(first)} | {fmt(r['groups_s'])} | "
              f"{fmt(both)} | {fmt(r['total_s'])} | {fmt(r['process_s'])} | {fmt(r['peak_rss_gb'], 2)} | "
              f"{r['groups']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
