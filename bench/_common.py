"""Helpers the benchmark scripts share: timestamped progress, machine facts, token-id slices
of the cached text sources, held-out perplexity, prefill speed and one-shot pipeline text.

Not a benchmark itself (``run_all.py`` runs ``bench_*.py`` only). The scripts import it as a
sibling module: Python puts a script's own folder first on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

OUT_DIR = Path(__file__).parent / "out"
_START = time.perf_counter()


def log(tag: str, message: str) -> None:
    """One progress line: wall-clock time, seconds since the script started, the message."""
    elapsed = time.perf_counter() - _START
    print(f"[{tag} {time.strftime('%H:%M:%S')} +{elapsed:5.0f}s] {message}", flush=True)


def machine_info() -> dict[str, str | int]:
    """Date, CPU model, logical cores, threads used and library versions, for a table header."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "cores": os.cpu_count() or 0,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def set_threads() -> int:
    """Use ``BENCH_THREADS`` threads (default 2, the cores this machine lends a benchmark)."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    return torch.get_num_threads()


def source_text(name: str, split: str, chars: int | None = None) -> str:
    """The cached text of a source's split (``lorashear data fetch`` puts it there), or its
    first ``chars`` characters."""
    from lorashear.data.cache import text_dir
    from lorashear.data.sources import fetch_sources

    path = text_dir() / name / f"{split}.txt"
    if not path.is_file():
        fetch_sources([name])
    with path.open(encoding="utf-8") as handle:
        return handle.read(chars) if chars else handle.read()


def token_ids(tokenizer, text: str, min_tokens: int | None = None) -> list[int]:
    """Token ids of ``text`` without special tokens (the perplexity protocol's tokenisation)."""
    from lorashear.eval.perplexity import tokenize_text

    return tokenize_text(tokenizer, text, min_tokens)


def write_ids(path: Path, ids: Iterable[int]) -> Path:
    """A ``.ids`` file (whitespace-separated token ids): every pass reads it without a tokenizer,
    so all methods see exactly the same tokens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(map(str, ids)) + "\n")
    return path


def interleave(streams: Mapping[str, list[int]], block: int) -> list[int]:
    """Round-robin blocks of ``block`` tokens from each stream until the shortest runs out:
    one calibration/training stream that holds every source in equal shares."""
    count = min(len(ids) for ids in streams.values()) // block
    mixed: list[int] = []
    for i in range(count):
        for ids in streams.values():
            mixed.extend(ids[i * block:(i + 1) * block])
    return mixed


def held_out_ppl(model, heldout: Mapping[str, list[int]], *, window: int, windows: int) -> dict[str, float]:
    """Perplexity per source on the first ``windows`` windows of ``window`` held-out tokens."""
    from lorashear.eval.perplexity import perplexity

    return {name: perplexity(model, ids, window_length=window, max_windows=windows,
                             progress=False).ppl for name, ids in heldout.items()}


def prefill_tokens_per_second(run: Callable[[torch.Tensor], object], batch: int, seq: int,
                              vocab: int, repeats: int = 5) -> float:
    """Tokens per second of ``run`` on a random ``batch x seq`` prompt: the median of
    ``repeats`` timed runs after one warm-up (a mean of two once timed the dense model's
    batch of 8 slower than its batch of 1)."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    seconds = []
    with torch.no_grad():
        run(ids)
        for _ in range(repeats):
            start = time.perf_counter()
            run(ids)
            seconds.append(time.perf_counter() - start)
    return batch * seq / statistics.median(seconds)


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of a runnable model without its LoRA factors (tied weights counted once)."""
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)


def add_smollm2_arguments(parser) -> None:
    """``--model``, ``--train`` and ``--heldout`` of the SmolLM2 one-shot benchmarks: the converted
    default model and Austen's splits in the lorashear cache (``make model``, ``make data``)."""
    cache = Path("~/.cache/lorashear").expanduser()
    parser.add_argument("--model", default=str(cache / "models/smollm2-135m-instruct"))
    parser.add_argument("--train", default=str(cache / "text/austen/train.txt"))
    parser.add_argument("--heldout", default=str(cache / "text/austen/heldout.txt"))


def one_shot_pipeline(metric: str, ratio: float, data: str | Path, *, kinds: str = "attn,mlp",
                      scope: str = "per-layer", seed: int = 0, calibration: str = "",
                      attn_share: float | str | None = None) -> str:
    """Pipeline text of a one-shot ``prune`` with ``metric`` calibrated on ``data``."""
    extra = f",{calibration}" if calibration else ""
    extra += f",attn-share={attn_share}" if attn_share is not None else ""
    return (f'prune{{ratio={ratio},metric={metric},seed={seed},scope={scope},kinds={kinds},'
            f'data="{data}"{extra}}}')


def save_rows(rows: list[dict], args, header: str = "model") -> None:
    """Print ``rows`` (``what``, ``ppl``) as a markdown table and write them with ``args`` to
    ``bench/out/{args.out}``: the output of the SmolLM2 one-shot scripts."""
    print(f"\n| {header} | held-out ppl |\n|---|---:|")
    for row in rows:
        print(f"| {row['what']} | {row['ppl']:.1f} |")
    out = OUT_DIR / args.out
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


#: The small ablations' setup: training sources, eval sources, held-out windows x tokens.
SMALL_SOURCES = ("austen", "web", "tdavid", "python-docs")
SMALL_EVAL_SOURCES = ("austen", "web")
SMALL_EVAL_WINDOWS, SMALL_EVAL_WINDOW = 16, 128
SMALL_EVAL = f"{SMALL_EVAL_WINDOWS}x{SMALL_EVAL_WINDOW} tokens per source"


def small_held_out_ppl(model, heldout: Mapping[str, list[int]]) -> dict[str, float]:
    """:func:`held_out_ppl` on the small ablations' held-out windows."""
    return held_out_ppl(model, heldout, window=SMALL_EVAL_WINDOW, windows=SMALL_EVAL_WINDOWS)


def adapt_lora(module, data: Path, steps: int, batch: int, seq: int, options: str = "") -> None:
    """Train ``module``'s LoRA ``steps`` steps on ``data`` in place (a LoRA-tuned model, as a
    user brings it), with ``recover``'s data order under seed 100, apart from the benchmarks'
    recovery seeds 0 and 1; ``options`` adds ``recover`` options (``sampling=static,...``)."""
    from lorashear.passes import PassManager

    extra = f",{options}" if options else ""
    PassManager.parse(f"recover{{data={data},steps={steps},stage1-steps={steps},lr=0.001,batch={batch},"
                      f"seq-len={seq},probe-every={steps},seed=100,progress=false{extra}}}").run(module)
    module.attributes.pop("recover-log", None)  # the adaptation's, not a method's


def smollm2_with_mix(work: Path, seq: int, adapt: int = 0, batch: int = 2):
    """The setup of the small ablations: SmolLM2-135M-Instruct lowered with a fresh LoRA r=8 and
    discovered, the held-out token ids of ``SMALL_EVAL_SOURCES`` (``SMALL_EVAL_WINDOWS`` windows of
    ``SMALL_EVAL_WINDOW``), and a token-id file under ``work`` that interleaves the training text
    of ``SMALL_SOURCES`` in ``seq``-token blocks. With ``adapt``, the LoRA first trains that many
    steps of ``batch`` windows on the mix (:func:`adapt_lora`).
    Returns ``(module, heldout, mix_path)``; :func:`small_held_out_ppl` evaluates on ``heldout``."""
    from transformers import AutoTokenizer

    from lorashear.frontend.pretrained import lower_pretrained
    from lorashear.models.default import prepare_default_model
    from lorashear.passes import PassManager

    model_dir = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    need = SMALL_EVAL_WINDOWS * SMALL_EVAL_WINDOW
    heldout = {s: token_ids(tokenizer, source_text(s, "heldout"), need)[:need] for s in SMALL_EVAL_SOURCES}
    train = {s: token_ids(tokenizer, source_text(s, "train", 300_000)) for s in SMALL_SOURCES}
    mix = write_ids(work / "mix.ids", interleave(train, seq))
    base = lower_pretrained(model_dir, lora_rank=8)
    PassManager.parse("discover").run(base)
    if adapt:
        adapt_lora(base, mix, adapt, batch, seq)
    return base, heldout, mix
