"""`lorashear generate`: decode text from an emitted model, streaming tokens as they come.

    lorashear generate MODEL_DIR --prompt TEXT [--chat] [--max-new-tokens N]
        [--do-sample [--temperature T] [--top-p P] [--top-k K] [--seed S]] [--num-beams N]
        [--runtime torch|onnx] [--device DEV] [--dtype DTYPE]

MODEL_DIR is a directory written by ``lorashear-emit`` (``torch`` or ``hf``; any local
transformers causal-LM directory works too, lowered on load), ``default`` for the prepared
SmolLM2-135M-Instruct, or for ``--runtime onnx`` an ONNX decoder (``model.onnx`` in MODEL_DIR,
or a ``.onnx`` path) with the tokenizer beside it. Decoding is transformers' own ``generate``
over lorashear's KV-cache graph (PyTorch executor) or ONNX Runtime session.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from lorashear.cli._common import CACHE_HELP, add_common_options
from lorashear.errors import LorashearError, ModelLoadError

RUNTIMES = ("torch", "onnx")
DTYPES = ("float32", "bfloat16", "float16")


class GenerateOptionError(LorashearError):
    """An option of ``lorashear generate`` is out of range or does not fit the others."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``lorashear generate MODEL_DIR --prompt TEXT [...]``."""
    parser = subparsers.add_parser(
        "generate", help="generate text from an emitted (pruned or dense) model",
        description="Decode a continuation of --prompt with transformers' generate (greedy by "
        "default; sampling, beam search) over the model's KV cache, in lorashear's PyTorch "
        "executor or in ONNX Runtime, and stream the new text to stdout as it comes. Timing "
        "goes to stderr.")
    add_common_options(parser)
    parser.add_argument("model_dir", metavar="MODEL_DIR",
                        help="a directory from lorashear-emit (torch or hf) or any local "
                        "transformers causal-LM directory, 'default' for SmolLM2-135M-Instruct, "
                        "or with --runtime onnx a directory holding model.onnx or a .onnx file; "
                        "the tokenizer files must be in the same directory")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt as a user message in the tokenizer's chat template "
                        "(with the assistant's turn opened)")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="stop after this many new tokens (default: %(default)s)")
    parser.add_argument("--do-sample", action="store_true",
                        help="sample the next token instead of taking the most likely one")
    parser.add_argument("--temperature", type=float, default=None,
                        help="with --do-sample: divide the logits by this (> 0; default 1.0)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="with --do-sample: sample from the smallest set of tokens whose "
                        "probability reaches this (0 < P <= 1; default 1.0)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="with --do-sample: sample from the K most likely tokens (>= 1)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of torch's generator before decoding (sampling repeats with it)")
    parser.add_argument("--num-beams", type=int, default=1,
                        help="beam search over this many beams (default: %(default)s, no beams; "
                        "with beams the text is printed at the end, not streamed)")
    parser.add_argument("--runtime", choices=RUNTIMES, default=None,
                        help="run the model in lorashear's PyTorch executor or in ONNX Runtime "
                        "(default: onnx for a .onnx path, torch otherwise)")
    parser.add_argument("--device", default="cpu",
                        help="torch device (cpu, cuda, cuda:1; default: %(default)s); with "
                        "--runtime onnx, cuda selects ONNX Runtime's CUDA provider")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="torch runtime: run in this dtype (default: the weights' own)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch and ONNX Runtime (default: torch's default)")
    parser.add_argument("--cache-dir", default=None, help=CACHE_HELP + ", for 'default'")
    parser.set_defaults(run=run_generate)
    return parser


def check_options(args: argparse.Namespace) -> str:
    """Raise :class:`GenerateOptionError` for options out of range or at odds; returns the
    runtime to use."""
    if args.max_new_tokens < 1:
        raise GenerateOptionError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    if args.num_beams < 1:
        raise GenerateOptionError(f"--num-beams must be at least 1, not {args.num_beams}")
    sampling = {"--temperature": args.temperature, "--top-p": args.top_p, "--top-k": args.top_k}
    given = [name for name, value in sampling.items() if value is not None]
    if given and not args.do_sample:
        raise GenerateOptionError(f"{', '.join(given)} only apply with --do-sample",
                                  hint="add --do-sample, or drop them for greedy decoding")
    if args.temperature is not None and args.temperature <= 0:
        raise GenerateOptionError(f"--temperature must be above 0, not {args.temperature}",
                                  hint="greedy decoding is the default (no --do-sample)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise GenerateOptionError(f"--top-p must be in (0, 1], not {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise GenerateOptionError(f"--top-k must be at least 1, not {args.top_k}")
    if args.threads is not None and args.threads < 1:
        raise GenerateOptionError(f"--threads must be at least 1, not {args.threads}")
    runtime = args.runtime or ("onnx" if args.model_dir.endswith(".onnx") else "torch")
    if runtime == "onnx":
        if args.dtype is not None:
            raise GenerateOptionError("--dtype applies to --runtime torch; an ONNX model runs in "
                                      "the dtype it was emitted in")
        if args.model_dir == "default":
            raise GenerateOptionError("'default' is a transformers directory, not an ONNX model",
                                      hint="emit it with lorashear-emit --format onnx first, or "
                                      "use --runtime torch")
    elif args.model_dir.endswith(".onnx"):
        raise GenerateOptionError(f"{args.model_dir} is an ONNX model; the torch runtime loads "
                                  "model directories", hint="use --runtime onnx")
    return runtime


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"no usable tokenizer in {folder}: {str(exc).splitlines()[0]}",
                             hint="copy the source model's tokenizer files (tokenizer.json, "
                             "tokenizer_config.json, ...) into it") from exc


def _onnx_providers(device: str) -> list[str]:
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise GenerateOptionError("--device cuda: this onnxruntime has no CUDA provider",
                                      hint="install onnxruntime-gpu, or use --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise GenerateOptionError(f"--device {device!r} is not one ONNX Runtime runs on here",
                              hint="cpu or cuda")


def load_for_generation(args: argparse.Namespace, runtime: str) -> tuple[Any, Any]:
    """The model (with ``generate``) and its tokenizer, as the options say."""
    import torch

    if runtime == "onnx":
        from lorashear.runtime.onnx_generate import onnx_generator, resolve_onnx_path

        path = resolve_onnx_path(args.model_dir)
        tokenizer = _load_tokenizer(path.parent)
        return onnx_generator(path, providers=_onnx_providers(args.device),
                              threads=args.threads), tokenizer
    from transformers import GenerationConfig

    from lorashear.runtime.generation import generator
    from lorashear.runtime.hf import load_pretrained

    folder = Path(args.model_dir)
    if args.model_dir == "default":
        from lorashear.models.default import prepare_default_model

        folder = prepare_default_model(args.cache_dir)
    if not folder.is_dir():
        raise ModelLoadError(f"model directory {folder} does not exist",
                             hint="give a directory from lorashear-emit, or 'default'")
    tokenizer = _load_tokenizer(folder)
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise GenerateOptionError(f"--device {args.device!r} is not a torch device") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerateOptionError(f"--device {args.device}: torch sees no CUDA device here",
                                  hint="use --device cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_pretrained(folder, device=device, dtype=dtype)
    generation = GenerationConfig.from_pretrained(folder) \
        if (folder / "generation_config.json").is_file() else None
    return generator(model, generation_config=generation), tokenizer


def prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> Any:
    """The prompt's token ids ``[1, S]``: as a chat's user turn, or the text as it is."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise GenerateOptionError("--chat: the tokenizer has no chat template",
                                      hint="drop --chat to continue the prompt as plain text")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise GenerateOptionError("--prompt is empty after tokenization")
    return ids


def run_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    runtime = check_options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_for_generation(args, runtime)
    ids = prompt_ids(tokenizer, args.prompt, args.chat)
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    options: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                   num_beams=args.num_beams, eos_token_id=eos, pad_token_id=pad)
    if args.do_sample:
        options.update(temperature=args.temperature or 1.0, top_p=args.top_p or 1.0,
                       top_k=args.top_k or 0)
    else:  # the model's generation_config may ask for sampling: the command says greedy
        options.update(temperature=None, top_p=None, top_k=None)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) \
        if args.num_beams == 1 else None
    if args.seed is not None:
        torch.manual_seed(args.seed)
    device = model.device
    start = time.perf_counter()
    out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                         streamer=streamer, **options)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    if streamer is None:
        print(tokenizer.decode(new, skip_special_tokens=True), flush=True)
    print(f"{len(new)} new tokens in {seconds:.2f} s ({len(new) / seconds:.1f} tokens/s, "
          f"{runtime} runtime)", file=sys.stderr)
    return 0
