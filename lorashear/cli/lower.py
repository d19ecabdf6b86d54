"""`lorashear-lower MODEL_DIR [--adapter DIR | --lora-rank R] [--meta] -o OUT.ir`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from lorashear.cli._common import add_common_options, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorashear-lower",
        description="Lower a local Hugging Face causal-LM directory (config.json + safetensors), "
        "optionally with a peft LoRA adapter or fresh LoRA adapters, into a lorashear .ir file. "
        "Weights are referenced, never copied.")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face model directory")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.ir", help="IR file to write")
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--adapter", metavar="DIR", help="peft LoRA adapter directory to lower with the model")
    lora.add_argument("--lora-rank", type=int, metavar="R",
                      help="insert fresh LoRA adapters of rank R (B = 0, so outputs are unchanged)")
    parser.add_argument("--lora-alpha", type=float, metavar="A",
                        help="LoRA alpha for --lora-rank (default: 2*R; scaling = alpha/R)")
    parser.add_argument("--lora-targets", metavar="NAMES",
                        help="comma-separated module names for --lora-rank "
                        "(default: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, metavar="P",
                        help="LoRA dropout for --lora-rank (default: 0)")
    parser.add_argument("--meta", action="store_true",
                        help="lower the architecture only: no weights are read or needed")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="parameter dtype of the IR (default: float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of fresh LoRA initialisation (default: 0)")
    parser.add_argument("--no-verify", action="store_true", help="skip verifying the lowered IR")
    parser.add_argument("--trace-all-layers", action="store_true",
                        help="trace every decoder layer instead of two stamped over the rest "
                        "(slower; the same IR, kept as the reference path)")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="lower weights holding NaN or Inf instead of refusing them (and skip "
                        "reading every weight to look for them)")
    add_common_options(parser)
    return parser


def _run(args: argparse.Namespace) -> int:
    import torch

    from lorashear.frontend.pretrained import lower_any
    from lorashear.ir.fileformat import save_ir
    from lorashear.ir.verifier import verify

    if (args.lora_alpha is not None or args.lora_targets) and args.lora_rank is None:
        from lorashear.errors import ModelLoadError
        raise ModelLoadError("--lora-alpha and --lora-targets need --lora-rank")
    start = time.perf_counter()
    module = lower_any(args.model_dir, adapter=args.adapter, lora_rank=args.lora_rank,
                       lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                       lora_targets=args.lora_targets.split(",") if args.lora_targets else None,
                       meta=args.meta, dtype=getattr(torch, args.dtype), seed=args.seed,
                       trace_all_layers=args.trace_all_layers, allow_nonfinite=args.allow_nonfinite)
    if not args.no_verify:
        verify(module)
    save_ir(module, args.output)
    lora = sum(op.kind == "lora_linear" for op in module.graph.ops)
    print(f"lowered {args.model_dir} -> {args.output}: {len(module.graph.ops)} ops, "
          f"{len(module.params)} params ({module.num_parameters():,} weights), {lora} LoRA "
          f"adapters, {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("lorashear-lower", build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
