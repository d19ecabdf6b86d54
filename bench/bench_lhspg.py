"""LHSPG on SmolLM2-135M-Instruct: step cost over plain LoRA training, and quality at 20%.

1. Step time and peak memory: a plain LoRA AdamW step vs an LHSPG step (the same step plus
   the half-space projection over the chosen groups through the ProjectionPlan that lhspg
   prepares once per period, torch reference kernel on CPU) and vs a settle step (the groups
   are zero; only their LoRA rows/columns are cleared), same model, same batch. Peak memory is the process's peak RSS growth during each phase.
2. Quality at ratio 0.2 (attention + MLP groups, per layer): held-out perplexity on
   Persuasion of the dense model, of one-shot `prune` (magnitude, wanda, taylor, random) and
   of LHSPG at a stated token budget. The budget is small on 2 CPU cores; the numbers say
   what this budget buys, not what the method reaches with a GPU's budget.

Writes bench/out/lhspg.json and prints Markdown tables; BENCH_LHSPG_STEP_ONLY=1 measures and
prints part 1 only. Needs `make model` and
`lorashear data fetch --sources austen` (the script runs both if needed).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from _common import held_out_ppl, one_shot_pipeline, set_threads, token_ids

SEQ = 128
BATCH = 2
PERIODS, STEPS = 2, int(os.environ.get("BENCH_LHSPG_STEPS", "10"))
EVAL_WINDOWS = int(os.environ.get("BENCH_EVAL_WINDOWS", "8"))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_step_cost(module, tokenizer, train: Path) -> dict:
    """Plain LoRA step vs LHSPG step (the same + the projection over 20% of the groups)."""
    from lorashear.kernels import ProjectionPlan
    from lorashear.passes.lhspg import build_group_index
    from lorashear.runtime.executor import IRModel

    groups = module.attributes["groups"]
    ids = tokenizer(train.read_text()[:20_000], return_tensors="pt").input_ids[0]
    batch = ids[: BATCH * SEQ].view(BATCH, SEQ)
    model = IRModel(module).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    families = [f.id for f in groups.families if f.kind in ("attn", "mlp")]
    index = build_group_index(module, model, groups, families)
    chosen = torch.zeros(index.num_groups, dtype=torch.bool)
    pick = torch.randperm(index.num_groups, generator=torch.Generator().manual_seed(0))
    chosen[pick[: index.num_groups // 5]] = True
    plan = ProjectionPlan(index.weights, chosen)  # as lhspg does, once per period
    # lhspg{settle=...}: once a period's groups are zero, a step only clears their LoRA
    settle_plan = ProjectionPlan(index.weights, torch.zeros_like(chosen), done=chosen)

    def step(plan_to_run) -> float:
        start = time.perf_counter()
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if plan_to_run is not None:
            plan_to_run.step(1e-4)
        return time.perf_counter() - start

    step(None)
    base_rss = rss_mb()
    plain = [step(None) for _ in range(3)]
    plain_rss = rss_mb()
    projected = [step(plan) for _ in range(3)]
    lhspg_rss = rss_mb()
    settled = [step(settle_plan) for _ in range(2)]
    for _ in range(2):  # interleaved too, so that load from other processes hits both alike
        plain.append(step(None))
        projected.append(step(plan))
        settled.append(step(settle_plan))
    return {"plain_s": min(plain), "lhspg_s": min(projected), "ratio": min(projected) / min(plain),
            "settle_s": min(settled), "settle_ratio": min(settled) / min(plain),
            "peak_rss_mb_plain": plain_rss, "peak_rss_mb_lhspg": lhspg_rss, "rss_before_mb": base_rss}


def main() -> int:
    from transformers import AutoTokenizer

    from lorashear.data.cache import text_dir
    from lorashear.data.sources import fetch_sources
    from lorashear.frontend.pretrained import lower_pretrained
    from lorashear.ir.core import clone_module
    from lorashear.models.default import prepare_default_model
    from lorashear.passes import PassManager
    from lorashear.runtime.executor import emit_torch

    set_threads()
    out_dir = Path(__file__).parent / "out"
    out_dir.mkdir(exist_ok=True)
    model_dir = prepare_default_model()
    fetch_sources(["austen"])
    heldout = (text_dir() / "austen" / "heldout.txt").read_text()
    train = out_dir / "austen-train-slice.txt"
    train.write_text((text_dir() / "austen" / "train.txt").read_text()[:400_000])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    module = lower_pretrained(model_dir, lora_rank=8)
    PassManager.parse("discover").run(module)
    results: dict = {"seq_len": SEQ, "batch": BATCH, "threads": torch.get_num_threads()}

    results["step"] = measure_step_cost(module, tokenizer, train)
    if os.environ.get("BENCH_LHSPG_STEP_ONLY") == "1":  # the step cost alone, a minute
        s = results["step"]
        print(json.dumps(s, indent=1))
        return 0

    # --- 2. quality at 20% --------------------------------------------------------------------
    heldout_ids = {"austen": token_ids(tokenizer, heldout, EVAL_WINDOWS * SEQ)}

    def ppl(m) -> float:
        return held_out_ppl(emit_torch(m), heldout_ids, window=SEQ, windows=EVAL_WINDOWS)["austen"]

    rows = [{"method": "dense", "ppl": ppl(module), "seconds": 0.0}]
    for metric in ("random", "magnitude", "wanda", "taylor"):
        start = time.perf_counter()
        pruned = clone_module(module)
        text = one_shot_pipeline(metric, 0.2, train, calibration=f"batches=4,batch=2,seq-len={SEQ}")
        PassManager.parse(f"{text},compress").run(pruned)
        rows.append({"method": f"one-shot {metric}", "ppl": ppl(pruned), "seconds": time.perf_counter() - start})
    tokens = PERIODS * STEPS * BATCH * SEQ
    start = time.perf_counter()
    trained = clone_module(module)
    PassManager.parse(f"lhspg{{ratio=0.2,periods={PERIODS},steps={STEPS},batch={BATCH},seq-len={SEQ},"
                      f"metric=taylor,lr=1e-3,data={train},progress=false}},compress").run(trained)
    rows.append({"method": f"LHSPG ({tokens:,} training tokens)", "ppl": ppl(trained),
                 "seconds": time.perf_counter() - start})
    results["quality"] = rows
    (out_dir / "lhspg.json").write_text(json.dumps(results, indent=2))

    s = results["step"]
    print(f"| step (batch {BATCH}x{SEQ}) | seconds | peak RSS (MB) |\n|---|---|---|")
    print(f"| plain LoRA AdamW | {s['plain_s']:.2f} | {s['peak_rss_mb_plain']:.0f} |")
    print(f"| LHSPG (+ projection, torch reference) | {s['lhspg_s']:.2f} ({s['ratio']:.2f}x) | "
          f"{s['peak_rss_mb_lhspg']:.0f} |")
    print(f"| LHSPG settle step (clears the zeroed groups' LoRA) | {s['settle_s']:.2f} "
          f"({s['settle_ratio']:.2f}x) | - |")
    print(f"\n| method at 20% (attn+MLP, per layer) | held-out ppl ({EVAL_WINDOWS}x{SEQ}) | seconds |\n|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['ppl']:.1f} | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
