"""The GPU checks of the LHSPG kernels, as one script of a few minutes on one CUDA device.

1. The fused Triton projection against the torch reference on CUDA: the kernel test cases
   (random shapes, group sizes that are not powers of two, fp32/bf16/fp16), plus the maximum
   relative difference on random layers printed here.
2. Achieved memory bandwidth of the projection on a LLaMA-7B decoder layer (bench_kernels.py),
   bf16 and fp32, beside a device-to-device copy.
3. The LHSPG step ratio on the SmolLM2-135M architecture (random weights: no weights travel
   to the GPU machine; the timing does not depend on their values), LoRA r=8: a plain LoRA
   AdamW step, and the same step followed by the projection over 20% of the attention and
   MLP groups, with the Triton and with the torch backend; peak CUDA memory of each.

    PYTHONPATH=. python3 bench/gpu_check.py            # on a CUDA machine
    PYTHONPATH=. python3 bench/gpu_check.py --smoke    # a tiny configuration, CPU allowed

Each section reports and goes on when another fails; the exit code says whether all ran.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
               max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
               rope_theta=100000.0)
TINY = dict(SMOLLM2, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)


def section(title: str) -> None:
    print(f"\n## {title}\n", flush=True)


def kernel_cases(device: torch.device) -> None:
    """The kernel test file, compiled on CUDA, and our own relative-difference read-out."""
    from lorashear.kernels import GroupedWeight, project_groups

    if device.type == "cuda":
        completed = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             str(ROOT / "tests/kernels/triton_cases_group_projection.py")],
            cwd=ROOT, capture_output=True, text=True, timeout=240)
        print(completed.stdout[-1500:], completed.stderr[-1500:], flush=True)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for trial in range(6):
        out_f, in_f, rank = (int(x) for x in torch.randint(33, 700, (3,), generator=generator))
        rank = rank % 24 + 1
        groups = int(torch.randint(3, 40, (1,), generator=generator))
        rows = torch.randint(-1, groups, (out_f,), generator=generator, dtype=torch.int32)
        cols = torch.randint(-1, groups, (in_f,), generator=generator, dtype=torch.int32)
        chosen = torch.rand(groups, generator=generator) < 0.5
        lambdas = torch.rand(groups, generator=generator) * 0.05
        tensors = [torch.randn(out_f, in_f, generator=generator) * 0.02,
                   torch.randn(out_f, rank, generator=generator) * 0.01,
                   torch.randn(rank, in_f, generator=generator) * 0.01]
        results = {}
        for backend in ("torch", "triton"):
            if backend == "triton" and device.type != "cuda":
                continue
            w, b, a = (t.clone().to(device) for t in tensors)
            grouped = GroupedWeight(w, rows.to(device), cols.to(device), b, a, lora_scale=2.0)
            stats = project_groups([grouped], chosen.to(device), lambdas.to(device),
                                   eps=0.0, force=trial % 2 == 1, backend=backend)
            results[backend] = (w, b, a, stats.zeroed.cpu())
        if "triton" in results:
            for ref, got in zip(results["torch"][:3], results["triton"][:3]):
                scale = ref.abs().max().clamp(min=1e-30)
                worst = max(worst, float((ref - got).abs().max() / scale))
            assert torch.equal(results["torch"][3], results["triton"][3]), "zeroed groups differ"
        print(f"case {trial}: W {out_f}x{in_f}, r={rank}, {groups} groups, "
              f"{int(chosen.sum())} chosen", flush=True)
    print(f"max relative difference Triton vs torch reference (fp32, 6 random layers): {worst:.2e}")


def bandwidth(device: torch.device, smoke: bool) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_kernels

    for dtype in ("bf16", "fp32"):
        print(f"\n### {dtype}\n", flush=True)
        bench_kernels.main(["--dtype", dtype] + (["--scale", "0.05", "--repeat", "1"] if smoke else []))
    if device.type != "cuda":
        return
    from lorashear.kernels import ProjectionPlan

    print("\n### one ProjectionPlan step over the whole layer (prepared once, CUDA graph)\n")
    for dtype in ("bf16", "fp32"):
        shape = bench_kernels.LayerShape.llama_7b(1.0)
        weights, chosen, _ = bench_kernels.build_layer(shape, dtype=bench_kernels.DTYPES[dtype],
                                                       rank=8, ratio=0.1, device=device)
        useful = sum(w.useful_bytes for w in weights)
        for backend in ("torch", "triton"):
            plan = ProjectionPlan([w.grouped for w in weights], chosen, backend=backend,
                                  cuda_graph=backend == "triton")
            lambdas = torch.full(chosen.shape, 1e-3, device=device)
            seconds = bench_kernels._time(lambda plan=plan, lambdas=lambdas: plan.step(lambdas),
                                          lambda: None, device, 20)
            print(f"{dtype} {backend:>6}: {seconds * 1e3:.3f} ms, {useful / seconds / 1e9:,.0f} GB/s "
                  f"over {useful / 1e6:.0f} MB", flush=True)
    print(f"\n{torch.cuda.get_device_name(device)}: H200 spec peak HBM3e bandwidth 4,800 GB/s")


def with_random_weights(module):
    """Give every weightless (``--meta``) parameter random data: timing needs no real values."""
    from lorashear.ir.storage import DataStorage
    from lorashear.ir.types import torch_dtype

    generator = torch.Generator().manual_seed(0)
    for param in module.params.values():
        if not param.storage.has_data:
            data = torch.randn(param.type.shape, generator=generator) * 0.02
            param.storage = DataStorage(data.to(torch_dtype(param.type.dtype)))
    return module


def lhspg_step_setup(module, model, device: torch.device):
    """What an LHSPG step needs beside the model: the AdamW optimizer of its trainable
    tensors, the group index of the attention and MLP families, a seeded random fifth of the
    groups chosen, and their shrink strengths."""
    from lorashear.passes.lhspg import build_group_index

    groups = module.attributes["groups"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    index = build_group_index(module, model, groups,
                              [f.id for f in groups.families if f.kind in ("attn", "mlp")])
    chosen = torch.zeros(index.num_groups, dtype=torch.bool)
    chosen[torch.randperm(index.num_groups, generator=torch.Generator().manual_seed(0))
           [: index.num_groups // 5]] = True
    chosen = chosen.to(device)
    return optimizer, index, chosen, torch.full(chosen.shape, 1e-4, device=device)


def step_ratio(device: torch.device, smoke: bool, ir_path: str | None) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorashear.frontend.pretrained import lower_pretrained
    from lorashear.ir.fileformat import load_ir
    from lorashear.kernels import ProjectionPlan, project_groups
    from lorashear.passes import PassManager
    from lorashear.runtime.executor import IRModel

    config = LlamaConfig(**(TINY if smoke else SMOLLM2))
    batch, seq = (2, 32) if smoke else (8, 512)
    if ir_path:
        module = with_random_weights(load_ir(ir_path))
        print(f"loaded {ir_path} (lowered with --meta) and gave it random weights", flush=True)
    else:
        tmp = tempfile.mkdtemp(prefix="gpu-check-")  # the lowered module reads its weights here
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(tmp)
        started = time.perf_counter()
        module = lower_pretrained(tmp, lora_rank=8)
        print(f"lowered in {time.perf_counter() - started:.1f} s", flush=True)
    PassManager.parse("discover").run(module)
    model = IRModel(module, device=device).train()
    optimizer, index, chosen, lambdas = lhspg_step_setup(module, model, device)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)

    plans = {"torch plan": ProjectionPlan(index.weights, chosen, backend="torch")}
    if device.type == "cuda":
        plans["triton plan"] = ProjectionPlan(index.weights, chosen, backend="triton")
        plans["triton plan, CUDA graph"] = ProjectionPlan(index.weights, chosen, backend="triton",
                                                          cuda_graph=True)
    # lhspg{settle=...}: after its groups are zero a period only clears their LoRA rows/columns
    nothing = torch.zeros_like(chosen)
    plans["settle step, torch plan"] = ProjectionPlan(index.weights, nothing, done=chosen,
                                                      backend="torch")
    if device.type == "cuda":
        plans["settle step, triton plan, CUDA graph"] = ProjectionPlan(
            index.weights, nothing, done=chosen, backend="triton", cuda_graph=True)
    projections = {"plain LoRA AdamW": None,
                   "per call, torch": lambda: project_groups(index.weights, chosen, lambdas,
                                                             backend="torch")}
    if device.type == "cuda":
        projections["per call, triton"] = lambda: project_groups(index.weights, chosen, lambdas,
                                                                 backend="triton")
    for name, plan in plans.items():
        projections[name] = lambda plan=plan: plan.step(lambdas)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(project) -> None:
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if project:
            project()

    def timed(project, repeat: int) -> tuple[float, float]:
        step(project)  # warm-up (Triton compiles, the plan captures its graph)
        step(project)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        samples = []
        for _ in range(repeat):
            started = time.perf_counter()
            step(project)
            sync()
            samples.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
        return sorted(samples)[len(samples) // 2], peak

    repeat = 3 if smoke else 15
    results = {name: timed(project, repeat) for name, project in projections.items()}
    plain_s, plain_mb = results["plain LoRA AdamW"]
    print(f"batch {batch}x{seq}, LoRA r=8, {int(chosen.sum())} of {index.num_groups} groups chosen; "
          f"median of {repeat} steps")
    print("| step | ms | vs plain | peak CUDA MB | vs plain |\n|---|---:|---:|---:|---:|")
    for name, (seconds, peak) in results.items():
        label = name if name.startswith("plain") else f"LHSPG, projection {name}"
        print(f"| {label} | {seconds * 1e3:.1f} | {seconds / plain_s:.3f}x | {peak:,.0f} | "
              f"{peak / plain_mb if plain_mb else 0:.3f}x |", flush=True)
    for name, project in projections.items():
        if project is None:
            continue
        project()
        sync()
        started = time.perf_counter()
        for _ in range(repeat):
            project()
        sync()
        print(f"projection alone, {name}: {(time.perf_counter() - started) / repeat * 1e3:.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (for a CPU dry run)")
    parser.add_argument("--ir", help="a .ir lowered with --meta to time instead of lowering here "
                        "(where this machine's torch cannot export the model)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, device {name}", flush=True)
    failed = []
    for title, run in (("Triton kernel vs torch reference", lambda: kernel_cases(device)),
                       ("Projection bandwidth (LLaMA-7B layer, LoRA r=8, 10% chosen)",
                        lambda: bandwidth(device, args.smoke)),
                       ("LHSPG step ratio (SmolLM2-135M shape)", lambda: step_ratio(device, args.smoke, args.ir))):
        section(title)
        started = time.perf_counter()
        try:
            run()
        except Exception:  # report and go on: one failing check must not hide the others
            traceback.print_exc()
            failed.append(title)
        print(f"({time.perf_counter() - started:.0f} s)", flush=True)
    if failed:
        print(f"failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
