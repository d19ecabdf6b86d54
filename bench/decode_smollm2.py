"""Decoding speed of SmolLM2-135M-Instruct, dense and pruned 20%, in three runtimes.

Greedy decoding of a 128-token prompt (Persuasion, the held-out Austen novel) + 128 new tokens
(``min_new_tokens`` = ``max_new_tokens``, so every run decodes as many) at batch 1 and 8, by
transformers' own ``generate`` on the dense model, by lorashear's PyTorch executor over its
KV-cache graph, and by ONNX Runtime on the decoder with past key values, each for the dense
model and for a one-shot 20% pruned one (``discover,prune{ratio=0.2,metric=magnitude},compress``:
non-uniform widths, which stock transformers cannot load). Per row: time to first token
(prefill + one step), decode tokens/s after the first token, end-to-end tokens/s. Then prefill
tokens/s of the executor and ONNX Runtime against transformers' forward at 1x128 and 8x128, and
whether greedy tokens agree between runtimes (and, on the pruned model, with decoding without
a cache, over the first ``--uncached-tokens``). Prints a Markdown table, writes
``bench/out/decode_smollm2.json`` and ``.md``.

    nice python3 bench/decode_smollm2.py [--repeats 1] [--batches 1,8] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import OUT_DIR, log, machine_info, prefill_tokens_per_second, set_threads, source_text

TAG = "decode"


class Clock:
    """A generation streamer that notes when each token arrives (the first call is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def timed_generate(model, ids, mask, new_tokens: int, repeats: int) -> dict:
    """Median time to first token, decode rate after it, end-to-end rate over ``repeats`` runs,
    after a short warm-up; and the tokens of the last run."""
    options = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
    model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, **options)
    ttft, decode, total = [], [], []
    batch = ids.shape[0]
    out = None
    for _ in range(repeats):
        clock = Clock()
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, streamer=clock, **options)
        end = time.perf_counter()
        first = clock.times[1]  # times[0] is the prompt
        ttft.append(first - start)
        decode.append(batch * (new_tokens - 1) / (end - first))
        total.append(batch * new_tokens / (end - start))
    assert out is not None and out.shape[1] == ids.shape[1] + new_tokens
    return {"ttft_s": statistics.median(ttft), "decode_tok_s": statistics.median(decode),
            "total_tok_s": statistics.median(total), "tokens": out[:, ids.shape[1]:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8", help="batch sizes (default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row (median)")
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--uncached-tokens", type=int, default=32,
                        help="greedy tokens of the pruned model decoded without a cache, to "
                        "compare with the cached runtimes (0: skip)")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--out", default="decode_smollm2", help="file stem under bench/out/")
    args = parser.parse_args()
    threads = set_threads()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorashear.frontend.pretrained import lower_pretrained
    from lorashear.ir.core import clone_module
    from lorashear.models.default import prepare_default_model
    from lorashear.passes import PassManager
    from lorashear.runtime.executor import emit_torch
    from lorashear.runtime.onnx_emit import emit_onnx
    from lorashear.runtime.onnx_generate import onnx_generator

    model_dir = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches = [int(b) for b in args.batches.split(",")]
    text_ids = tokenizer(source_text("austen", "heldout", 200_000), add_special_tokens=False).input_ids
    n = args.prompt_tokens
    prompts = torch.tensor([text_ids[i * n:(i + 1) * n] for i in range(max(batches))])

    log(TAG, "lowering the dense model, pruning a copy")
    dense = lower_pretrained(model_dir)
    pruned = clone_module(dense)
    pipeline = f"discover,prune{{ratio={args.ratio},metric=magnitude}},compress"
    PassManager.parse(pipeline).run(pruned)
    pruned.attributes.pop("groups", None)
    params = {"dense": dense.num_parameters(), "pruned": pruned.num_parameters()}
    work = Path(tempfile.mkdtemp(prefix="lorashear-decode-"))
    log(TAG, "emitting the ONNX decoders")
    onnx_paths = {}
    for name, module in (("dense", dense), ("pruned", pruned)):
        start = time.perf_counter()
        onnx_paths[name] = emit_onnx(module, work / f"{name}.onnx", kv_cache=True)
        log(TAG, f"  {name}: {time.perf_counter() - start:.1f} s")

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                              attn_implementation="sdpa").eval()
    runtimes = {
        ("dense", "transformers"): hf,
        ("dense", "lorashear executor"): emit_torch(dense),
        ("dense", "ONNX Runtime"): onnx_generator(onnx_paths["dense"], threads=threads),
        ("pruned", "lorashear executor"): emit_torch(pruned),
        ("pruned", "ONNX Runtime"): onnx_generator(onnx_paths["pruned"], threads=threads),
    }
    rows, tokens = [], {}
    for batch in batches:
        ids = prompts[:batch]
        mask = torch.ones_like(ids)
        for (model_name, runtime), model in runtimes.items():
            log(TAG, f"decoding: {model_name}, {runtime}, batch {batch}")
            with torch.no_grad():
                result = timed_generate(model, ids, mask, args.new_tokens, args.repeats)
            tokens[model_name, runtime, batch] = result.pop("tokens")
            rows.append({"model": model_name, "runtime": runtime, "batch": batch, **result})
            log(TAG, f"  ttft {result['ttft_s']:.3f} s, decode {result['decode_tok_s']:.1f} tok/s")

    agreement = {}
    for (model_name, runtime, batch), got in tokens.items():
        ref_runtime = "transformers" if model_name == "dense" else "lorashear executor"
        if runtime == ref_runtime:
            continue
        ref = tokens[model_name, ref_runtime, batch]
        same = (got == ref).all(dim=1)
        first = [int((row != ref_row).nonzero()[0]) if not ok else None
                 for row, ref_row, ok in zip(got, ref, same, strict=True)]
        agreement[f"{model_name}: {runtime} vs {ref_runtime}, batch {batch}"] = {
            "rows_equal": int(same.sum()), "rows": len(same), "first_mismatch": first}
    if args.uncached_tokens:
        log(TAG, f"pruned model without a cache: {args.uncached_tokens} greedy tokens, batch 1")
        model = runtimes["pruned", "lorashear executor"]
        ids = prompts[:1]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=False,
                                 max_new_tokens=args.uncached_tokens,
                                 min_new_tokens=args.uncached_tokens, do_sample=False,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=0)
        uncached = out[0, ids.shape[1]:]
        for runtime in ("lorashear executor", "ONNX Runtime"):
            cached = tokens["pruned", runtime, 1][0, :args.uncached_tokens]
            agreement[f"pruned: {runtime} cached vs executor uncached, batch 1"] = {
                "rows_equal": int(torch.equal(cached, uncached)), "rows": 1,
                "tokens": args.uncached_tokens}

    log(TAG, "prefill")
    prefill = []
    vocab = dense.attributes["config"].config["vocab_size"]
    for batch in batches:
        row = {"batch": batch}
        for name, run in (("transformers", lambda x: hf(x)),
                          ("lorashear executor", lambda x: runtimes["dense", "lorashear executor"](x)),
                          ("ONNX Runtime", lambda x: runtimes["dense", "ONNX Runtime"](x))):
            row[name] = prefill_tokens_per_second(run, batch, n, vocab, repeats=args.prefill_repeats)
        prefill.append(row)
        log(TAG, f"  batch {batch}: {row}")

    info = machine_info()
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    info["commit"] = commit
    lines = [f"Decode, SmolLM2-135M-Instruct fp32, {n}-token prompt + {args.new_tokens} new tokens, "
             f"greedy; {info['cpu']}, {threads} threads, torch {info['torch']}, {info['date']}, "
             f"commit {commit}; "
             f"median of {args.repeats} run(s) after a warm-up",
             "", "| model | runtime | batch | time to first token s | decode tok/s | end-to-end tok/s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} ({params[r['model']] / 1e6:.1f}M) | {r['runtime']} | {r['batch']} | "
                     f"{r['ttft_s']:.3f} | {r['decode_tok_s']:.1f} | {r['total_tok_s']:.1f} |")
    lines += ["", f"Prefill tokens/s, dense, batch x {n} (median of {args.prefill_repeats}):", "",
              "| batch | transformers | lorashear executor | ONNX Runtime | executor / transformers |",
              "|---:|---:|---:|---:|---:|"]
    for r in prefill:
        lines.append(f"| {r['batch']} | {r['transformers']:.0f} | {r['lorashear executor']:.0f} | "
                     f"{r['ONNX Runtime']:.0f} | {r['lorashear executor'] / r['transformers']:.2f}x |")
    lines += ["", "Greedy tokens:", ""]
    for what, a in agreement.items():
        lines.append(f"- {what}: {a['rows_equal']}/{a['rows']} sequences equal"
                     + (f" (first mismatch per row: {a['first_mismatch']})" if a["rows_equal"] < a["rows"]
                        and "first_mismatch" in a else ""))
    table = "\n".join(lines)
    print("\n" + table)
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / f"{args.out}.md").write_text(table + "\n")
    (OUT_DIR / f"{args.out}.json").write_text(json.dumps(
        {"machine": info, "args": vars(args), "pipeline": pipeline, "parameters": params,
         "decode": rows, "prefill": prefill, "greedy_agreement": agreement}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
