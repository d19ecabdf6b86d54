"""What serving-ready shapes cost: one-shot wanda pruning of SmolLM2-135M-Instruct with free,
per-layer and uniform allocations, each with and without ``align=64``.

Not part of ``make bench`` (about ten minutes of CPU). Lowers the converted default model (no
LoRA), runs ``discover`` and one ``saliency{metric=wanda}`` on Austen's training novels (every
variant prunes by the same scores), then for each ratio and allocation ``prune`` on a copy and
``compress``, and measures held-out perplexity on Persuasion (the first ``--windows`` windows
of ``--window`` tokens), the forward's tokens/s at 1x``--seq`` in lorashear's executor, and how
an ``hf`` emission of it loads: stock ``AutoModelForCausalLM.from_pretrained`` (uniform shapes)
or with ``trust_remote_code=True`` (per-layer widths) -- each checked against lorashear's
logits and greedy tokens. The allocations:

- ``global``: free widths (``scope=global``: units compete across layers);
- ``per-layer``: today's default (every family gives the same share; uniform unless a
  ``knowledge`` analysis protects some families, which this script does not run);
- ``uniform``: ``uniform=true``;

each also with ``align=64``. Prints a Markdown table and writes ``bench/out/uniform_smollm2.json``.

    python3 bench/uniform_smollm2.py --ratios 0.2,0.5
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from _common import add_smollm2_arguments, log, machine_info, prefill_tokens_per_second, set_threads
from _common import held_out_ppl as held_out_perplexities

VARIANTS = {
    "global": "scope=global",
    "global+align64": "scope=global,align=64",
    "per-layer": "",
    "per-layer+align64": "align=64",
    "uniform": "uniform=true",
    "uniform+align64": "uniform=true,align=64",
}


def greedy(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by full recomputation (lorashear's reference)."""
    ids = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def check_loading(module, work: Path, prompt: torch.Tensor) -> dict:
    """Emit ``module`` as an ``hf`` directory and load it the way its config says: stock, or
    ``trust_remote_code``; the largest logit difference to lorashear and whether 8 greedy tokens
    (``generate``, no sampling) equal lorashear's."""
    from transformers import AutoModelForCausalLM

    from lorashear.runtime.executor import emit_torch
    from lorashear.runtime.hf import save_model_dir

    out = save_model_dir(module, work, merge=True)
    config = json.loads((out / "config.json").read_text())
    remote = "auto_map" in config
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=remote).eval()
    reference = emit_torch(module)
    with torch.no_grad():
        diff = (model(input_ids=prompt).logits - reference(prompt).logits).abs().max().item()
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                do_sample=False)
    same = torch.equal(tokens, greedy(reference, prompt, 8)[:, :tokens.shape[1]])  # it may stop at EOS
    return {"loads": "trust_remote_code" if remote else "stock", "class": type(model).__name__,
            "architectures": config.get("architectures"), "max_logit_diff": diff, "same_greedy_tokens": same}


def loads(row: dict) -> str:
    """The table cell of the loading check (empty when the variant was not checked)."""
    if "loads" not in row:
        uniform = len(row["mlp_widths"]) == 1 and len(row["kv_heads"]) == 1
        return f"{'stock' if uniform else 'trust_remote_code'} (shapes; not loaded)"
    same = "same greedy tokens" if row["same_greedy_tokens"] else "DIFFERENT greedy tokens"
    return f"{row['loads']} (checked: logits {row['max_logit_diff']:.1e}, {same})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_smollm2_arguments(parser)
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--calibration", default="batches=8,batch=4,seq-len=128",
                        help="calibration options of saliency (32 windows x 128 tokens)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128, help="prompt length of the tokens/s measure")
    parser.add_argument("--check", default="uniform,global",
                        help="variants whose hf emission is loaded and checked (at the first ratio)")
    parser.add_argument("--out", default="uniform_smollm2.json", help="file name under bench/out/")
    args = parser.parse_args()
    threads = set_threads()

    from transformers import AutoTokenizer

    from lorashear.eval.perplexity import tokenize_text
    from lorashear.frontend.pretrained import lower_pretrained
    from lorashear.ir.core import clone_module
    from lorashear.passes import PassManager
    from lorashear.runtime.executor import emit_torch

    module = lower_pretrained(args.model)
    PassManager.parse(f'discover,saliency{{metric=wanda,data="{args.train}",{args.calibration}}}').run(module)
    log("uniform", "lowered, discovered, scored by wanda")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    heldout = tokenize_text(tokenizer, Path(args.heldout).read_text(), args.windows * args.window)
    prompt = torch.tensor([heldout[:24]])
    vocab = module.attributes["config"].config["vocab_size"]

    def measure(m) -> dict:
        model = emit_torch(m)
        ppl = held_out_perplexities(model, {"heldout": heldout}, window=args.window,
                                    windows=args.windows)["heldout"]
        tps = prefill_tokens_per_second(lambda ids: model(ids), 1, args.seq, vocab)
        return {"ppl": ppl, "tokens_per_s": tps, "parameters": m.num_parameters()}

    rows = [{"ratio": 0.0, "variant": "dense", **measure(module)}]
    log("uniform", f"dense: {rows[0]}")
    work = Path(tempfile.mkdtemp(prefix="uniform-smollm2-"))
    ratios = [float(r) for r in args.ratios.split(",")]
    for ratio in ratios:
        for name in args.variants.split(","):
            pruned = clone_module(module)
            extra = f",{VARIANTS[name]}" if VARIANTS[name] else ""
            text = f"prune{{ratio={ratio},metric=wanda{extra}}},compress"
            manager = PassManager.parse(text)
            manager.run(pruned)
            stats = manager.records[0].statistics
            layers = pruned.attributes["config"].config["num_hidden_layers"]
            widths = sorted({pruned.params[f"model.layers.{i}.mlp.up_proj.weight"].type.shape[0]
                             for i in range(layers)})
            kv = sorted({pruned.params[f"model.layers.{i}.self_attn.k_proj.weight"].type.shape[0] // 64
                         for i in range(layers)})
            row = {"ratio": ratio, "variant": name, "pipeline": text, **measure(pruned),
                   "share_removed": stats["parameter share removed"], "mlp_widths": widths, "kv_heads": kv}
            if ratio == ratios[0] and name in args.check.split(","):
                # a folder name that is a Python identifier: transformers names the remote module after it
                row.update(check_loading(pruned, work / f"{name.replace('+', '_')}_{round(ratio * 100)}", prompt))
            rows.append(row)
            log("uniform", json.dumps(row))

    print(f"\n{machine_info()}, threads {threads}\n")
    print("| ratio | allocation | removed | held-out ppl | tokens/s 1x128 | MLP widths | KV heads | "
          "loads with |\n|---|---|---:|---:|---:|---|---|---|")
    for r in rows:
        if r["variant"] == "dense":
            print(f"| 0 | dense | 0 | {r['ppl']:.2f} | {r['tokens_per_s']:.0f} | 1536 | 3 | stock |")
            continue
        widths = r["mlp_widths"]
        shown = str(widths[0]) if len(widths) == 1 else f"{len(widths)} widths, {widths[0]}-{widths[-1]}"
        print(f"| {r['ratio']:g} | {r['variant']} | {r['share_removed']:.3f} | {r['ppl']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {shown} | {','.join(map(str, r['kv_heads']))} | {loads(r)} |")
    out = Path(__file__).parent / "out" / args.out
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine_info(), "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
