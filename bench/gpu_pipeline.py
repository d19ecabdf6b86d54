"""The whole pipeline at the Llama-3-8B shape on one GPU, as one command of a few minutes.

    PYTHONPATH=. python3 bench/gpu_pipeline.py                       # on a CUDA machine: 8B, bf16
    PYTHONPATH=. python3 bench/gpu_pipeline.py --shape tiny --device cpu   # what make test runs

Random weights (no checkpoint travels: timing and memory do not depend on the values), LoRA
r=8 on the seven projections, then ``lower -> discover -> knowledge -> lhspg{ratio=0.2} ->
recover -> compress -> emit hf``, a few steps each, with batch x seq tokens per step, bf16
autocast and gradient checkpointing on CUDA. For every stage it prints the wall time, the
peak CUDA memory and the tokens per second it processed. Then the training step itself: a
plain LoRA AdamW step against the LHSPG step (the step followed by the per-step projection
plan over 20% of the groups), eager and replayed as a CUDA graph, the graph's weights checked
against eager's; and the projection's achieved bandwidth on a LLaMA-7B layer beside a
device-to-device copy (``gpu_check.py``'s section).

``--json PATH`` writes every figure. Each section reports and goes on when one fails; the exit
code says whether all ran.

``--fsdp2`` runs under ``torchrun`` (``torchrun --nproc-per-node 8 bench/gpu_pipeline.py
--fsdp2``; on the CPU ``--device cpu`` with gloo): ``lhspg`` and ``recover`` run with
``shard=fsdp2`` (each rank holds a row-chunk of every parameter, each decoder layer whole only
while it runs), every other stage on every rank as without it; rank 0 prints and writes the
figures (its own peak memory). The step and bandwidth sections are one-process measurements
and are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "bench"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import gpu_check  # noqa: E402  (bench/: the LHSPG step's set-up and the bandwidth section)

#: Model shapes (HF Llama configs). ``8b`` is Llama-3-8B's.
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
               max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
               tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, head_dim=64, vocab_size=32000,
               max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
                 max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def write_config(shape: str, root: Path, dtype: torch.dtype) -> Path:
    """A model directory holding only ``config.json``: lowered with ``meta=True``."""
    from transformers import LlamaConfig

    model_dir = root / f"llama-{shape}"
    config = LlamaConfig(**SHAPES[shape], dtype=dtype)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(model_dir)
    return model_dir


def random_weights(module, dtype: torch.dtype, seed: int = 0) -> None:
    """Data for every weightless parameter: N(0, 0.02) matrices, norms at one, LoRA B small."""
    from lorashear.ir.storage import DataStorage

    generator = torch.Generator().manual_seed(seed)
    for param in module.params.values():
        if param.storage.has_data:
            continue
        shape = param.type.shape
        if len(shape) == 1:
            data = torch.ones(shape, dtype=dtype)
        else:
            std = 1e-3 if ".lora_B." in param.name else 0.02
            data = torch.empty(shape, dtype=dtype).normal_(0, std, generator=generator)
        param.storage = DataStorage(data)


def write_ids(path: Path, vocab: int, tokens: int, seed: int) -> Path:
    """A ``.ids`` corpus (whitespace-separated token ids: no tokenizer needed)."""
    ids = torch.randint(3, vocab, (tokens,), generator=torch.Generator().manual_seed(seed))
    path.write_text(" ".join(map(str, ids.tolist())))
    return path


class Stages:
    """Runs named stages, timing each and reading the peak CUDA memory it reached."""

    def __init__(self, device: torch.device, quiet: bool = False) -> None:
        self.device = device
        self.rows: list[dict] = []
        self.failed = False
        self.quiet = quiet  # a torchrun rank other than 0

    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)

    def run(self, name: str, fn, tokens: int = 0) -> object:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            result = fn()
        except Exception:  # noqa: BLE001  (a report: say what failed and go on)
            self.failed = True
            traceback.print_exc()
            self.rows.append({"stage": name, "error": traceback.format_exc(limit=1).strip()})
            print(f"| {name} | failed | | |", flush=True)  # every rank: say which failed
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None
        row = {"stage": name, "seconds": round(seconds, 2),
               "peak_cuda_gib": None if peak is None else round(peak, 2),
               "tokens_per_s": round(tokens / seconds, 1) if tokens else None}
        self.rows.append(row)
        self.say(f"| {name} | {seconds:.1f} | {'-' if peak is None else f'{peak:.1f}'} | "
                 f"{row['tokens_per_s'] or '-'} |")
        return result


def pipeline(args, device: torch.device, work: Path, stages: Stages):
    from lorashear.frontend.pretrained import lower_pretrained
    from lorashear.ir.core import clone_module
    from lorashear.passes import PassManager
    from lorashear.runtime.hf import save_model_dir

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    precision = "bf16" if cuda else "fp32"
    vocab = SHAPES[args.shape]["vocab_size"]
    b, s, steps = args.batch, args.seq, args.steps
    data = write_ids(work / "train.ids", vocab, max(4 * b * s, 8 * s) * 4, seed=1)
    (work / "spec.yaml").write_text("sources:\n  - path: train.ids\n    name: train\n")
    # under torchrun "cuda" is each rank's own GPU
    place = f"device={'cuda' if cuda and args.fsdp2 else device},precision={precision}"
    train = f"{place},grad-checkpoint={'true' if cuda else 'false'},progress=false"
    if args.fsdp2:
        train += ",shard=fsdp2"

    stages.say("| stage | s | peak CUDA GiB | tokens/s |\n|---|---:|---:|---:|")

    def lower():
        module = lower_pretrained(write_config(args.shape, work, dtype), lora_rank=8, meta=True,
                                  dtype=dtype)
        random_weights(module, dtype)
        return module

    module = stages.run("lower (+ random weights)", lower)
    if module is None:
        return None

    def run(text):
        return lambda: PassManager.parse(text).run(module)

    stages.run("discover", run("discover"))
    stages.run("knowledge", run(f"knowledge{{data={data},batches=2,batch={b},seq-len={s},"
                                f"{place},progress=false}}"), tokens=2 * b * s * 2)
    periods = 2
    stages.run("lhspg{ratio=0.2}", run(
        f"lhspg{{ratio=0.2,periods={periods},steps={steps},data={data},batch={b},seq-len={s},"
        f"attn-share=proportional,{train}}}"), tokens=periods * steps * b * s)
    stages.run("recover", run(
        f"recover{{data={work / 'spec.yaml'},steps={steps},stage1-steps={steps},sampling=static,"
        f"batch={b},seq-len={s},probe-every={steps},probe-windows=1,{train}}}"),
        tokens=steps * b * s)
    before = module.num_parameters()
    dense = clone_module(module)  # the step section times the uncompressed model
    stages.run("compress", run("compress"))
    stages.say(f"parameters {before / 1e6:,.2f} M -> {module.num_parameters() / 1e6:,.2f} M")
    stages.run("emit hf", lambda: save_model_dir(module, work / "hf", merge=True))
    return dense


def step_and_projection(args, device: torch.device, module, results: dict) -> None:
    """A plain LoRA step against the LHSPG step (projection plan over 20% of the groups),
    eager and as a CUDA graph; the projection's bandwidth beside a device copy."""
    from lorashear.kernels import ProjectionPlan
    from lorashear.runtime.executor import IRModel

    cuda = device.type == "cuda"
    model = IRModel(module, device=device, dtype=torch.bfloat16 if cuda else None,
                    keep_dtype={p for p in module.params if ".lora_" in p},
                    gradient_checkpointing=cuda).train()
    optimizer, index, chosen, lambdas = gpu_check.lhspg_step_setup(module, model, device)
    vocab = SHAPES[args.shape]["vocab_size"]
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step(plan):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if plan is not None:
            plan.step(lambdas)

    backends = ["torch"] + (["triton"] if cuda else [])
    plans = {"plain LoRA AdamW": None}
    for backend in backends:
        plans[f"LHSPG, {backend} plan"] = ProjectionPlan(index.weights, chosen, backend=backend)
    if cuda:
        plans["LHSPG, triton plan, CUDA graph"] = ProjectionPlan(index.weights, chosen,
                                                                 backend="triton", cuda_graph=True)
    repeat = 2 if args.shape == "tiny" else 5
    rows = {}
    print("\n| step | ms | vs plain |\n|---|---:|---:|", flush=True)
    for name, plan in plans.items():
        step(plan)
        sync()
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            step(plan)
            sync()
            times.append(time.perf_counter() - started)
        rows[name] = sorted(times)[len(times) // 2]
        print(f"| {name} | {rows[name] * 1e3:.1f} | {rows[name] / rows['plain LoRA AdamW']:.3f}x |",
              flush=True)
    results["step_ms"] = {k: round(v * 1e3, 2) for k, v in rows.items()}

    # the CUDA graph against eager: the same projection from the same weights and factors
    if cuda:
        def tensors():
            return [t for w in index.weights for t in (w.weight, w.lora_A, w.lora_B) if t is not None]

        snapshot = [t.detach().clone() for t in tensors()]
        ProjectionPlan(index.weights, chosen, backend="triton").step(lambdas)
        after_eager = [t.detach().clone() for t in tensors()]
        for t, saved in zip(tensors(), snapshot, strict=True):
            t.data.copy_(saved)
        ProjectionPlan(index.weights, chosen, backend="triton", cuda_graph=True).step(lambdas)
        worst = max(float((t - a).abs().max()) for t, a in zip(tensors(), after_eager, strict=True))
        results["cuda_graph_vs_eager_max_abs"] = worst
        print(f"CUDA graph vs eager projection: max |diff| {worst:.3g}", flush=True)


def projection_bandwidth(device: torch.device, tiny: bool) -> None:
    """The projection on a LLaMA-7B decoder layer against a device copy (gpu_check's section)."""
    gpu_check.bandwidth(device, smoke=tiny)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b",
                        help="model shape: 8b (Llama-3-8B), 1b (TinyLlama), tiny (tests)")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda[:N]")
    parser.add_argument("--batch", type=int, default=None, help="windows per step (default 4; tiny: 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per window (default 2048; tiny: 32)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per stage (default 4; tiny: 2)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--fsdp2", action="store_true",
                        help="shard lhspg/recover with FSDP2 over the torchrun processes")
    args = parser.parse_args(argv)
    tiny = args.shape == "tiny"
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if args.fsdp2 and world < 2:
        parser.error("--fsdp2 shards over the processes of a torchrun launch: run it as "
                     "torchrun --nproc-per-node N bench/gpu_pipeline.py --fsdp2 ...")
    base = 2 if tiny else 4
    args.batch = args.batch or (world * -(-base // world) if args.fsdp2 else base)  # splits over ranks
    args.seq = args.seq or (32 if tiny else 2048)
    args.steps = args.steps or (2 if tiny else 4)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if args.fsdp2 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    stages = Stages(device, quiet=rank > 0)
    stages.say(f"torch {torch.__version__}, {name}; shape {args.shape}, batch {args.batch} x "
               f"{args.seq}, {args.steps} steps per training stage"
               + (f"; lhspg/recover sharded (FSDP2) over {world} processes" if args.fsdp2 else ""))
    results: dict = {"shape": args.shape, "device": name, "batch": args.batch, "seq": args.seq,
                     "steps": args.steps, "fsdp2_processes": world if args.fsdp2 else None}
    with tempfile.TemporaryDirectory(prefix="gpu-pipeline-") as tmp:
        dense = pipeline(args, device, Path(tmp), stages)
        results["stages"] = stages.rows
        if device.type == "cuda":
            results["peak_cuda_gib"] = max((r.get("peak_cuda_gib") or 0) for r in stages.rows)
        for section in (lambda: step_and_projection(args, device, dense, results),
                        lambda: projection_bandwidth(device, tiny)):
            if dense is None or args.fsdp2:  # one-process measurements
                break
            try:
                section()
            except Exception:  # noqa: BLE001
                stages.failed = True
                traceback.print_exc()
    if args.json and rank == 0:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.fsdp2 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 1 if stages.failed else 0


if __name__ == "__main__":
    sys.exit(main())
