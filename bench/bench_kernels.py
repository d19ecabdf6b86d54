"""Achieved bandwidth of the LHSPG group projection: fused Triton kernel vs torch reference.

Builds one LLaMA-7B-like decoder layer (hidden 4096, 32 heads of 128, MLP 11008, LoRA on all
seven projections), chooses a fraction of every group family (KV heads, MLP channels, hidden
channels), and times ``project_groups`` per weight and for the whole layer. The projection is
memory-bound, so the table reports GB/s over the bytes the fused design must move (see
``lorashear/kernels/group_projection_triton.py``): 3 bytes-of-W per chosen element, one more per
element in two chosen groups, plus the LoRA factors and group ids. Both backends are rated over
the same byte count, so their GB/s compare directly; a plain device copy gives the roofline.

Usage (from the repository root, with lorashear installed or ``PYTHONPATH=.``)::

    python3 bench/bench_kernels.py                    # CUDA: Triton vs torch, bf16, r=8
    python3 bench/bench_kernels.py --dtype fp32 --rank 64 --ratio 0.3

Without CUDA it says so and times the torch reference only, on a layer scaled down by
``--scale`` (0.25 by default on CPU) so that it fits a small machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorashear.kernels import GroupedWeight, project_groups, triton_available

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class LayerShape:
    """The sizes of one LLaMA-style decoder layer (no GQA: one KV head per query head)."""

    hidden: int
    heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def llama_7b(cls, scale: float) -> LayerShape:
        heads = max(1, round(32 * scale))
        return cls(hidden=heads * 128, heads=heads, head_dim=128,
                   intermediate=max(1, round(11008 * scale)))


@dataclass(frozen=True)
class BenchWeight:
    """One weight to time, with the bytes the fused kernel must move for it."""

    name: str
    grouped: GroupedWeight
    useful_bytes: int


def _group_ids(shape: LayerShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Global group ids of the three families: heads first, then MLP channels, then hidden."""
    head_rows = torch.arange(shape.heads, dtype=torch.int32).repeat_interleave(shape.head_dim)
    mlp = shape.heads + torch.arange(shape.intermediate, dtype=torch.int32)
    hidden = shape.heads + shape.intermediate + torch.arange(shape.hidden, dtype=torch.int32)
    return head_rows, mlp, hidden, shape.heads + shape.intermediate + shape.hidden


def _choose(num_groups: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(num_groups, generator=generator) < ratio


def _useful_bytes(grouped: GroupedWeight, chosen: torch.Tensor) -> int:
    """Bytes of the fused design for this weight (its module docstring derives them)."""
    row_group, col_group = grouped.row_group.cpu().long(), grouped.col_group.cpu().long()
    rows = int(((row_group >= 0) & chosen.cpu()[row_group.clamp(min=0)]).sum())
    cols = int(((col_group >= 0) & chosen.cpu()[col_group.clamp(min=0)]).sum())
    out_features, in_features = grouped.weight.shape
    if rows == 0 and cols == 0:
        return 0
    chosen_elements = rows * in_features + cols * out_features - rows * cols
    both = rows * cols
    itemsize = grouped.weight.element_size()
    lora = 0
    if grouped.lora_B is not None and grouped.lora_A is not None:
        lora = 2 * (grouped.lora_B.numel() + grouped.lora_A.numel()) * grouped.lora_B.element_size()
    ids = 3 * 4 * (out_features + in_features)
    return itemsize * (3 * chosen_elements + both) + lora + ids


def build_layer(shape: LayerShape, *, dtype: torch.dtype, rank: int, ratio: float,
                device: torch.device, seed: int = 0
                ) -> tuple[list[BenchWeight], torch.Tensor, int]:
    """The seven projections of one layer with LoRA, and a chosen mask over all groups."""
    generator = torch.Generator().manual_seed(seed)
    head_rows, mlp, hidden, num_groups = _group_ids(shape)
    layouts = [("q_proj", head_rows, hidden), ("k_proj", head_rows, hidden),
               ("v_proj", head_rows, hidden), ("o_proj", hidden, head_rows),
               ("gate_proj", mlp, hidden), ("up_proj", mlp, hidden), ("down_proj", hidden, mlp)]
    chosen = _choose(num_groups, ratio, generator)
    weights = []
    for name, row_group, col_group in layouts:
        out_features, in_features = row_group.numel(), col_group.numel()
        weight = (torch.randn(out_features, in_features, generator=generator) * 0.02)
        lora_b = torch.randn(out_features, rank, generator=generator) * 0.01
        lora_a = torch.randn(rank, in_features, generator=generator) * 0.01
        grouped = GroupedWeight(weight.to(device, dtype), row_group.to(device),
                                col_group.to(device), lora_b.to(device, dtype),
                                lora_a.to(device, dtype), lora_scale=2.0)
        weights.append(BenchWeight(name, grouped, _useful_bytes(grouped, chosen)))
    return weights, chosen.to(device), num_groups


def _time(run: Callable[[], object], restore: Callable[[], None], device: torch.device,
          repeat: int) -> float:
    """Median seconds of ``run``; ``restore`` resets the in-place inputs outside the timing."""
    samples = []
    for attempt in range(repeat + 1):
        restore()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end) / 1e3
        else:
            started = time.perf_counter()
            run()
            elapsed = time.perf_counter() - started
        if attempt:  # the first run compiles (Triton) or warms the allocator
            samples.append(elapsed)
    return sorted(samples)[len(samples) // 2]


def _time_projection(weights: list[GroupedWeight], chosen: torch.Tensor, backend: str,
                     device: torch.device, repeat: int) -> float:
    originals = [(g.weight.clone(), g.lora_B.clone(), g.lora_A.clone()) for g in weights]

    def restore() -> None:
        for grouped, (weight, lora_b, lora_a) in zip(weights, originals, strict=True):
            grouped.weight.copy_(weight)
            grouped.lora_B.copy_(lora_b)
            grouped.lora_A.copy_(lora_a)

    lambdas = torch.full(chosen.shape, 1e-3, device=device)
    return _time(lambda: project_groups(weights, chosen, lambdas, eps=0.0, backend=backend),
                 restore, device, repeat)


def _copy_bandwidth(device: torch.device, dtype: torch.dtype, repeat: int) -> float:
    """GB/s of a plain device copy of a 4096 x 11008 tensor: the roofline to compare with."""
    source = torch.empty(4096, 11008, dtype=dtype, device=device)
    target = torch.empty_like(source)
    seconds = _time(lambda: target.copy_(source), lambda: None, device, repeat)
    return 2 * source.numel() * source.element_size() / seconds / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--ratio", type=float, default=0.1,
                        help="fraction of every group family chosen (default 0.1)")
    parser.add_argument("--scale", type=float, default=None,
                        help="layer size relative to LLaMA-7B (default 1 on CUDA, 0.25 on CPU)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed runs per entry (default 20 on CUDA, 2 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    scale = args.scale if args.scale is not None else (1.0 if on_cuda else 0.25)
    repeat = args.repeat if args.repeat is not None else (20 if on_cuda else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    backends = ["torch"]
    if on_cuda and triton_available():
        backends.append("triton")
    elif on_cuda:
        print("Triton is not installed (pip install 'lorashear[gpu]'): torch reference only.")
    else:
        print("The fused Triton kernel needs CUDA; timing the torch reference only "
              f"(scale {scale:g} of a LLaMA-7B layer, {torch.get_num_threads()} threads).")

    shape = LayerShape.llama_7b(scale)
    weights, chosen, num_groups = build_layer(shape, dtype=dtype, rank=args.rank,
                                              ratio=args.ratio, device=device)
    print(f"layer: hidden {shape.hidden}, heads {shape.heads}x{shape.head_dim}, "
          f"MLP {shape.intermediate}; {num_groups} groups, {int(chosen.sum())} chosen "
          f"({args.ratio:.0%} per family); {args.dtype}, LoRA r={args.rank}; device {device}")
    if on_cuda:
        print(f"device copy roofline: {_copy_bandwidth(device, dtype, repeat):,.0f} GB/s")

    header = f"{'weight':<12}{'shape':>14}{'MB moved':>10}"
    for backend in backends:
        header += f"{backend + ' ms':>12}{backend + ' GB/s':>13}"
    if len(backends) == 2:
        header += f"{'speed-up':>10}"
    print(header)
    print("-" * len(header))
    entries = [(bench.name, [bench.grouped], bench.useful_bytes,
                "x".join(map(str, bench.grouped.weight.shape))) for bench in weights]
    entries.append(("layer", [bench.grouped for bench in weights],
                    sum(bench.useful_bytes for bench in weights), f"{len(weights)} weights"))
    for name, grouped_weights, useful_bytes, shape_text in entries:
        line = f"{name:<12}{shape_text:>14}{useful_bytes / 1e6:>10.1f}"
        seconds = {}
        for backend in backends:
            seconds[backend] = _time_projection(grouped_weights, chosen, backend, device, repeat)
            line += (f"{seconds[backend] * 1e3:>12.3f}"
                     f"{useful_bytes / seconds[backend] / 1e9:>13.2f}")
        if len(backends) == 2:
            line += f"{seconds['torch'] / seconds['triton']:>9.1f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
