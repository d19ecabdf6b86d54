"""One-shot pruning of SmolLM2-135M-Instruct: held-out perplexity per saliency metric.

Not part of ``make bench`` (minutes of CPU per metric). Lowers the converted default model,
runs ``discover``, then for each metric ``prune{ratio=R,kinds=...,scope=...}`` on a copy,
calibrated on Austen's five novels, and measures perplexity on Persuasion (the held-out
novel): the first ``--windows`` windows of ``--window`` tokens. Prints a Markdown table and
writes JSON next to this file (``out/one_shot_smollm2.json``).

    python3 bench/one_shot_smollm2.py --metrics magnitude,wanda,taylor,random --ratio 0.2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import add_smollm2_arguments, one_shot_pipeline
from _common import held_out_ppl as held_out_perplexities


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_smollm2_arguments(parser)
    parser.add_argument("--metrics", default="magnitude,wanda,taylor,random")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--kinds", default="attn,mlp")
    parser.add_argument("--seed", type=int, default=0, help="seed of random and of the calibration windows")
    parser.add_argument("--scope", default="per-layer")
    parser.add_argument("--calibration", default="batches=8,batch=4,seq-len=128",
                        help="calibration options of prune (32 windows x 128 tokens)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-dense", action="store_true", help="do not measure the dense model")
    parser.add_argument("--out", default="one_shot_smollm2.json", help="file name under bench/out/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from lorashear.eval.perplexity import tokenize_text
    from lorashear.frontend.pretrained import lower_pretrained
    from lorashear.ir.core import clone_module
    from lorashear.passes import PassManager
    from lorashear.runtime.executor import emit_torch

    start = time.perf_counter()
    module = lower_pretrained(args.model)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    PassManager.parse("discover").run(module)
    discover_s = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    heldout = tokenize_text(tokenizer, Path(args.heldout).read_text(), args.windows * args.window)

    def held_out_ppl(m) -> tuple[float, float]:
        begin = time.perf_counter()
        ppl = held_out_perplexities(emit_torch(m), {"heldout": heldout}, window=args.window,
                                    windows=args.windows)["heldout"]
        return ppl, time.perf_counter() - begin

    print(f"lower {lower_s:.1f} s, discover {discover_s:.1f} s", flush=True)
    rows = []
    if not args.skip_dense:
        dense_ppl, dense_eval_s = held_out_ppl(module)
        rows.append({"metric": "dense", "ppl": dense_ppl, "eval_s": dense_eval_s})
        print(f"dense ppl {dense_ppl:.2f} ({dense_eval_s:.1f} s)", flush=True)
    for metric in args.metrics.split(","):
        pruned = clone_module(module)
        text = one_shot_pipeline(metric, args.ratio, args.train, kinds=args.kinds, scope=args.scope,
                                 seed=args.seed, calibration=args.calibration)
        manager = PassManager.parse(text)
        begin = time.perf_counter()
        manager.run(pruned)
        prune_s = time.perf_counter() - begin
        ppl, eval_s = held_out_ppl(pruned)
        stats = manager.records[-1].statistics
        rows.append({"metric": metric, "ppl": ppl, "prune_s": prune_s, "eval_s": eval_s,
                     "pipeline": text, **stats})
        print(f"{metric}: ppl {ppl:.1f}, prune {prune_s:.1f} s, eval {eval_s:.1f} s, {stats}", flush=True)

    print("\n| metric | held-out ppl | prune s | removed |\n|---|---:|---:|---|")
    for row in rows:
        removed = ", ".join(f"{k.split()[0]} {v}" for k, v in row.items() if k.endswith("groups removed"))
        print(f"| {row['metric']} | {row['ppl']:.1f} | {row.get('prune_s', 0):.1f} | {removed} |")
    out = Path(__file__).parent / "out" / args.out
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"lower_s": lower_s, "discover_s": discover_s, "args": vars(args),
                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
