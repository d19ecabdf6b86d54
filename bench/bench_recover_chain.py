"""Recovery as more than one ``recover`` run: which windows a second run trains on, and the
learning-rate schedule.

The side-by-side runs stage 2 (KD) as its own ``recover`` after stage 1, and at the full budget
stage 2 made every source worse. Before the ``recover-cursor`` attribute (2026-11-29) a second
run with the same seed started the data order again at step 0, so it trained on the windows
the first run had just used. This script measures, on SmolLM2-135M-Instruct with a LoRA r=8
adapted ``BENCH_ADAPT`` (default 48) steps on the ablation mix, after ``lhspg`` at
``BENCH_RATIO`` (default 0.2; 12 steps) and ``BENCH_STAGE1`` (default 36) ``recover`` steps:

- ``BENCH_MORE`` (default 18) more steps of LM loss and of KD from the adapted model, on the
  same windows again (the cursor removed between the runs: the old behaviour) and on the next
  windows (the cursor);
- one run of stage 1 + more steps, with the constant learning rate and with
  ``schedule=cosine``, and the two runs chained, both with ``schedule=cosine``.

Batches of 2 x 128 tokens, lr 1e-3; held-out perplexity on Austen and the WEB bible, 16 x 128
tokens each. Writes bench/out/recover_chain_r{ratio}.json.
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

TAG = "recover-chain"


def main() -> None:
    from lorashear.ir.core import clone_module
    from lorashear.ir.fileformat import save_ir
    from lorashear.passes import PassManager
    from lorashear.runtime.executor import emit_torch

    set_threads()
    ratio = float(os.environ.get("BENCH_RATIO", "0.2"))
    stage1 = int(os.environ.get("BENCH_STAGE1", "36"))
    more = int(os.environ.get("BENCH_MORE", "18"))
    adapt = int(os.environ.get("BENCH_ADAPT", "48"))
    batch, seq = 2, 128
    work = Path(tempfile.mkdtemp(prefix="recover-chain-"))
    start = time.perf_counter()
    adapted, heldout, mix = smollm2_with_mix(work, seq, adapt=adapt, batch=batch)
    teacher = save_ir(adapted, work / "adapted.ir")
    rows: dict[str, dict[str, float]] = {}
    out = OUT_DIR / f"recover_chain_r{ratio}.json"

    def measure(name: str, module) -> None:
        rows[name] = small_held_out_ppl(emit_torch(module).eval(), heldout)
        log(TAG, f"{name}: " + ", ".join(f"{s} {v:.1f}" for s, v in rows[name].items()))
        OUT_DIR.mkdir(exist_ok=True)
        out.write_text(json.dumps(
            {"machine": machine_info(), "ratio": ratio, "adapt_steps": adapt, "lhspg_steps": 12,
             "stage1_steps": stage1, "more_steps": more, "batch": batch, "seq_len": seq, "lr": 1e-3,
             "eval": SMALL_EVAL, "seconds": round(time.perf_counter() - start, 1), "ppl": rows}, indent=1))

    def recover(module, steps: int, kd: bool = False, schedule: str = "constant", replay: bool = False):
        if replay:  # forget where the earlier run's data ended: the behaviour before the cursor
            module.attributes.pop("recover-cursor", None)
        PassManager.parse(
            f"recover{{data={mix},steps={steps},stage1-steps={0 if kd else steps},"
            f"loss={'kd' if kd else 'lm'},reference={teacher},lr=0.001,batch={batch},seq-len={seq},"
            f"probe-every=1000,schedule={schedule},progress=false}}").run(module)
        return module

    measure("unpruned (adapted)", adapted)
    pruned = clone_module(adapted)
    PassManager.parse(f"lhspg{{ratio={ratio},periods=1,steps=12,batch={batch},seq-len={seq},lr=0.001,"
                      f"data={mix},progress=false}},compress").run(pruned)
    measure("lhspg", pruned)
    first = recover(clone_module(pruned), stage1)
    measure(f"+ {stage1} lm", first)
    for kd in (False, True):
        loss = "kd" if kd else "lm"
        measure(f"+ {stage1} lm + {more} {loss}, same windows again",
                recover(clone_module(first), more, kd=kd, replay=True))
        measure(f"+ {stage1} lm + {more} {loss}, next windows", recover(clone_module(first), more, kd=kd))
    measure(f"+ {stage1 + more} lm in one run", recover(clone_module(pruned), stage1 + more))
    measure(f"+ {stage1 + more} lm in one run, cosine",
            recover(clone_module(pruned), stage1 + more, schedule="cosine"))
    chained = recover(clone_module(pruned), stage1, schedule="cosine")
    measure(f"+ {stage1} lm, cosine", chained)
    measure(f"+ {stage1} lm + {more} kd, both cosine, next windows",
            recover(chained, more, kd=True, schedule="cosine"))
    log(TAG, f"wrote {out}")


if __name__ == "__main__":
    main()
