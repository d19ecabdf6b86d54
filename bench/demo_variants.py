"""`make demo`'s passes with other `lhspg` options, at the demo's quick budget.

    python3 bench/demo_variants.py "metric=obs,batches=32,reconstruct=true" [--mix]

runs ``discover, knowledge, lhspg{...the demo's options..., EXTRA}, recover, compress`` on
SmolLM2-135M-Instruct with a fresh LoRA (r=8), exactly as ``tools/demo.py`` sets them up, and
prints held-out perplexity per source (8 windows of 128 tokens) and the pipeline's seconds.
``lhspg`` trains on Austen's train slice (the demo before 2026-12-05), or with ``--mix`` on the
YAML spec of the three sources that ``recover`` uses (the demo since). ``bench/RESULTS.md``,
"The demo's quick budget", holds the figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extra", nargs="?", default="", help="more lhspg options, e.g. metric=obs")
    parser.add_argument("--mix", action="store_true", help="lhspg trains on the three sources")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from demo import BUDGETS, SOURCES
    from transformers import AutoTokenizer

    from lorashear.data.cache import text_dir
    from lorashear.data.sources import fetch_sources
    from lorashear.eval.perplexity import text_perplexity
    from lorashear.frontend.pretrained import lower_pretrained
    from lorashear.ir.core import clone_module
    from lorashear.ir.fileformat import save_ir
    from lorashear.models.default import prepare_default_model
    from lorashear.passes import PassManager
    from lorashear.runtime.executor import emit_torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b = BUDGETS["quick"]
    model_dir = prepare_default_model()
    fetch_sources(list(SOURCES))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = Path(tempfile.mkdtemp(prefix="demo-variant-"))
    train_file = out / "train-slice.txt"
    train_file.write_text((text_dir() / "austen" / "train.txt").read_text()[:200_000])
    spec = out / "sources.yaml"
    spec.write_text("sources:\n" + "".join(f"  - cached: {name}\n" for name in SOURCES))
    module = lower_pretrained(model_dir, lora_rank=8)
    save_ir(clone_module(module), out / "dense.ir")
    extra = f",{args.extra}" if args.extra else ""
    pipeline = (f"discover,knowledge{{gamma=0.1,batches={b['knowledge_batches']},data={train_file}}},"
                f"lhspg{{ratio=0.2,periods={b['periods']},steps={b['steps']},batch={b['batch']},"
                f"seq-len={b['seq_len']},lr=1e-3,data={spec if args.mix else train_file}{extra}}},"
                f"recover{{data={spec},steps={b['recover_steps']},stage1-steps={b['stage1_steps']},"
                f"probe-every={b['probe_every']},probe-windows=4,loss=kd,reference={out / 'dense.ir'},"
                f"batch={b['batch']},seq-len={b['seq_len']},lr=1e-3}},compress")
    start = time.perf_counter()
    PassManager.parse(pipeline).run(module)
    seconds = time.perf_counter() - start
    model = emit_torch(module).eval()
    ppl = {name: round(text_perplexity(model, tokenizer, (text_dir() / name / "heldout.txt").read_text(),
                                       window_length=128, max_windows=b["eval_windows"],
                                       progress=False).ppl, 1) for name in SOURCES}
    print(f"lhspg{{...{extra}}}{' on the three sources' if args.mix else ''}: {ppl}, {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
