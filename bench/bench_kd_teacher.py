"""Does recovery's KD stage hurt because the teacher never saw the data? (a diagnostic)

The side-by-side runs start from a fresh LoRA, so ``recover{loss=kd}`` distils from the base
instruct model, which was never adapted to the benchmark's sources, while stage 1 adapts the
pruned student to them. At the full budget KD then made every source worse. This script
separates the two: the same pruned student (LHSPG, then ``recover`` stage 1 on the sources) is
distilled for the same steps from (a) the base model and (b) the base model after LoRA training
on the same sources for as many steps as the student had: the situation of a user whose LoRA
already holds the skill.

SmolLM2-135M-Instruct, fresh LoRA r=8, the ablation's token-id mix of four sources, batches of
2 x 128 tokens; held-out perplexity on Austen and the WEB bible, 16 x 128 tokens each.
BENCH_RATIO (default 0.2), BENCH_STEPS (LHSPG and stage-1 steps, default 12) and BENCH_KD_STEPS
(default 6). Writes bench/out/kd_teacher_r{ratio}.json.
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

TAG = "kd-teacher"


def main() -> None:
    from lorashear.ir.core import clone_module
    from lorashear.ir.fileformat import save_ir
    from lorashear.passes import PassManager
    from lorashear.runtime.executor import emit_torch

    set_threads()
    ratio = float(os.environ.get("BENCH_RATIO", "0.2"))
    steps = int(os.environ.get("BENCH_STEPS", "12"))
    kd_steps = int(os.environ.get("BENCH_KD_STEPS", str(steps)))
    batch, seq = 2, 128
    work = Path(tempfile.mkdtemp(prefix="kd-teacher-"))
    base, heldout, mix = smollm2_with_mix(work, seq)
    rows: dict[str, dict[str, float]] = {}

    def measure(name: str, module) -> None:
        rows[name] = small_held_out_ppl(emit_torch(module).eval(), heldout)
        log(TAG, f"{name}: " + ", ".join(f"{s} {v:.1f}" for s, v in rows[name].items()))

    def recover(total: int, kd: bool, reference: Path | None = None) -> str:
        return (f"recover{{data={mix},steps={total},stage1-steps={0 if kd else total},"
                f"loss={'kd' if kd else 'lm'},lr=0.001,batch={batch},seq-len={seq},probe-every=1000,"
                f"progress=false{f',reference={reference}' if reference else ''}}}")

    start = time.perf_counter()
    measure("base", base)
    base_ir = save_ir(base, work / "base.ir")
    adapted = clone_module(base)  # the teacher that saw the sources for as many steps as the student
    PassManager.parse(recover(2 * steps, kd=False)).run(adapted)
    measure("base + LoRA trained on the sources", adapted)
    adapted_ir = save_ir(adapted, work / "adapted.ir")
    student = clone_module(base)
    PassManager.parse(f"lhspg{{ratio={ratio},periods=1,steps={steps},batch={batch},seq-len={seq},"
                      f"metric=taylor,lr=0.001,data={mix},progress=false}},compress,"
                      + recover(steps, kd=False)).run(student)
    measure("pruned: LHSPG + stage 1", student)
    for name, teacher in (("KD from the base model", base_ir), ("KD from the adapted model", adapted_ir)):
        distilled = clone_module(student)
        PassManager.parse(recover(kd_steps, kd=True, reference=teacher)).run(distilled)
        measure(f"pruned: + {name}", distilled)
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / f"kd_teacher_r{ratio}.json"
    out.write_text(json.dumps(
        {"machine": machine_info(), "ratio": ratio, "steps": steps, "kd_steps": kd_steps, "batch": batch,
         "seq_len": seq, "eval": SMALL_EVAL,
         "seconds": round(time.perf_counter() - start, 1), "ppl": rows}, indent=1))
    log(TAG, f"wrote {out}")


if __name__ == "__main__":
    main()
