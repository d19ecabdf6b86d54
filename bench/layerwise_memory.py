"""Peak RSS of whole-model against layer-wise calibration: ``saliency{metric=wanda}`` on a
random-weight Llama of the TinyLlama-1.1B shape (hidden 2048, 22 layers, MLP 5632, 32 query /
4 KV heads, vocab 32000), fp32 weights in one safetensors file per layer.

    PYTHONPATH=. python3 bench/layerwise_memory.py [--dir DIR] [--batch 2 --seq-len 128]

The weights are written once (one tensor at a time, never the whole model in memory), lowered
and discovered in a subprocess and saved as a ``.ir`` that references them; then each variant
runs in a fresh subprocess that loads the ``.ir`` and scores, and reports its own
``ru_maxrss``. Both variants' scores are compared (they must agree within 1e-5 relative).
Figures go to bench/RESULTS.md by hand.
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

SHAPE = {"hidden_size": 2048, "num_hidden_layers": 22, "intermediate_size": 5632,
         "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000}


def write_model(folder: Path, layers: int, shape: dict | None = None) -> None:
    """config.json and a sharded safetensors checkpoint of random weights (std 0.02, norms 1),
    written tensor by tensor from a meta-device skeleton; a Llama of ``shape`` (default
    :data:`SHAPE`) with ``layers`` decoder layers."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**(shape or SHAPE), "num_hidden_layers": layers}, max_position_embeddings=2048,
                         tie_word_embeddings=False, torch_dtype="float32")
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    config.save_pretrained(folder)
    shards: dict[str, dict[str, torch.Size]] = {}
    for name, param in skeleton.state_dict().items():
        shard = f"layer{int(name.split('.')[2]):03d}" if ".layers." in name else "outer"
        shards.setdefault(shard, {})[name] = param.shape
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for shard, shapes in shards.items():
        tensors = {}
        for name, shape in shapes.items():
            tensors[name] = (torch.ones(shape) if "norm" in name
                             else torch.randn(shape, generator=generator) * 0.02)
        file = f"model-{shard}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def prepare(folder: Path) -> None:
    """Lower and discover the model; save ``model.ir`` (weights by reference) and token ids."""
    from lorashear.frontend.pretrained import lower_pretrained
    from lorashear.ir.fileformat import save_ir
    from lorashear.passes import PassManager

    module = lower_pretrained(folder)
    PassManager.parse("discover").run(module)
    save_ir(module, folder / "model.ir")
    ids = torch.randint(0, SHAPE["vocab_size"], (8192,), generator=torch.Generator().manual_seed(1))
    (folder / "tokens.ids").write_text(" ".join(map(str, ids.tolist())))


def score(folder: Path, layerwise: bool, batch: int, seq_len: int) -> dict:
    """One variant in this process: load the ``.ir``, score wanda, report peak RSS and time."""
    from lorashear.ir.fileformat import load_ir
    from lorashear.passes import PassManager

    started = time.perf_counter()
    module = load_ir(folder / "model.ir")
    text = (f'saliency{{metric=wanda,data="{folder / "tokens.ids"}",batches=1,batch={batch},'
            f"seq-len={seq_len},device=cpu,layerwise={'true' if layerwise else 'false'}}}")
    PassManager.parse(text).run(module)
    scores = module.attributes["saliency"].as_dict()
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "seconds": time.perf_counter() - started,
            "scores": {str(f): list(v) for f, v in scores.items()}}


def child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="model folder (default: a new temp dir)")
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"], help="decoder layers")
    parser.add_argument("--batch", type=int, default=2, help="windows in the calibration batch")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--child", choices=("write", "prepare", "whole", "layerwise"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child == "write":
        write_model(args.dir, args.layers)
        print(json.dumps({}))
        return
    if args.child == "prepare":
        prepare(args.dir)
        print(json.dumps({}))
        return
    if args.child in ("whole", "layerwise"):
        print(json.dumps(score(args.dir, args.child == "layerwise", args.batch, args.seq_len)))
        return
    folder = args.dir or Path(tempfile.mkdtemp(prefix="lorashear-layerwise-"))
    folder.mkdir(parents=True, exist_ok=True)
    common = ["--dir", str(folder), "--layers", str(args.layers), "--batch", str(args.batch),
              "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
    if not (folder / "model.safetensors.index.json").is_file():
        child("--child", "write", *common)
    if not (folder / "model.ir").is_file():
        child("--child", "prepare", *common)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**30
    results = {variant: child("--child", variant, *common) for variant in ("whole", "layerwise")}
    worst = 0.0
    for f, values in results["whole"]["scores"].items():
        a, b = torch.tensor(values), torch.tensor(results["layerwise"]["scores"][f])
        worst = max(worst, float(((a - b).abs() / a.abs().clamp_min(1e-30)).max()))
    print(f"model: {folder} ({size:.2f} GiB of fp32 weights), batch {args.batch} x {args.seq_len}, "
          f"{args.threads} threads")
    print("| variant | peak RSS (GiB) | seconds |")
    print("|---|---|---|")
    for variant, r in results.items():
        print(f"| {variant} | {r['peak_rss_gib']:.2f} | {r['seconds']:.1f} |")
    ratio = results["layerwise"]["peak_rss_gib"] / results["whole"]["peak_rss_gib"]
    print(f"layer-wise / whole peak RSS: {ratio:.3f} (target <= 0.333); "
          f"largest relative score difference: {worst:.2e}")


if __name__ == "__main__":
    main()
