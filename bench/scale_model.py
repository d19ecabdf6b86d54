"""A measured memory and time model of the pipeline on the CPU (issue #21 item 6): each stage's
peak RSS, wall and CPU seconds on random-weight Llama shapes at three sizes, fitted per stage
as ``a + b * parameters`` and extrapolated to the Llama-3-8B and Llama-3-70B shapes.

    PYTHONPATH=. python3 bench/scale_model.py [--sizes 135m,360m,1.1b] [--threads 2] [--dir DIR]

Each stage runs in its own subprocess on the model saved after the one before it (so its peak
RSS is its own ``ru_maxrss``): ``lower + discover`` (fp32 weights by reference, LoRA r=8 on the
seven projections), ``saliency{metric=wanda}``, ``knowledge``, ``lhspg`` (one period of
``--steps`` steps), ``recover`` (``--steps`` steps), ``compress``, ``emit hf``. Calibration and
training batches are ``--batch`` x ``--seq-len`` random tokens. CPU seconds (user + system of
the process) are reported beside wall seconds: on cores shared with other work the wall time
says little, the CPU time much more (neither says what a GPU takes). Writes
bench/out/scale_model.json and prints the tables; figures go to bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from layerwise_memory import write_model  # noqa: E402

SHAPES = {  # Llama-architecture shapes of public models, random weights
    "135m": {"hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
             "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152},
    "360m": {"hidden_size": 960, "num_hidden_layers": 32, "intermediate_size": 2560,
             "num_attention_heads": 15, "num_key_value_heads": 5, "vocab_size": 49152},
    "1.1b": {"hidden_size": 2048, "num_hidden_layers": 22, "intermediate_size": 5632,
             "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
}
#: A toy shape for the test that keeps the script from rotting (not in the default sizes).
TINY = {"tiny": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}}
TARGETS = {  # extrapolation targets
    "llama-3-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    "llama-3-70b": {"hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256},
}
STAGES = ("lower + discover", "saliency", "knowledge", "lhspg", "recover", "compress", "emit hf")


def parameters(shape: dict) -> int:
    """Parameters of an untied Llama of ``shape`` (embedding, head, layers, norms)."""
    h, i, layers, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return 2 * v * h + layers * per_layer + h


def stage_text(stage: str, folder: Path, args: argparse.Namespace) -> str:
    data = f'data="{folder / "tokens.ids"}",seq-len={args.seq_len}'
    calibration = f"{data},batches=1,batch={args.batch}"
    return {
        "saliency": f"saliency{{metric=wanda,{calibration}}}",
        "knowledge": f"knowledge{{gamma=0.1,{calibration},progress=false}}",
        "lhspg": f"lhspg{{ratio=0.2,periods=1,steps={args.steps},{data},batch={args.batch},progress=false}}",
        "recover": f"recover{{steps={args.steps},stage1-steps={args.steps},{data},batch={args.batch},"
                   "probe-every=1000,progress=false}",
        "compress": "compress",
    }[stage]


def run_stage(stage: str, folder: Path, args: argparse.Namespace) -> dict:
    """One stage in this process, from the previous stage's ``.ir``; its own peak RSS and times."""
    from lorashear.ir.fileformat import load_ir, save_ir

    torch.set_num_threads(args.threads)
    index = STAGES.index(stage)
    wall, cpu = time.perf_counter(), time.process_time()
    if stage == "lower + discover":
        from lorashear.frontend.pretrained import lower_pretrained
        from lorashear.passes import PassManager

        module = lower_pretrained(folder, lora_rank=8)
        PassManager.parse("discover").run(module)
    elif stage == "emit hf":
        from lorashear.runtime.hf import save_model_dir

        module = load_ir(folder / f"stage{index - 1}.ir")
        save_model_dir(module, folder / "hf", merge=True)
    else:
        from lorashear.passes import PassManager

        module = load_ir(folder / f"stage{index - 1}.ir")
        PassManager.parse(stage_text(stage, folder, args)).run(module)
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    if stage != "emit hf":
        save_ir(module, folder / f"stage{index}.ir")
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "seconds": seconds, "cpu_seconds": cpu_seconds}


def child(*argv: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``."""
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], 1)
    a, b = torch.linalg.lstsq(design, y[:, None]).solution.flatten().tolist()
    return a, b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SHAPES), help=f"shapes to measure ({', '.join(SHAPES)})")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a new temp dir)")
    parser.add_argument("--batch", type=int, default=2, help="windows per batch")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    parser.add_argument("--steps", type=int, default=2, help="lhspg and recover steps")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default bench/out/scale_model.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder = args.dir
        if args.child == "write":
            shape = {**SHAPES, **TINY}[args.size]
            write_model(folder, shape["num_hidden_layers"], shape)
            ids = torch.randint(0, shape["vocab_size"], (8192,), generator=torch.Generator().manual_seed(1))
            (folder / "tokens.ids").write_text(" ".join(map(str, ids.tolist())))
            print(json.dumps({}))
        else:
            print(json.dumps(run_stage(args.child, folder, args)))
        return 0
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SHAPES and s not in TINY]
    if unknown:
        parser.error(f"--sizes: unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    root = args.dir or Path(tempfile.mkdtemp(prefix="lorashear-scale-"))
    common = ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
              "--threads", str(args.threads)]
    results: dict[str, dict] = {}
    for size in sizes:
        folder = root / size
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "tokens.ids").is_file():
            child("--child", "write", "--size", size, "--dir", str(folder), *common)
        results[size] = {"parameters": parameters({**SHAPES, **TINY}[size]), "stages": {}}
        for stage in STAGES:
            r = child("--child", stage, "--dir", str(folder), *common)
            results[size]["stages"][stage] = r
            print(f"{size} {stage}: peak RSS {r['peak_rss_gib']:.2f} GiB, {r['seconds']:.1f} s wall, "
                  f"{r['cpu_seconds']:.1f} s CPU", flush=True)
    model = {}
    for stage in STAGES:
        xs = [results[s]["parameters"] for s in sizes]
        model[stage] = {what: fit(xs, [results[s]["stages"][stage][what] for s in sizes])
                        for what in ("peak_rss_gib", "cpu_seconds")}
    out = args.out or Path(__file__).parent / "out" / "scale_model.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                               "fits": model}, indent=1))
    print(f"\nbatch {args.batch} x {args.seq_len}, {args.steps} steps, {args.threads} threads; "
          "peak RSS GiB / CPU s per stage")
    print("| stage | " + " | ".join(f"{s} ({results[s]['parameters'] / 1e6:.0f}M)" for s in sizes)
          + " | " + " | ".join(f"{t} ({parameters(shape) / 1e9:.1f}B, fitted)" for t, shape in TARGETS.items()) + " |")
    print("|---|" + "---|" * (len(sizes) + len(TARGETS)))
    for stage in STAGES:
        cells = [f"{results[s]['stages'][stage]['peak_rss_gib']:.2f} / {results[s]['stages'][stage]['cpu_seconds']:.0f}"
                 for s in sizes]
        for shape in TARGETS.values():
            n = parameters(shape)
            (ra, rb), (ca, cb) = model[stage]["peak_rss_gib"], model[stage]["cpu_seconds"]
            cells.append(f"{ra + rb * n:.0f} / {ca + cb * n:,.0f}")
        print(f"| {stage} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
