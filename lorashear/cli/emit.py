"""`lorashear-emit IN.ir --format {torch,hf,onnx} -o OUT [--no-kv-cache]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lorashear.cli._common import add_common_options, run_command
from lorashear.errors import EmissionError
from lorashear.runtime.emit import FORMATS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorashear-emit",
        description="Emit an IR module: 'torch' (a directory that keeps LoRA; reload with "
        "lorashear.load_pretrained), 'hf' (LoRA merged into a Hugging Face checkpoint directory) "
        "or 'onnx' (a .onnx file, or model.onnx inside an existing directory, with the model's "
        "config and tokenizer beside it). The ONNX model is a decoder with past key values "
        "(inputs input_ids, attention_mask, past_key_values.{i}.key/.value; outputs logits, "
        "present.{i}.key/.value) that ONNX Runtime decodes incrementally; --no-kv-cache writes "
        "the scoring-only graph (input_ids, attention_mask -> logits).")
    parser.add_argument("input", metavar="IN.ir", help="IR file to emit")
    parser.add_argument("--format", required=True, choices=FORMATS, help="output format")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory (torch, hf) or .onnx file (onnx)")
    parser.add_argument("--no-kv-cache", dest="kv_cache", action="store_false",
                        help="onnx only: write the scoring-only graph (input_ids, attention_mask "
                        "-> logits) instead of the decoder with past key values")
    parser.add_argument("--accept-changed-weights", action="store_true",
                        help="run even if a weights file the IR reads was rewritten since the IR "
                        "was written (its fingerprint differs): the new weights are used")
    add_common_options(parser)
    return parser


def _run(args: argparse.Namespace) -> int:
    from lorashear.ir.fileformat import load_ir
    from lorashear.runtime.emit import emit

    if not args.kv_cache and args.format != "onnx":
        raise EmissionError("--no-kv-cache applies to --format onnx only (torch and hf "
                            "directories keep the plain graph; generate() adds the cache when "
                            "it runs)")
    module = load_ir(args.input, accept_changed_weights=args.accept_changed_weights)
    out = emit(module, args.format, args.output, kv_cache=args.kv_cache)
    print(f"emitted {args.input} as {args.format} -> {out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("lorashear-emit", build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
