"""One-shot pruning of SmolLM2-135M-Instruct with and without ``reconstruct``: held-out perplexity.

Not part of ``make bench`` (minutes of CPU). Lowers the converted default model, runs
``discover``, prunes a copy with ``prune{ratio=R,metric=M,kinds=...}`` calibrated on Austen's
five novels, then for each ``damp`` folds the removed units into the kept ones with
``reconstruct`` on the same calibration windows, and measures perplexity on Persuasion (the
held-out novel). ``reconstruct`` reads the removed units from the dense module: instead of
saving it as ``reference=``, the script gives the dense copy the pruned copy's ``prune-mask``
(units still alive), which folds the same weights and activations and then zeroes them.

    python3 bench/reconstruct_smollm2.py --ratio 0.2 --metric wanda --damps 0.01,0.1 --biases false,true
    python3 bench/reconstruct_smollm2.py --ratio 0.2 --metric obs --inputs dense,pruned
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import add_smollm2_arguments, one_shot_pipeline, save_rows
from _common import held_out_ppl as held_out_perplexities


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_smollm2_arguments(parser)
    parser.add_argument("--metric", default="wanda")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--kinds", default="attn,mlp")
    parser.add_argument("--scope", default="per-layer", help="prune's scope (per-layer, global)")
    parser.add_argument("--attn-share", default=None, help="prune's attn-share (default: proportional)")
    parser.add_argument("--damps", default="0.01")
    parser.add_argument("--biases", default="false",
                        help="reconstruct's bias= values to run for each damp (false,true: both)")
    parser.add_argument("--inputs", default="dense",
                        help="reconstruct's inputs= values (dense: one-shot; pruned, pruned-to-dense: layer by layer)")
    parser.add_argument("--calibration", default="batches=8,batch=4,seq-len=128",
                        help="calibration options of prune and reconstruct (32 windows x 128 tokens)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="reconstruct_smollm2.json", help="file name under bench/out/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from lorashear.analysis.groups import PruneMaskAttr
    from lorashear.analysis.masking import zero_groups
    from lorashear.eval.perplexity import tokenize_text
    from lorashear.frontend.pretrained import lower_pretrained
    from lorashear.ir.core import clone_module
    from lorashear.passes import PassManager
    from lorashear.runtime.executor import emit_torch

    module = lower_pretrained(args.model)
    PassManager.parse("discover").run(module)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    heldout = tokenize_text(tokenizer, Path(args.heldout).read_text(), args.windows * args.window)

    def ppl(m) -> float:
        return held_out_perplexities(emit_torch(m), {"heldout": heldout}, window=args.window,
                                     windows=args.windows)["heldout"]

    rows = [{"what": "dense", "ppl": ppl(module)}]
    print(f"dense ppl {rows[-1]['ppl']:.2f}", flush=True)
    pruned = clone_module(module)
    begin = time.perf_counter()
    pipeline = one_shot_pipeline(args.metric, args.ratio, args.train, kinds=args.kinds,
                                 calibration=args.calibration, scope=args.scope, attn_share=args.attn_share)
    # the prune-mask of a pipeline already run (a reconstruct-only sweep need not score again)
    masks = Path(__file__).parent / "out" / "reconstruct_masks.json"
    cached = json.loads(masks.read_text()) if masks.is_file() else {}
    hit = pipeline in cached
    if hit:
        removed = {int(f): tuple(units) for f, units in cached[pipeline].items()}
        zero_groups(pruned, pruned.attributes["groups"], removed)
        pruned.attributes["prune-mask"] = PruneMaskAttr.from_dict(removed)
    else:
        PassManager.parse(pipeline).run(pruned)
        masks.parent.mkdir(exist_ok=True)
        cached[pipeline] = {str(f): list(u) for f, u in pruned.attributes["prune-mask"].as_dict().items()}
        masks.write_text(json.dumps(cached))
    rows.append({"what": f"{args.metric} {args.ratio}", "ppl": ppl(pruned), "seconds": time.perf_counter() - begin,
                 "cached mask": hit})
    print(rows[-1], flush=True)
    for inputs in args.inputs.split(","):
        for damp in args.damps.split(","):
            for bias in args.biases.split(","):
                rebuilt = clone_module(module)
                rebuilt.attributes["prune-mask"] = pruned.attributes["prune-mask"]
                manager = PassManager.parse(f'reconstruct{{data="{args.train}",{args.calibration},damp={damp},'
                                            f'kinds={args.kinds},bias={bias},inputs={inputs}}}')
                begin = time.perf_counter()
                manager.run(rebuilt)
                label = (f"+ reconstruct damp={damp}" + (", bias" if bias == "true" else "")
                         + (f", inputs={inputs}" if inputs != "dense" else ""))
                rows.append({"what": label, "ppl": ppl(rebuilt),
                             "seconds": time.perf_counter() - begin, **manager.records[-1].statistics})
                print(rows[-1], flush=True)
    save_rows(rows, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
