"""`lorashear eval`: perplexity, the local multiple-choice task and lm-eval tasks for one model.

    lorashear eval MODEL_DIR --tasks ppl,local-hellaswag,boolq --text FILE [--json OUT]

MODEL_DIR is a transformers model folder (``default`` means the prepared default model). The
local tasks need held-out text (``--text``; ``--tail-chars`` keeps only its end, so the rest of
the file can serve for calibration and recovery). Every other task name goes to lm-eval, which
fetches its data from the Hugging Face hub.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorashear.cli._common import add_common_options
from lorashear.errors import DataError, ModelLoadError

#: Task names handled by lorashear itself; anything else is an lm-eval task.
PERPLEXITY_TASK = "ppl"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``lorashear eval MODEL_DIR --tasks ... [--text FILE] [--json OUT]``."""
    from lorashear.eval.local_task import LOCAL_TASK_NAME

    parser = subparsers.add_parser(
        "eval", help="evaluate a model: perplexity, local multiple choice, lm-eval tasks",
        description="Evaluate a causal LM on held-out local text (perplexity over "
        f"non-overlapping windows, the '{LOCAL_TASK_NAME}' multiple-choice task) and on "
        "lm-eval hub tasks (boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, "
        "openbookqa) where the hub is reachable.")
    add_common_options(parser)
    parser.add_argument("model_dir", metavar="MODEL_DIR",
                        help="a transformers model folder, or 'default' for SmolLM2-135M")
    parser.add_argument("--tasks", default=f"{PERPLEXITY_TASK},{LOCAL_TASK_NAME}",
                        help="comma-separated tasks (default: %(default)s)")
    parser.add_argument("--text", type=Path, help="held-out text file for the local tasks")
    parser.add_argument("--tail-chars", type=int, default=None,
                        help="use only the last N characters of --text")
    parser.add_argument("--ppl-lengths", default="128,2048",
                        help="perplexity window lengths in tokens (default: %(default)s)")
    parser.add_argument("--max-windows", type=int, default=16,
                        help="perplexity windows per length (default: %(default)s)")
    parser.add_argument("--spread", action="store_true",
                        help="take the perplexity windows evenly spaced over the whole text "
                        "instead of the first ones")
    parser.add_argument("--items", type=int, default=200,
                        help=f"{LOCAL_TASK_NAME} items (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the local task's items")
    parser.add_argument("--local-via-lm-eval", action="store_true",
                        help=f"score {LOCAL_TASK_NAME} through lm-eval instead of our scorer")
    parser.add_argument("--limit", type=int, default=None,
                        help="documents per lm-eval task (default: all)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="lm-eval few-shot count")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto",
                        help="where to run the model: auto (cuda if available, else cpu), cpu, "
                        "cuda, cuda:N (default: %(default)s)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="fp32, or bf16/fp16 on CUDA: the model loads in that dtype "
                        "(default: %(default)s)")
    parser.add_argument("--cache-dir", default=None,
                        help="cache folder for 'default' (default: $LORASHEAR_CACHE or "
                        "~/.cache/lorashear)")
    parser.add_argument("--json", type=Path, default=None, dest="json_out",
                        help="also write the results as JSON to this file")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(run=run_eval)
    return parser


@dataclass
class ResultRow:
    """One line of the result table."""

    task: str
    metric: str
    value: float
    detail: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def load_model(model_dir: str, cache_dir: str | None = None, *, device: Any = None,
               dtype: Any = None) -> tuple[Any, Any, Path]:
    """Load a transformers causal LM and its tokenizer from a folder (or 'default'), in fp32
    (or ``dtype``) on the CPU (or ``device``). A pruned model with per-layer widths that
    lorashear wrote loads through its ``lorashear.ir`` (never its remote code)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir == "default":
        from lorashear.models.default import prepare_default_model

        folder = prepare_default_model(cache_dir)
    else:
        folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"'{folder}' is not a model folder (no config.json)",
                             hint="give a transformers model folder, or 'default'")
    try:
        if _lorashear_only(folder):  # per-layer widths: lorashear's own runtime, no remote code
            from lorashear.runtime.hf import load_pretrained

            model = load_pretrained(folder, device=device, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
            if device is not None and torch.device(device).type != "cpu":
                model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the model in '{folder}': {exc}") from exc
    return model.eval(), tokenizer, folder


def _lorashear_only(folder: Path) -> bool:
    """A directory lorashear wrote whose config names no stock architecture (a pruned model
    with per-layer widths): its ``lorashear.ir`` is what loads it exactly."""
    from lorashear.runtime.hf import IR_FILE

    if not (folder / IR_FILE).is_file():
        return False
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return str(config.get("model_type", "")).startswith("lorashear")


def read_text(path: Path | None, tail_chars: int | None) -> str:
    """The held-out text, or its last ``tail_chars`` characters."""
    if path is None:
        raise DataError("the local tasks need held-out text", hint="pass --text FILE")
    if not path.is_file():
        raise DataError(f"text file '{path}' does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if tail_chars is not None:
        text = text[-tail_chars:]
    if not text.strip():
        raise DataError(f"text file '{path}' is empty")
    return text


def _parse_lengths(spec: str) -> list[int]:
    try:
        lengths = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError as exc:
        raise DataError(f"--ppl-lengths must be integers, got '{spec}'") from exc
    if not lengths or min(lengths) < 2:
        raise DataError(f"--ppl-lengths needs lengths of at least 2 tokens, got '{spec}'")
    return lengths


def evaluate_tasks(model: Any, tokenizer: Any, tasks: list[str], args: argparse.Namespace,
                   text: str | None = None) -> list[ResultRow]:
    """Run every requested task on ``text`` (read from ``--text`` when not given) and return
    the table rows, in the order asked."""
    from lorashear.eval.local_task import LOCAL_TASK_NAME, build_local_task, score_multiple_choice
    from lorashear.eval.perplexity import text_perplexity

    progress = not args.no_progress
    rows: list[ResultRow] = []
    if text is None and (PERPLEXITY_TASK in tasks or LOCAL_TASK_NAME in tasks):
        text = read_text(args.text, args.tail_chars)
    hub_tasks = [task for task in tasks if task not in (PERPLEXITY_TASK, LOCAL_TASK_NAME)]
    for task in tasks:
        started = time.perf_counter()
        if task == PERPLEXITY_TASK:
            for length in _parse_lengths(args.ppl_lengths):
                started = time.perf_counter()
                result = text_perplexity(model, tokenizer, text, window_length=length,
                                         max_windows=args.max_windows, spread=args.spread,
                                         batch_size=max(1, args.batch_size * 128 // length),
                                         progress=progress)
                rows.append(ResultRow(f"ppl@{length}", "ppl", result.ppl,
                                      f"{result.windows} windows x {length} tokens",
                                      time.perf_counter() - started, result.to_dict()))
        elif task == LOCAL_TASK_NAME:
            items = build_local_task(text, n_items=args.items, seed=args.seed)
            if args.local_via_lm_eval:
                from lorashear.eval.harness import run_local_task_with_lm_eval

                metrics = run_local_task_with_lm_eval(model, tokenizer, items,
                                                      batch_size=args.batch_size)
            else:
                metrics = score_multiple_choice(model, tokenizer, items,
                                                batch_size=args.batch_size,
                                                progress=progress).to_dict()
            seconds = time.perf_counter() - started
            for metric in ("acc", "acc_norm"):
                rows.append(ResultRow(task, metric, metrics[metric],
                                      f"{len(items)} items, chance {1 / len(items[0].endings):.2f}",
                                      seconds, metrics))
    if hub_tasks:
        from lorashear.eval.harness import REPORTED_METRICS, run_lm_eval

        started = time.perf_counter()
        results = run_lm_eval(model, tokenizer, hub_tasks, limit=args.limit,
                              num_fewshot=args.num_fewshot, batch_size=args.batch_size)
        seconds = time.perf_counter() - started
        for task, metrics in results.items():
            for metric in REPORTED_METRICS:
                if metric in metrics:
                    rows.append(ResultRow(task, metric, metrics[metric], "lm-eval",
                                          seconds, metrics))
    return rows


def format_table(rows: list[ResultRow]) -> str:
    """A plain-text table: task, metric, value, what was measured, seconds."""
    header = ("task", "metric", "value", "measured on", "seconds")
    lines = [header] + [(row.task, row.metric, f"{row.value:.4f}", row.detail,
                         f"{row.seconds:.1f}") for row in rows]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines)


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from lorashear._atomic import atomic_path

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise DataError("--tasks is empty")
    from lorashear.eval.local_task import LOCAL_TASK_NAME

    # Check the cheap inputs before the model loads (seconds for a real model).
    text = None
    if PERPLEXITY_TASK in tasks or LOCAL_TASK_NAME in tasks:
        text = read_text(args.text, args.tail_chars)
        _parse_lengths(args.ppl_lengths)
    from lorashear.training.runtime import resolve_placement

    placement = resolve_placement("eval", args.device, args.precision)
    started = time.perf_counter()
    model, tokenizer, folder = load_model(args.model_dir, args.cache_dir, device=placement.device,
                                          dtype=placement.dtype)
    load_seconds = time.perf_counter() - started
    rows = evaluate_tasks(model, tokenizer, tasks, args, text)
    print(format_table(rows))
    if args.json_out is not None:
        report = {
            "model": str(folder),
            "text": str(args.text) if args.text else None,
            "tail_chars": args.tail_chars,
            "load_seconds": round(load_seconds, 2),
            "results": [{"task": row.task, "metric": row.metric, "value": row.value,
                         "measured_on": row.detail, "seconds": round(row.seconds, 2),
                         "details": row.extra} for row in rows],
        }
        with atomic_path(args.json_out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    return 0
