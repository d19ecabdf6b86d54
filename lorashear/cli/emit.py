"""`lorashear-emit IN.ir --format {torch,hf} -o OUT`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lorashear.cli._common import add_common_options, run_command
from lorashear.runtime.emit import FORMATS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorashear-emit",
        description="Emit an IR module: 'torch' (a directory that keeps LoRA; reload with "
        "lorashear.load_pretrained), 'hf' (LoRA merged into a Hugging Face checkpoint directory) "
        "or 'onnx' (a .onnx file, or model.onnx inside an existing directory).")
    parser.add_argument("input", metavar="IN.ir", help="IR file to emit")
    parser.add_argument("--format", required=True, choices=FORMATS, help="output format")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory (torch, hf) or .onnx file (onnx)")
    parser.add_argument("--accept-changed-weights", action="store_true",
                        help="run even if a weights file the IR reads was rewritten since the IR "
                        "was written (its fingerprint differs): the new weights are used")
    add_common_options(parser)
    return parser


def _run(args: argparse.Namespace) -> int:
    from lorashear.ir.fileformat import load_ir
    from lorashear.runtime.emit import emit

    module = load_ir(args.input, accept_changed_weights=args.accept_changed_weights)
    out = emit(module, args.format, args.output)
    print(f"emitted {args.input} as {args.format} -> {out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("lorashear-emit", build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
