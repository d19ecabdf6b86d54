"""Does one-shot taylor choose worse groups on a LoRA-tuned model? (a diagnostic)

In the side-by-side, pruning the model whose LoRA trained 48 steps on the sources made one-shot
taylor worse than pruning the fresh model (held-out Austen 286.7 against 152.1 at 20%), while
random, wanda and magnitude all got better. This script prunes one-shot (no recovery) at the
same ratio, the fresh and the adapted model alike, with the groups chosen by:

- taylor on the model itself (as the benchmarks do: 4 batches of 2 x 128 tokens of the mix);
- taylor with 4x the calibration batches;
- taylor scored on the fresh model, applied to the adapted one (are the adapted model's
  gradients the problem, or is the adapted model more fragile where taylor cuts?);
- random (the floor) and wanda.

It reports held-out perplexity (Austen, WEB bible; 16 x 128 tokens each) and the share of chosen
units that the fresh and adapted taylor choices have in common. BENCH_RATIO (default 0.2),
BENCH_ADAPT (default 48 steps of 2 x 128 tokens). Writes bench/out/saliency_adapted_r{ratio}.json.
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
    adapt_lora,
    log,
    machine_info,
    one_shot_pipeline,
    set_threads,
    small_held_out_ppl,
    smollm2_with_mix,
)

TAG = "saliency-adapted"
BATCH, SEQ = 2, 128


def chosen_units(module) -> set[tuple[int, int]]:
    """(family id, unit) pairs that a ``prune`` pass zeroed."""
    mask = module.attributes["prune-mask"]
    return {(int(f), int(u)) for f, units in mask.as_dict().items() for u in units}


def main() -> None:
    from lorashear.ir.core import clone_module
    from lorashear.passes import PassManager
    from lorashear.runtime.executor import emit_torch

    set_threads()
    ratio = float(os.environ.get("BENCH_RATIO", "0.2"))
    adapt = int(os.environ.get("BENCH_ADAPT", "48"))
    work = Path(tempfile.mkdtemp(prefix="saliency-adapted-"))
    fresh, heldout, mix = smollm2_with_mix(work, SEQ)
    adapted = clone_module(fresh)
    adapt_lora(adapted, mix, adapt, BATCH, SEQ)
    windows = len(mix.read_text().split()) // SEQ
    batches = min(4, max(1, windows // BATCH))
    calibration = f"batches={batches},batch={BATCH},seq-len={SEQ}"
    rows: list[dict] = []
    choices: dict[str, set] = {}
    start = time.perf_counter()

    def measure(model_name: str, choice: str, module, pipeline: str) -> None:
        if pipeline:
            PassManager.parse(pipeline).run(module)
            choices[f"{model_name} {choice}"] = chosen_units(module)
            PassManager.parse("compress").run(module)
        ppl = small_held_out_ppl(emit_torch(module).eval(), heldout)
        rows.append({"model": model_name, "groups": choice, "pipeline": pipeline, "ppl": ppl})
        log(TAG, f"{model_name}, {choice}: " + ", ".join(f"{s} {v:.1f}" for s, v in ppl.items()))

    for name, model in (("fresh LoRA", fresh), (f"LoRA trained {adapt} steps", adapted)):
        measure(name, "unpruned", clone_module(model), "")
        for metric in ("taylor", "random", "wanda"):
            measure(name, metric, clone_module(model),
                    one_shot_pipeline(metric, ratio, mix, calibration=calibration))
        measure(name, "taylor, 4x calibration", clone_module(model), one_shot_pipeline(
            "taylor", ratio, mix, calibration=f"batches={4 * batches},batch={BATCH},seq-len={SEQ}"))
    # the fresh model's taylor scores on the adapted model: prune reads an earlier saliency pass
    scored = clone_module(fresh)
    PassManager.parse(f'saliency{{metric=taylor,data="{mix}",{calibration}}}').run(scored)
    borrowed = clone_module(adapted)
    borrowed.attributes["saliency"] = scored.attributes["saliency"]
    measure(f"LoRA trained {adapt} steps", "taylor scored on the fresh model", borrowed,
            f"prune{{ratio={ratio},scope=per-layer,kinds=attn,mlp}}")
    a, b = choices["fresh LoRA taylor"], choices[f"LoRA trained {adapt} steps taylor"]
    overlap = len(a & b) / max(1, len(a | b))
    log(TAG, f"taylor's chosen units, fresh vs adapted: {len(a & b)} shared of {len(a | b)} (Jaccard {overlap:.3f})")
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / f"saliency_adapted_r{ratio}.json"
    out.write_text(json.dumps(
        {"machine": machine_info(), "ratio": ratio, "adapt_steps": adapt, "batch": BATCH, "seq_len": SEQ,
         "calibration": calibration, "eval": SMALL_EVAL,
         "taylor_jaccard_fresh_vs_adapted": round(overlap, 4),
         "seconds": round(time.perf_counter() - start, 1), "rows": rows}, indent=1))
    log(TAG, f"wrote {out}")


if __name__ == "__main__":
    main()
