"""LHSPG variants against one-shot taylor pruning + recovery, at an equal token budget.

The side-by-side benchmark found LHSPG alone behind one-shot taylor + recovery at 50% with a
small budget (2 periods x 6 steps): every period forces its groups to zero at its last step, so
the final model has trained zero steps in its final shape, while the one-shot model trains every
step in it. This script measures the knobs that move that trade-off on SmolLM2-135M-Instruct
(fresh LoRA r=8), each row trained on the same token-id data for the same number of steps:

- ``lhspg`` with ``settle`` = 0 / 0.5 / 0.75 / 0.9 (share of each period's steps trained after
  its groups are zero), ``lam`` (shrink strength), ``periods``, ``rescore`` and ``warmup``;
- one-shot taylor (the same calibration as ``lhspg``'s) + ``recover{loss=lm}`` for as many steps,
  with and without ``recover``'s learning-rate warmup;
- the knowledge analysis before ``lhspg`` or one-shot: ``gamma`` (families protected) and
  ``spread`` (the others' shares graded by their loss increase);
- the allocation: both with MLP channels only (``attn-share=0``: the same ``ratio`` of attention
  + MLP, all of it from the MLP; DESIGN.md 9: one-shot at 20%, a KV group per layer does most
  of the damage), and ``lhspg`` with ``attn-share=auto``, by taylor and by wanda scores. Since
  ``lhspg``'s default became ``auto`` (2026-11-29), the variants that name no ``attn-share`` run
  with it; the README's rows for them were measured with the proportional default before.

Held-out perplexity on Austen (headline) and the WEB bible, 16 x 128 tokens each. The side-by-side
sizes (``default``: 12 steps of 2 x 128 tokens) unless BENCH_STEPS / BENCH_BATCH say otherwise;
BENCH_RATIO (default 0.5); BENCH_VARIANTS (names separated by ";") narrows the rows; BENCH_ADAPT
(default 0) first trains the LoRA that many steps on the mix, so every row starts from a
LoRA-tuned model; BENCH_SEED (default 0) sets ``lhspg``'s seed in the ``{bare}`` rows (its
scoring windows and batch order; the adaptation and ``knowledge``'s windows stay as they are).
Writes bench/out/lhspg_ablation_r{ratio}_s{steps}[_a{adapt}][_seed{seed}].json, where a rerun
replaces its variants' rows and keeps the others.
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
    parameter_count,
    set_threads,
    small_held_out_ppl,
    smollm2_with_mix,
)

TAG = "lhspg-ablation"

# name -> (pipeline template); {common} = metric=taylor + data/batch/seq-len ({bare}: without
# the metric), {total} = total steps.
# ONE_SHOT [wanda] [mlp|auto] [knowledge] [warmup=N]: one-shot taylor (wanda with wanda; MLP
# channels only with mlp: attn-share=0; the measured split with auto; after knowledge{gamma=0.1}
# with knowledge) + recover.
VARIANTS = {
    "unpruned": "",  # the model every row starts from: the fresh or the adapted LoRA
    "one-shot taylor + recover": "ONE_SHOT",  # recover's default warmup
    "one-shot taylor + recover, no warmup": "ONE_SHOT warmup=0",
    "one-shot taylor MLP only + recover": "ONE_SHOT mlp",
    "one-shot wanda auto + recover": "ONE_SHOT wanda auto",
    "lhspg P=2 settle=0": "lhspg{{ratio={ratio},periods=2,steps={half},{common}}}",
    "lhspg P=2 settle=0.5": "lhspg{{ratio={ratio},periods=2,steps={half},settle=0.5,{common}}}",
    "lhspg P=1 settle=0.5": "lhspg{{ratio={ratio},periods=1,steps={total},settle=0.5,{common}}}",
    "lhspg P=1 settle=0.75": "lhspg{{ratio={ratio},periods=1,steps={total},settle=0.75,{common}}}",
    "lhspg P=1 settle=0.9": "lhspg{{ratio={ratio},periods=1,steps={total},settle=0.9,{common}}}",
    "lhspg P=2 settle=0.75": "lhspg{{ratio={ratio},periods=2,steps={half},settle=0.75,{common}}}",
    "lhspg P=4 settle=0.5": "lhspg{{ratio={ratio},periods=4,steps={quarter},settle=0.5,{common}}}",
    "lhspg P=2 settle=0.75 rescore": "lhspg{{ratio={ratio},periods=2,steps={half},settle=0.75,rescore=true,{common}}}",
    "lhspg P=4 settle=0.5 rescore": "lhspg{{ratio={ratio},periods=4,steps={quarter},settle=0.5,rescore=true,{common}}}",
    "lhspg P=1 settle=0.75 warmup": "lhspg{{ratio={ratio},periods=1,steps={total},settle=0.75,warmup=-1,{common}}}",
    "lhspg P=1 settle=0.5 warmup": "lhspg{{ratio={ratio},periods=1,steps={total},settle=0.5,warmup=-1,{common}}}",
    "lhspg P=2 lam=2": "lhspg{{ratio={ratio},periods=2,steps={half},lam=2,{common}}}",
    "lhspg P=1 settle=0.75 MLP only": "lhspg{{ratio={ratio},periods=1,steps={total},settle=0.75,attn-share=0,{common}}}",
    "lhspg P=1 settle=0.75 auto": "lhspg{{ratio={ratio},periods=1,steps={total},settle=0.75,attn-share=auto,{common}}}",
    "lhspg P=1 settle=0.75 auto wanda": "lhspg{{ratio={ratio},periods=1,steps={total},settle=0.75,attn-share=auto,metric=wanda,{bare}}}",
    "lhspg P=1 settle=0.75 auto wanda global": "lhspg{{ratio={ratio},periods=1,steps={total},settle=0.75,attn-share=auto,metric=wanda,scope=global,{bare}}}",
    "knowledge 0.1 + lhspg P=1 settle=0.75 auto wanda": "knowledge{{gamma=0.1,data={mix},progress=false}},lhspg{{ratio={ratio},periods=1,steps={total},settle=0.75,attn-share=auto,metric=wanda,{bare}}}",
    "knowledge 0.2 + lhspg P=1 settle=0.75 auto wanda": "knowledge{{gamma=0.2,data={mix},progress=false}},lhspg{{ratio={ratio},periods=1,steps={total},settle=0.75,attn-share=auto,metric=wanda,{bare}}}",
    "knowledge 0.1 + one-shot wanda auto + recover": "ONE_SHOT wanda auto knowledge",
    "knowledge 0.1 spread 0.25 + lhspg P=1 settle=0.75 auto wanda": "knowledge{{gamma=0.1,spread=0.25,data={mix},progress=false}},lhspg{{ratio={ratio},periods=1,steps={total},settle=0.75,attn-share=auto,metric=wanda,{bare}}}",
    "knowledge 0.1 spread 0.5 + lhspg P=1 settle=0.75 auto wanda": "knowledge{{gamma=0.1,spread=0.5,data={mix},progress=false}},lhspg{{ratio={ratio},periods=1,steps={total},settle=0.75,attn-share=auto,metric=wanda,{bare}}}",
}


def main() -> None:
    from _common import one_shot_pipeline

    from lorashear.ir.core import clone_module
    from lorashear.passes import PassManager
    from lorashear.runtime.executor import emit_torch

    set_threads()
    ratio = float(os.environ.get("BENCH_RATIO", "0.5"))
    total = int(os.environ.get("BENCH_STEPS", "12"))
    batch, seq = int(os.environ.get("BENCH_BATCH", "2")), 128
    adapt = int(os.environ.get("BENCH_ADAPT", "0"))
    wanted = [v for v in os.environ.get("BENCH_VARIANTS", "").split(";") if v] or list(VARIANTS)
    work = Path(tempfile.mkdtemp(prefix="lhspg-ablation-"))
    base, heldout, mix = smollm2_with_mix(work, seq, adapt=adapt, batch=batch)
    seed = int(os.environ.get("BENCH_SEED", "0"))  # lhspg's: its scoring windows and batch order
    bare = (f"batch={batch},seq-len={seq},lr=0.001,data={mix},progress=false"  # {bare}: no metric
            + (f",seed={seed}" if seed else ""))
    common = f"metric=taylor,{bare}"
    windows = len(mix.read_text().split()) // seq
    calibration = f"batches={min(4, max(1, windows // batch))},batch={batch},seq-len={seq}"
    out = OUT_DIR / f"lhspg_ablation_r{ratio}_s{total}{f'_a{adapt}' if adapt else ''}{f'_seed{seed}' if seed else ''}.json"
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    for name in wanted:
        template = VARIANTS[name]
        module = clone_module(base)
        if not template:
            text = ""
        elif template.startswith("ONE_SHOT"):
            words = template.split()[1:]
            warmup = next((w for w in words if w.startswith("warmup=")), "")
            share = 0 if "mlp" in words else "auto" if "auto" in words else None
            text = (("knowledge{gamma=0.1,data=" + str(mix) + ",progress=false}," if "knowledge" in words else "")
                    + one_shot_pipeline("wanda" if "wanda" in words else "taylor", ratio, mix,
                                      calibration=calibration, attn_share=share)
                    + f",recover{{data={mix},steps={total},stage1-steps={total},loss=lm,lr=0.001,batch={batch},"
                      f"seq-len={seq},probe-every=1000,progress=false{',' + warmup if warmup else ''}}}")
        else:
            text = template.format(ratio=ratio, half=total // 2, quarter=total // 4, total=total, common=common,
                                   bare=bare, mix=mix)
        start = time.perf_counter()
        if text:
            PassManager.parse(text + ",compress").run(module)
        seconds = time.perf_counter() - start
        model = emit_torch(module).eval()
        ppl = small_held_out_ppl(model, heldout)
        rows = [r for r in rows if r["variant"] != name]
        rows.append({"variant": name, "pipeline": text, "seconds": round(seconds, 1), "ppl": ppl,
                     "parameters": parameter_count(model)})
        log(TAG, f"{name}: " + ", ".join(f"{s} {v:.1f}" for s, v in ppl.items()) + f" ({seconds:.0f} s)")
        OUT_DIR.mkdir(exist_ok=True)
        out.write_text(json.dumps(
            {"machine": machine_info(), "ratio": ratio, "steps": total, "adapt_steps": adapt,
             "batch": batch, "seq_len": seq,
             "eval": SMALL_EVAL, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
