"""What ``recover{train=...}`` trains, and at which learning rates, on a one-shot-pruned SmolLM2.

Not part of ``make bench`` (about 5 minutes of CPU per variant). Lowers the converted default
model with a fresh LoRA (rank 8), runs ``discover``, prunes 20% by wanda with MLP channels only
(``attn-share=0``, the split ``attn-share=auto`` chose in the side by side), folds the removed
channels with ``reconstruct{damp=0.1}`` on the same calibration windows of Austen's five
novels, then for each variant trains ``recover`` stage 1 alone on those novels for ``--steps``
steps of 4 x 128 tokens and measures perplexity on Persuasion (the held-out novel), 16 windows
of 256 tokens. Each variant is ``recover`` option text:

    python3 bench/recover_train_smollm2.py --steps 40 "train=lora" "train=all,base-lr=1e-4" "train=all,lr=1e-4,base-lr=1e-4"
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import add_smollm2_arguments, one_shot_pipeline, save_rows
from _common import held_out_ppl as held_out_perplexities


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_smollm2_arguments(parser)
    parser.add_argument("variants", nargs="+", help="recover options of each variant (train=all,base-lr=1e-4)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--calibration", default="batches=8,batch=4,seq-len=128",
                        help="calibration options of prune and reconstruct")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="recover_train_smollm2.json", help="file name under bench/out/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from lorashear.eval.perplexity import tokenize_text
    from lorashear.frontend.pretrained import lower_pretrained
    from lorashear.ir.core import clone_module
    from lorashear.passes import PassManager
    from lorashear.runtime.executor import emit_torch

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    heldout = tokenize_text(tokenizer, Path(args.heldout).read_text(), args.windows * args.window)

    def ppl(m) -> float:
        return held_out_perplexities(emit_torch(m), {"heldout": heldout}, window=args.window,
                                     windows=args.windows)["heldout"]

    module = lower_pretrained(args.model, lora_rank=8)
    PassManager.parse("discover").run(module)
    rows = [{"what": "dense", "ppl": ppl(module)}]
    pruned = clone_module(module)
    PassManager.parse(one_shot_pipeline("wanda", args.ratio, args.train, calibration=args.calibration,
                                        attn_share=0)).run(pruned)
    rows.append({"what": f"wanda {args.ratio}, MLP channels only", "ppl": ppl(pruned)})
    # reconstruct reads the removed units from the dense weights: the dense copy gets the mask
    start = clone_module(module)
    start.attributes["prune-mask"] = pruned.attributes["prune-mask"]
    PassManager.parse(f'reconstruct{{data="{args.train}",{args.calibration},damp=0.1}}').run(start)
    rows.append({"what": "+ reconstruct{damp=0.1}", "ppl": ppl(start)})
    for row in rows:
        print(row, flush=True)
    for variant in args.variants:
        trained = clone_module(start)
        manager = PassManager.parse(f'recover{{data="{args.train}",steps={args.steps},stage1-steps={args.steps},'
                                    f'probe-every={args.steps},progress=false,{variant}}}')
        begin = time.perf_counter()
        manager.run(trained)
        rows.append({"what": f"+ recover{{{variant}}}", "ppl": ppl(trained),
                     "seconds": time.perf_counter() - begin,
                     "optimizer state MB": manager.records[-1].statistics.get("optimizer state MB")})
        print(rows[-1], flush=True)
    save_rows(rows, args, f"model ({args.steps} recovery steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
