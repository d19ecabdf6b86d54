"""What limits recovery at 20%? Variants of the recovery, each from the same LHSPG model.

At the side-by-side's ``full`` budget the pipeline reached 57.6 held-out Austen at 20% against
the dense 44.2 (#4 asks for <= 1.15x, 50.8), and recovery moved it little after LHSPG. This
script builds that setup once: SmolLM2-135M-Instruct + LoRA r=8 trained ``adapt`` steps on the
sources (the dense row and the KD teacher), then ``knowledge{gamma=0.1}``, ``lhspg`` (ratio 0.2,
2 x 50 steps of 4 x 128 tokens, wanda, ``attn-share=auto``) and ``compress``; both models are
saved in BENCH_WORK (default bench/out/recover-capacity) and reused by a later run. Then each
variant recovers a fresh copy of the LHSPG model and is evaluated on 16 x 256 held-out tokens
per source:

- ``base``: the side-by-side's recovery, stage 1 60 steps (dynamic, lm) + stage 2 30 (kd)
- ``kd``: 90 steps of kd (distilling the adapted dense model) on equal source shares
- ``lr3``: ``base`` at lr 3e-3 instead of 1e-3; ``lo``: ``kd`` at lr 3e-4
- ``cos``: ``kd`` with ``schedule=cosine``
- ``kd-256``: ``kd`` on windows of 256 tokens, half as many per step (the same tokens): training
  at 128 never shows the pruned model the positions 128-255 that the held-out windows score
- ``kd-r32``, ``kd-r64``: ``lora{rank=R}`` (more trainable capacity), then ``kd``
- ``x3``, ``x6``: ``base`` with three / six times the steps (180 + 90, 360 + 180): is it tokens,
  and how does the gain grow with them?
- ``x3-r32``: ``lora{rank=32}``, then ``x3``: does capacity matter once tokens are more?
- ``x3-cos``: ``x3`` with ``schedule=cosine`` in both runs: is a long run held back by its
  constant learning rate?
- ``lhspg-long``: no recovery; LHSPG itself takes the recovery's steps (2 x 95 instead of
  2 x 50, the same tokens as LHSPG + ``base``), its own LHSPG model: where should a token budget go?
- ``lhspg-r32``: ``lora{rank=32}`` before knowledge + lhspg (its own LHSPG model), then ``kd``
- ``dense-lm``: the unpruned adapted model trained as many steps (lm, static shares): where
  LoRA training on these sources levels off without any pruning

BENCH_VARIANTS=base,kd picks (default: all, about 165 min on 2 cores after the 20-min setup);
BENCH_BUDGET=smoke only validates the script. Writes bench/out/recover_capacity.json and .md
(recover_capacity_<budget>.* for another budget, so a smoke run leaves the full results alone).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import bench_side_by_side as side
from _common import OUT_DIR, log, machine_info, set_threads

TAG = "recover-capacity"
RATIO = 0.2
VARIANTS = ("base", "kd", "lr3", "lo", "cos", "kd-256", "kd-r32", "kd-r64", "x3", "x6", "x3-r32",
            "x3-cos", "lhspg-r32", "lhspg-long", "dense-lm")


def lhspg_text(bench: side.Bench, rank: int | None = None, extra_steps: int = 0) -> str:
    """knowledge + lhspg + compress; ``extra_steps`` more LHSPG steps in all, spread over the periods."""
    b = bench.budget
    lora = f"lora{{rank={rank}}}," if rank else ""
    steps = b.lhspg_steps + extra_steps // b.periods
    return (f"{lora}knowledge{{gamma=0.1,data={bench.mix},progress=false}},"
            f"lhspg{{ratio={RATIO},periods={b.periods},steps={steps},batch={b.batch},"
            f"seq-len={b.seq_len},metric=wanda,lr=0.001,data={bench.mix},progress=false,"
            "attn-share=auto},compress")


def recovery(bench: side.Bench, variant: str) -> list[str]:
    """The pipelines of one variant's recovery (after any lora/lhspg of its own)."""
    b = bench.budget
    s1, s2 = b.stage1, b.stage2

    def base_times(n: int) -> list[str]:  # stage 1 (dynamic, lm) + stage 2 (kd), n times the steps
        return [bench.recover_text(n * s1, n * s1, kd=False), bench.recover_text(n * s2, 0, kd=True)]

    def cosine(texts: list[str]) -> list[str]:
        return [t.replace("lr=0.001", "lr=0.001,schedule=cosine") for t in texts]

    base = base_times(1)
    kd = [bench.recover_text(s1 + s2, 0, kd=True)]
    if variant == "base":
        return base
    if variant == "kd":
        return kd
    if variant == "lr3":
        return [t.replace("lr=0.001", "lr=0.003") for t in base]
    if variant == "lo":
        return [t.replace("lr=0.001", "lr=0.0003") for t in kd]
    if variant == "cos":
        return cosine(kd)
    if variant == "kd-256":
        return [t.replace(f"seq-len={b.seq_len},batch={b.batch}", f"seq-len={2 * b.seq_len},batch={max(1, b.batch // 2)}")
                for t in kd]
    if variant.startswith("kd-r"):
        return [f"lora{{rank={int(variant[4:])}}}", *kd]
    if variant in ("x3", "x6"):
        return base_times(int(variant[1:]))
    if variant == "x3-r32":
        return ["lora{rank=32}", *base_times(3)]
    if variant == "x3-cos":
        return cosine(base_times(3))
    if variant.startswith("lhspg-r"):
        return kd
    if variant == "lhspg-long":
        return []
    if variant == "dense-lm":
        return [bench.recover_text(s1 + s2, s1 + s2, kd=False).replace("recover{", "recover{sampling=static,")]
    raise ValueError(variant)


def main() -> None:
    from lorashear.ir.core import clone_module
    from lorashear.ir.fileformat import load_ir, save_ir

    threads = set_threads()
    budget_name = os.environ.get("BENCH_BUDGET", "full")
    budget = side.BUDGETS[budget_name]
    variants = [v for v in os.environ.get("BENCH_VARIANTS", ",".join(VARIANTS)).split(",") if v]
    work = Path(os.environ.get("BENCH_WORK", OUT_DIR / "recover-capacity")) / budget_name
    work.mkdir(parents=True, exist_ok=True)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    bench = side.Bench(budget_name, budget, work)
    adapted, pruned = work / "adapted.ir", work / "lhspg.ir"
    if adapted.exists():  # the data again, the adaptation from the file
        bench.budget = replace(budget, adapt=0)
        bench.prepare()
        bench.budget = budget
        bench.base = load_ir(adapted)
        bench.save_reference()  # prepare wrote the un-adapted one
    else:
        bench.prepare()
        save_ir(bench.base, adapted)
    stem = "recover_capacity" + ("" if budget_name == "full" else f"_{budget_name}")
    out = OUT_DIR / f"{stem}.json"
    data = json.loads(out.read_text()) if out.exists() else {}
    data.update(machine=machine_info(), threads=threads, budget=budget_name,
                budget_sizes=asdict(budget), ratio=RATIO)
    results = data.setdefault("results", {})

    def evaluate(module, name: str, seconds: float | None = None) -> None:
        row = bench.evaluate(module, {"method": name, "ratio": RATIO, "stage": name}, task=False)
        results[name] = {"ppl": row["ppl"], "parameters": row["parameters"], "seconds": seconds}
        out.write_text(json.dumps(data, indent=1))

    if "dense" not in results:
        evaluate(bench.base, "dense")
    if not pruned.exists():
        module = clone_module(bench.base)
        start = time.perf_counter()
        bench.run_passes(module, lhspg_text(bench), "lhspg")
        save_ir(module, pruned)
        evaluate(module, "lhspg", time.perf_counter() - start)
    for variant in variants:
        start = time.perf_counter()
        if variant.startswith("lhspg-r"):
            module = clone_module(bench.base)
            bench.run_passes(module, lhspg_text(bench, int(variant[7:])), variant)
            evaluate(module, f"{variant} (LHSPG)", time.perf_counter() - start)
        elif variant == "lhspg-long":
            module = clone_module(bench.base)
            bench.run_passes(module, lhspg_text(bench, extra_steps=budget.stage1 + budget.stage2), variant)
        elif variant == "dense-lm":
            module = clone_module(bench.base)
        else:
            module = load_ir(pruned)
        for text in recovery(bench, variant):
            bench.run_passes(module, text, variant)
        evaluate(module, variant, time.perf_counter() - start)
    (OUT_DIR / f"{stem}.md").write_text(table(data))
    log(TAG, f"wrote {out}")


def table(data: dict) -> str:
    rows = data["results"]
    sources = list(next(iter(rows.values()))["ppl"])
    lines = [f"Recovery variants at {data['ratio']:.0%} from one LHSPG model; budget {data['budget']}; "
             f"{data['machine'].get('cpu', '')}, {data['threads']} threads.", "",
             "| variant | " + " | ".join(f"ppl {s}" for s in sources) + " | seconds |",
             "|---|" + "---|" * (len(sources) + 1)]
    for name, row in rows.items():
        seconds = "-" if row.get("seconds") is None else f"{row['seconds']:.0f}"
        lines.append(f"| {name} | " + " | ".join(f"{row['ppl'][s]:.1f}" for s in sources)
                     + f" | {seconds} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
