"""Does ``attn-share=auto`` choose the split that ends best?

``auto`` picks, before any training, the attention/MLP split whose masked model has the least
loss on the calibration windows. This script checks that proxy against the outcome on
SmolLM2-135M-Instruct: for each ratio it runs ``lhspg{attn-share=auto}``, then ``lhspg`` with
every other split auto measured fixed by hand, and reports per split: the attention units it
removes, auto's calibration loss, the held-out perplexity right after zeroing those units
(one-shot), and after ``lhspg``. Every run starts from the same LoRA-tuned model (the LoRA
first trains ``BENCH_ADAPT`` steps, default 48, on the mix) and trains the same steps.

Held-out Austen (headline) and WEB, 16 x 128 tokens each. BENCH_RATIOS (default 0.2,0.5),
BENCH_STEPS (default 12: the side-by-side's default LHSPG budget, one period, settle 0.75),
BENCH_ADAPT. Writes bench/out/attn_share_s{steps}_a{adapt}.json.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from _common import (
    OUT_DIR,
    SMALL_EVAL,
    log,
    machine_info,
    set_threads,
    small_held_out_ppl,
    smollm2_with_mix,
)

TAG = "attn-share"


def main() -> None:
    from lorashear.analysis.masking import zero_groups
    from lorashear.ir.core import clone_module
    from lorashear.passes import PassManager
    from lorashear.runtime.executor import emit_torch

    set_threads()
    ratios = [float(r) for r in os.environ.get("BENCH_RATIOS", "0.2,0.5").split(",")]
    steps = int(os.environ.get("BENCH_STEPS", "12"))
    adapt = int(os.environ.get("BENCH_ADAPT", "48"))
    batch, seq = 2, 128
    work = Path(tempfile.mkdtemp(prefix="attn-share-"))
    base, heldout, mix = smollm2_with_mix(work, seq, adapt=adapt, batch=batch)
    groups = base.attributes["groups"]
    dense = small_held_out_ppl(emit_torch(base).eval(), heldout)
    log(TAG, "unpruned: " + ", ".join(f"{s} {v:.1f}" for s, v in dense.items()))
    common = (f"periods=1,steps={steps},settle=0.75,batch={batch},seq-len={seq},metric=taylor,"
              f"lr=0.001,data={mix},progress=false")
    results = []
    for ratio in ratios:
        runs = {}

        def run(share: str, ratio: float = ratio) -> dict:
            module = clone_module(base)
            manager = PassManager.parse(f"lhspg{{ratio={ratio},attn-share={share},{common}}}")
            start = time.perf_counter()
            manager.run(module)
            seconds = time.perf_counter() - start
            removed = module.attributes["prune-mask"].as_dict()
            one_shot = clone_module(base)
            zero_groups(one_shot, groups, removed)
            row = {"share": share, "seconds": round(seconds, 1),
                   "attn units": sum(len(u) for f, u in removed.items() if groups.families[f].kind == "attn"),
                   "one-shot ppl": small_held_out_ppl(emit_torch(one_shot).eval(), heldout),
                   "lhspg ppl": small_held_out_ppl(emit_torch(module).eval(), heldout),
                   "statistics": manager.records[-1].statistics}
            log(TAG, f"r={ratio} attn-share={share}: {row['attn units']} attn units, one-shot "
                f"{row['one-shot ppl']['austen']:.1f}, lhspg {row['lhspg ppl']['austen']:.1f} ({seconds:.0f} s)")
            return row

        runs["auto"] = run("auto")
        losses = runs["auto"]["statistics"]["attn-share losses"]
        chosen = runs["auto"]["statistics"]["attn-share chosen"]
        for label in losses:
            if label != chosen:
                runs[label] = run(label)
        splits = [{"split": label, "calibration loss": loss,
                   **{k: v for k, v in (runs["auto"] if label == chosen else runs[label]).items()
                      if k in ("attn units", "one-shot ppl", "lhspg ppl")}}
                  for label, loss in losses.items()]
        best = min(splits, key=lambda s: s["lhspg ppl"]["austen"])["split"]
        results.append({"ratio": ratio, "chosen": chosen, "best after lhspg": best, "splits": splits,
                        "auto seconds": runs["auto"]["seconds"]})
        log(TAG, f"r={ratio}: auto chose {chosen}; best after lhspg: {best}")
        OUT_DIR.mkdir(exist_ok=True)
        (OUT_DIR / f"attn_share_s{steps}_a{adapt}.json").write_text(json.dumps(
            {"machine": machine_info(), "steps": steps, "adapt_steps": adapt, "batch": batch,
             "seq_len": seq, "eval": SMALL_EVAL, "unpruned": dense, "ratios": results}, indent=1))


if __name__ == "__main__":
    main()
