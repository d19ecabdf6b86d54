"""Side by side on SmolLM2-135M-Instruct with a LoRA r=8 trained on the sources: lorashear vs
one-shot pruning vs Torch-Pruning vs the dense model, at 20% and 50% of the attention + MLP
weights removed.

Every method starts from the same LoRA-adapted model, the tool's use case: before any pruning
the LoRA trains ``adapt`` steps on the sources (static equal shares; ``BENCH_ADAPT=0`` starts
from a fresh LoRA, as the tables before 2026-11-29 did). That model is the dense row and the
KD teacher; ``bench_kd_teacher.py`` found that KD from the un-adapted base makes the pruned
model worse. Every method sees the same data (token-id files cut once from the cached sources)
and, where it trains, the same number of training tokens after the adaptation:

- lorashear: ``knowledge{gamma=0.1}`` (BENCH_KNOWLEDGE sets gamma, 0 leaves it out; the one-shot rows
  stand for LLM-Pruner / Wanda-sp and have none), then ``lhspg`` (``metric`` from BENCH_LHSPG_METRIC, default ``settle=0.75``; one period at the default
  budget, two at full: ``bench_lhspg_ablation.py`` found fewer periods better at small budgets)
  then ``compress``, then ``recover`` stage 1 (dynamic,
  degradation-weighted sampling over the sources) and ``recover`` stage 2 (``loss=kd`` against
  the unpruned model, offline). Compressing before recovery gives the same function as
  recovering on the masked model and trains a smaller one.
- one-shot ``prune`` with taylor (LLM-Pruner style), wanda (Wanda-sp style), magnitude,
  random, then ``compress``, then the same recovery passes with the LHSPG steps added to
  stage 1 (so the total training tokens are equal); evaluated right after pruning, after as
  many recovery tokens as LHSPG used (the #4 question: LHSPG alone vs one-shot at equal
  tokens), and after the whole budget.
- Torch-Pruning's LLM recipe (``_torch_pruning_worker.py``, its own process, under a timeout) on
  the adapted model with its LoRA merged (a Hugging Face directory lorashear emits), its pruned
  directory lowered by lorashear with a fresh LoRA, then the same recovery as the one-shot
  rows. Where it fails, the row holds the error text.
- the dense model: the base model before adaptation (perplexity only) and the adapted one.

Metrics: held-out perplexity per source (Austen's Persuasion first), the local HellaSwag-style
task on Persuasion, parameters, and prefill tokens/s of the compressed, LoRA-merged model in
PyTorch (lorashear's executor for dense and pruned alike) and ONNX Runtime (lorashear's ONNX
emission), measured for dense, lorashear and one-shot taylor (one-shot rows share shapes).

BENCH_BUDGET=smoke|default|full sets the sizes (smoke only validates the script); BENCH_ADAPT
overrides the adaptation steps; BENCH_RATIOS=0.2, BENCH_METRICS=taylor,random (empty: no one-shot rows) and
BENCH_SKIP=dense,lorashear,torch-pruning narrow a run; BENCH_LHSPG=1x100 sets LHSPG's periods x
steps; BENCH_RECOVER=320x160 recovery's stage-1 x stage-2 steps; BENCH_ATTN_SHARE=0|proportional|auto sets ``attn-share`` of ``lhspg`` and every one-shot
``prune`` alike (default auto, the split the README's table uses; empty: each pass's own default,
which for ``prune`` is proportional); BENCH_LHSPG_METRIC (default wanda, ``lhspg``'s own
default; taylor before 2026-11-29 09:30) the saliency metric of ``lhspg``; BENCH_LHSPG_BATCHES
(default 4, ``lhspg``'s own) its ``batches`` of calibration; BENCH_LHSPG_OPTIONS more options
of ``lhspg`` (e.g. ``damp=0.01``); BENCH_THREADS (default 2).
Issue #24's components, offered to lorashear and the one-shot rows alike: BENCH_RECONSTRUCT=1
(``lhspg{reconstruct=true}``; after each one-shot ``prune`` a ``reconstruct`` against the adapted
model, evaluated as its own row before any training), BENCH_RECONSTRUCT_BIAS=1 (that
``reconstruct`` with ``bias=true``), BENCH_RECONSTRUCT_OPTIONS (more options of that
``reconstruct``, e.g. ``inputs=pruned,damp=0.1``), BENCH_RECOVER_TRAIN=lora|lora+norms|all (``recover``'s
``train=`` in every recovery, default lora) and BENCH_RECOVER_LOSS=kd|kd-hidden (stage 2's
loss, default kd). BENCH_ADAPTED=PATH.ir keeps the adapted model between runs: written
there after the adaptation when missing, read instead of adapting when present (it must come
from the same budget's adaptation; the table's header names the file). BENCH_ONESHOT_TRAIN=0
stops each one-shot method after its untrained rows (pruned, + reconstruct), and
BENCH_LORASHEAR_RECOVER=0 lorashear after its LHSPG row;
BENCH_ONESHOT_FIRST=1 runs the one-shot methods before lorashear at each ratio; BENCH_ONESHOT_BATCHES=N calibrates each one-shot ``prune`` on N batches instead of lhspg's 4 (calibration, not training tokens). Writes bench/out/side_by_side.json and bench/out/side_by_side.md (``bench/update_readme.py`` copies the table into README.md), or
bench/out/{BENCH_NAME}.json/.md: a narrowed run named apart does not replace the full table.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from _common import (
    OUT_DIR,
    adapt_lora,
    held_out_ppl,
    interleave,
    log,
    machine_info,
    parameter_count,
    prefill_tokens_per_second,
    set_threads,
    source_text,
    token_ids,
    write_ids,
)

SOURCES = ("austen", "web", "tdavid", "python-docs")  # austen first: the headline column
RATIOS = (0.2, 0.5)
METRICS = ("taylor", "wanda", "magnitude", "random")
TAG = "side-by-side"
STAGE2 = "+ stage 2 (kd)"  # the row's name whatever stage 2's loss (the table's header says it)
OUT_NAME = os.environ.get("BENCH_NAME", "side_by_side")


@dataclass(frozen=True)
class Budget:
    """Sizes of one run. Training tokens per method = (periods * lhspg_steps + stage1 +
    stage2) * batch * seq_len, after ``adapt`` steps that every method shares."""

    adapt: int
    periods: int
    lhspg_steps: int
    stage1: int
    stage2: int
    batch: int
    seq_len: int
    probe_every: int
    probe_windows: int
    eval_windows: int
    eval_window: int
    task_items: int
    speed_seq: int
    source_chars: int
    tp_timeout_s: int

    @property
    def lhspg_tokens(self) -> int:
        return self.periods * self.lhspg_steps * self.batch * self.seq_len

    @property
    def train_tokens(self) -> int:
        return self.lhspg_tokens + (self.stage1 + self.stage2) * self.batch * self.seq_len


BUDGETS = {
    "smoke": Budget(adapt=1, periods=1, lhspg_steps=1, stage1=1, stage2=1, batch=1, seq_len=32,
                    probe_every=1, probe_windows=1, eval_windows=1, eval_window=32,
                    task_items=2, speed_seq=32, source_chars=20_000, tp_timeout_s=300),
    "default": Budget(adapt=48, periods=1, lhspg_steps=12, stage1=12, stage2=6, batch=2, seq_len=128,
                      probe_every=6, probe_windows=4, eval_windows=4, eval_window=128,
                      task_items=10, speed_seq=128, source_chars=300_000, tp_timeout_s=600),
    "full": Budget(adapt=200, periods=2, lhspg_steps=50, stage1=60, stage2=30, batch=4, seq_len=128,
                   probe_every=20, probe_windows=8, eval_windows=16, eval_window=256,
                   task_items=100, speed_seq=128, source_chars=1_500_000, tp_timeout_s=900),
}
# Rates on 2 otherwise idle cores (README: a LoRA step of 2x128 tokens 2.6 s, executor prefill
# 163 tokens/s), per-evaluation and fixed costs (lowering, ONNX emissions, Torch-Pruning,
# calibrations) from the smoke run scaled to an idle machine. The smoke run itself, on cores
# shared with 3-5 other processes, ran 3-6x slower than this.
TRAIN_TOKENS_PER_S, EVAL_TOKENS_PER_S, EVAL_FIXED_S, FIXED_S = 90.0, 150.0, 10.0, 600.0


def estimate_seconds(b: Budget) -> float:
    """Rough wall time: training tokens (+30% for KD teacher and probes), evaluations, fixed costs."""
    methods = 2 + len(METRICS)  # lorashear, one-shot metrics, Torch-Pruning
    train = len(RATIOS) * methods * b.train_tokens * 1.3
    evals = 2 + len(RATIOS) * (2 * methods + 2)  # + lorashear stage 1, one-shot taylor midway
    task_tokens = b.task_items * 4 * 100
    eval_tokens = len(SOURCES) * b.eval_windows * b.eval_window + task_tokens
    adapt = b.adapt * b.batch * b.seq_len
    return (FIXED_S + (train + adapt) / TRAIN_TOKENS_PER_S
            + evals * (EVAL_FIXED_S + eval_tokens / EVAL_TOKENS_PER_S))


class Bench:
    """State of one run: the shared data, the base module, the rows, the timings."""

    def __init__(self, budget_name: str, budget: Budget, work: Path) -> None:
        self.budget_name, self.budget = budget_name, budget
        self.work = work
        self.rows: list[dict] = []
        self.phases: list[dict] = []
        self.info = machine_info()
        # auto by default: a one-shot run on prune's proportional default once went unnoticed
        share = os.environ.get("BENCH_ATTN_SHARE", "auto")
        self.attn_share = share or None  # a number, proportional or auto; None: the passes' default
        self.lhspg_metric = os.environ.get("BENCH_LHSPG_METRIC", "wanda")  # lhspg's default
        self.lhspg_batches = int(os.environ.get("BENCH_LHSPG_BATCHES", "4"))  # lhspg's default
        self.lhspg_options = os.environ.get("BENCH_LHSPG_OPTIONS", "").strip(",")
        # knowledge{gamma} before lhspg (0: none); lorashear only: the one-shot rows are the peers
        self.knowledge = float(os.environ.get("BENCH_KNOWLEDGE", "0.1"))
        # issue #24's components, offered to every method that prunes or recovers
        self.reconstruct = os.environ.get("BENCH_RECONSTRUCT", "") not in ("", "0")
        self.reconstruct_bias = os.environ.get("BENCH_RECONSTRUCT_BIAS", "") not in ("", "0")
        self.reconstruct_options = os.environ.get("BENCH_RECONSTRUCT_OPTIONS", "").strip(",")
        self.recover_train = os.environ.get("BENCH_RECOVER_TRAIN", "lora")
        self.stage2_loss = os.environ.get("BENCH_RECOVER_LOSS", "kd")

    # --- data ----------------------------------------------------------------------------------
    def prepare(self) -> None:
        from transformers import AutoTokenizer

        from lorashear.eval.local_task import build_local_task
        from lorashear.frontend.pretrained import lower_pretrained
        from lorashear.ir.core import clone_module
        from lorashear.models.default import prepare_default_model
        from lorashear.passes import PassManager

        b = self.budget
        self.adapted_from = None
        with self.phase("data"):
            self.model_dir = prepare_default_model()
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            need = b.eval_windows * b.eval_window
            self.heldout = {s: token_ids(self.tokenizer, source_text(s, "heldout"), need)[:need]
                            for s in SOURCES}
            train = {s: token_ids(self.tokenizer, source_text(s, "train", b.source_chars))
                     for s in SOURCES}
            self.train_files = {s: write_ids(self.work / f"{s}.ids", ids) for s, ids in train.items()}
            self.mix = write_ids(self.work / "mix.ids", interleave(train, b.seq_len))
            self.spec = self.work / "sources.yaml"
            self.spec.write_text("sources:\n" + "".join(
                f"  - name: {s}\n    path: {p}\n" for s, p in self.train_files.items()))
            austen = source_text("austen", "heldout")
            self.items = build_local_task(austen, n_items=b.task_items, seed=0)
            self.token_counts = {s: len(ids) for s, ids in train.items()}
        with self.phase("lower + discover"):
            self.base = lower_pretrained(self.model_dir, lora_rank=8)
            PassManager.parse("discover").run(self.base)
        adapted = Path(os.environ["BENCH_ADAPTED"]) if os.environ.get("BENCH_ADAPTED") else None
        if b.adapt and adapted is not None and adapted.is_file():
            from lorashear.ir.fileformat import load_ir

            with self.phase(f"read the adapted model {adapted}"):
                self.base = load_ir(adapted)
                PassManager.parse("discover").run(self.base)
            self.adapted_from = str(adapted)
        elif b.adapt:
            self.evaluate(self.base, self.add(method="base model", ratio=0.0, stage="fresh LoRA",
                                              train_tokens=0, share_removed=0.0), task=False)
            with self.phase(f"adapt the LoRA ({b.adapt} steps)"):
                adapt_lora(self.base, self.spec, b.adapt, b.batch, b.seq_len,
                           f"sampling=static,probe-windows={b.probe_windows}")
            if adapted is not None:
                from lorashear.ir.fileformat import save_ir

                keep = clone_module(self.base)
                keep.attributes.pop("groups", None)
                save_ir(keep, adapted)
        self.adapted_hf = None  # Torch-Pruning's input, written when it first runs
        with self.phase("reference"):
            self.save_reference()
        mix_windows = len(self.mix.read_text().split()) // b.seq_len
        # lhspg calibrates taylor on min(4, windows // batch) batches of its data: the same here
        batches = int(os.environ.get("BENCH_ONESHOT_BATCHES", "0")) or min(4, max(1, mix_windows // b.batch))
        self.calibration = f"batches={batches},batch={b.batch},seq-len={b.seq_len}"

    def save_reference(self) -> None:
        """The unpruned model (``self.base`` as it is now) as the KD teacher's IR file."""
        from lorashear.ir.core import clone_module
        from lorashear.ir.fileformat import save_ir

        dense = clone_module(self.base)
        dense.attributes.pop("groups", None)
        self.reference = save_ir(dense, self.work / "dense.ir")

    # --- bookkeeping ---------------------------------------------------------------------------
    class _Phase:
        def __init__(self, bench: Bench, name: str) -> None:
            self.bench, self.name = bench, name

        def __enter__(self):
            self.start = time.perf_counter()
            log(TAG, f"{self.name} ...")
            return self

        def __exit__(self, *exc) -> bool:
            seconds = time.perf_counter() - self.start
            self.bench.phases.append({"phase": self.name, "seconds": round(seconds, 1)})
            log(TAG, f"{self.name}: {seconds:.0f} s")
            return False

    def phase(self, name: str) -> Bench._Phase:
        return self._Phase(self, name)

    def evaluate(self, module_or_model, row: dict, task: bool = True) -> dict:
        """Held-out ppl per source, local-task accuracy (with ``task``), parameters: into ``row``."""
        from lorashear.eval.local_task import score_multiple_choice
        from lorashear.runtime.executor import emit_torch

        b = self.budget
        model = emit_torch(module_or_model) if not isinstance(module_or_model, torch.nn.Module) else module_or_model
        model.eval()
        with self.phase(f"eval {row['method']} @{row['ratio']} [{row['stage']}]"):
            row["ppl"] = held_out_ppl(model, self.heldout, window=b.eval_window, windows=b.eval_windows)
            if task:
                row["task_acc"] = score_multiple_choice(model, self.tokenizer, self.items,
                                                        progress=False).acc
            row["parameters"] = parameter_count(model)
        acc = f", task acc {row['task_acc']:.3f}" if task else ""
        log(TAG, "  " + ", ".join(f"{s} {v:.1f}" for s, v in row["ppl"].items())
            + f"{acc}, {row['parameters']:,} params")
        return row

    def add(self, **row) -> dict:
        self.rows.append(row)
        self.save()
        return row

    def save(self) -> None:
        OUT_DIR.mkdir(exist_ok=True)
        data = {"machine": self.info, "budget": self.budget_name, "budget_sizes": asdict(self.budget),
                "train_tokens_per_method": self.budget.train_tokens,
                "lhspg_tokens": self.budget.lhspg_tokens, "sources": list(SOURCES),
                "attn_share": self.attn_share, "lhspg_metric": self.lhspg_metric,
                "lhspg_batches": self.lhspg_batches, "lhspg_options": self.lhspg_options,
                "knowledge_gamma": self.knowledge, "speed_timing": "median of 5 runs",
                "reconstruct": self.reconstruct, "reconstruct_bias": self.reconstruct_bias,
                "reconstruct_options": self.reconstruct_options, "oneshot_calibration": self.calibration,
                "recover_train": self.recover_train, "stage2_loss": self.stage2_loss,
                "adapted_from": getattr(self, "adapted_from", None),
                "source_train_tokens": getattr(self, "token_counts", {}),
                "rows": self.rows, "phases": self.phases}
        (OUT_DIR / f"{OUT_NAME}.json").write_text(json.dumps(data, indent=1))

    # --- pipelines -----------------------------------------------------------------------------
    def recover_text(self, steps: int, stage1: int, kd: bool, seed: int = 0) -> str:
        b = self.budget
        return (f"recover{{data={self.spec},steps={steps},stage1-steps={stage1},"
                f"loss={self.stage2_loss if kd else 'lm'},reference={self.reference},lr=0.001,"
                f"seq-len={b.seq_len},batch={b.batch},probe-every={b.probe_every},"
                f"probe-windows={b.probe_windows},seed={seed},train={self.recover_train},"
                "progress=false}")

    def run_passes(self, module, text: str, label: str) -> dict:
        from lorashear.passes import PassManager

        manager = PassManager.parse(text)
        with self.phase(label):
            manager.run(module)
        return {r.pipeline_text.split("{")[0]: r.statistics for r in manager.records}

    def speed(self, module, row: dict) -> None:
        """Prefill tokens/s at batch 1 and 8 (PyTorch executor, ONNX Runtime) of ``module``
        after merging its LoRA factors into the weights."""
        import onnxruntime as ort

        from lorashear.passes import PassManager
        from lorashear.runtime.executor import emit_torch
        from lorashear.runtime.onnx_emit import emit_onnx

        seq, vocab = self.budget.speed_seq, self.base.attributes["config"].config["vocab_size"]
        with self.phase(f"speed {row['method']} @{row['ratio']}"):
            PassManager.parse("merge-lora").run(module)
            model = emit_torch(module).eval()
            row["pt_tps"] = [prefill_tokens_per_second(lambda ids, m=model: m(ids), n, seq, vocab)
                             for n in (1, 8)]
            del model
            folder = Path(tempfile.mkdtemp(dir=self.work))
            path = emit_onnx(module, folder / "model.onnx")
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            row["ort_tps"] = [prefill_tokens_per_second(
                lambda ids, s=session: s.run(None, {"input_ids": ids.numpy(),
                                                    "attention_mask": torch.ones_like(ids).numpy()}),
                n, seq, vocab) for n in (1, 8)]
            del session
            shutil.rmtree(folder, ignore_errors=True)
        log(TAG, f"  prefill tok/s PyTorch {row['pt_tps'][0]:.0f}/{row['pt_tps'][1]:.0f}, "
                 f"ORT {row['ort_tps'][0]:.0f}/{row['ort_tps'][1]:.0f} (batch 1/8 x {seq})")
        self.save()

    # --- methods -------------------------------------------------------------------------------
    def dense(self) -> None:
        from lorashear.ir.core import clone_module

        row = self.add(method="dense", ratio=0.0, stage="LoRA-adapted" if self.budget.adapt else "-",
                       train_tokens=0, share_removed=0.0)
        try:
            self.evaluate(self.base, row)
            self.speed(clone_module(self.base), row)
        except Exception as exc:  # noqa: BLE001 - one method's failure is a row, not the end
            self.fail(row, exc)

    def lorashear(self, ratio: float) -> None:
        from lorashear.ir.core import clone_module

        b = self.budget
        module = clone_module(self.base)
        method = "lorashear"
        row = self.add(method=method, ratio=ratio, stage="LHSPG", train_tokens=b.lhspg_tokens)
        share = "" if self.attn_share is None else f",attn-share={self.attn_share}"
        knowledge = (f"knowledge{{gamma={self.knowledge:g},data={self.mix},progress=false}},"
                     if self.knowledge else "")
        try:
            stats = self.run_passes(module, (
                f"{knowledge}lhspg{{ratio={ratio},periods={b.periods},steps={b.lhspg_steps},batch={b.batch},"
                f"seq-len={b.seq_len},metric={self.lhspg_metric},batches={self.lhspg_batches},"
                f"lr=0.001,data={self.mix},"
                f"progress=false{share}{',reconstruct=true' if self.reconstruct else ''}"
                f"{',' + self.lhspg_options if self.lhspg_options else ''}}},"
                "compress"), f"{method} lhspg @{ratio}")
            row["share_removed"] = stats["lhspg"].get("parameter share removed")
            row["lhspg_stats"] = _jsonable(stats["lhspg"])
            if "knowledge" in stats:
                row["knowledge_stats"] = _jsonable(stats["knowledge"])
            self.evaluate(module, row)
            if os.environ.get("BENCH_LORASHEAR_RECOVER", "1") == "0":
                return
            row = self.add(method=method, ratio=ratio, stage="+ stage 1 (dynamic)",
                           train_tokens=b.lhspg_tokens + b.stage1 * b.batch * b.seq_len,
                           share_removed=row["share_removed"])
            self.run_passes(module, self.recover_text(b.stage1, b.stage1, kd=False),
                            f"{method} recover stage 1 @{ratio}")
            self.evaluate(module, row)
            row = self.add(method=method, ratio=ratio, stage=STAGE2,
                           train_tokens=b.train_tokens, share_removed=row["share_removed"])
            self.run_passes(module, self.recover_text(b.stage2, 0, kd=True),
                            f"{method} recover stage 2 @{ratio}")
            self.evaluate(module, row)
            self.speed(module, row)
        except Exception as exc:  # noqa: BLE001
            self.fail(row, exc)

    def recover_rows(self, module, method: str, ratio: float, share: float | None,
                     midway: bool = False, speed: bool = False) -> None:
        """The recovery every non-lorashear method gets: stage 1 for LHSPG's steps (with
        ``midway``, evaluated: equal tokens with LHSPG alone), stage 1 for lorashear's stage-1
        steps, stage 2 (kd)."""
        b = self.budget
        lhspg_steps = b.periods * b.lhspg_steps
        row = {"method": method, "ratio": ratio, "stage": "+ recovery (= LHSPG tokens)",
               "train_tokens": b.lhspg_tokens, "share_removed": share}
        try:
            if midway:
                self.add(**row)
                row = self.rows[-1]
            self.run_passes(module, self.recover_text(lhspg_steps, lhspg_steps, kd=False),
                            f"{method} recover (LHSPG tokens) @{ratio}")
            if midway:
                self.evaluate(module, row)
            row = self.add(method=method, ratio=ratio, stage="+ recovery (equal budget)",
                           train_tokens=b.train_tokens, share_removed=share)
            self.run_passes(module, self.recover_text(b.stage1, b.stage1, kd=False, seed=1),
                            f"{method} recover stage 1 @{ratio}")
            self.run_passes(module, self.recover_text(b.stage2, 0, kd=True),
                            f"{method} recover stage 2 @{ratio}")
            self.evaluate(module, row)
            if speed:
                self.speed(module, row)
        except Exception as exc:  # noqa: BLE001
            self.fail(row, exc)

    def one_shot(self, ratio: float, metric: str) -> None:
        from _common import one_shot_pipeline

        from lorashear.ir.core import clone_module

        module = clone_module(self.base)
        method = f"one-shot {metric}"
        row = self.add(method=method, ratio=ratio, stage="pruned", train_tokens=0)
        try:
            text = one_shot_pipeline(metric, ratio, self.mix, calibration=self.calibration,
                                     attn_share=self.attn_share)
            # the masked model equals the compressed one: compress after reconstruct's row
            stats = self.run_passes(module, text if self.reconstruct else f"{text},compress",
                                    f"{method} prune @{ratio}")
            row["share_removed"] = stats["prune"].get("parameter share removed")
            row["prune_stats"] = _jsonable(stats["prune"])
            self.evaluate(module, row)
            if self.reconstruct:
                row = self.add(method=method, ratio=ratio, stage="+ reconstruct", train_tokens=0,
                               share_removed=row["share_removed"])
                bias = ",bias=true" if self.reconstruct_bias else ""
                bias += f",{self.reconstruct_options}" if self.reconstruct_options else ""
                stats = self.run_passes(module, f"reconstruct{{reference={self.reference},data={self.mix},"
                                                f"seq-len={self.budget.seq_len}{bias}}},compress",
                                        f"{method} reconstruct @{ratio}")
                row["reconstruct_stats"] = _jsonable(stats["reconstruct"])
                self.evaluate(module, row)
        except Exception as exc:  # noqa: BLE001
            self.fail(row, exc)
            return
        if os.environ.get("BENCH_ONESHOT_TRAIN", "1") == "0":
            return
        # taylor is the strongest one-shot metric (DESIGN.md 9): its midway row answers "LHSPG
        # alone vs one-shot at equal tokens", and its shapes stand for every one-shot model's speed
        taylor = metric == "taylor"
        self.recover_rows(module, method, ratio, row["share_removed"], midway=taylor, speed=taylor)

    def torch_pruning(self, ratio: float) -> None:
        from lorashear.errors import first_line
        from lorashear.frontend.pretrained import lower_pretrained
        from lorashear.runtime.executor import emit_torch

        method = "Torch-Pruning"
        row = self.add(method=method, ratio=ratio, stage="pruned", train_tokens=0)
        out = self.work / f"tp-{ratio}"
        try:
            if self.adapted_hf is None:
                from lorashear.runtime.hf import save_model_dir

                self.adapted_hf = save_model_dir(self.base, self.work / "adapted-hf", merge=True)
            with self.phase(f"{method} prune @{ratio}"):
                worker = Path(__file__).parent / "_torch_pruning_worker.py"
                try:
                    done = subprocess.run(
                        [sys.executable, str(worker), str(self.adapted_hf), str(ratio), str(out),
                         str(torch.get_num_threads())], capture_output=True, text=True,
                        timeout=self.budget.tp_timeout_s)
                except subprocess.TimeoutExpired:
                    raise RuntimeError(f"Torch-Pruning did not finish in {self.budget.tp_timeout_s} s "
                                       "(its dependency graph on grouped-query attention)") from None
            outcome_file = out / "outcome.json"
            if done.returncode or not outcome_file.is_file():
                tail = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
                raise RuntimeError(f"Torch-Pruning exited {done.returncode}: {tail[0]}")
            outcome = json.loads(outcome_file.read_text())
            row["share_removed"] = round(outcome["share_removed"], 6)
            row["tp_outcome"] = outcome
            if "hf_dir" not in outcome:
                raise RuntimeError(outcome.get("error", "no model saved"))
            module = lower_pretrained(outcome["hf_dir"], lora_rank=8)
            with torch.no_grad():
                ours = emit_torch(module).eval()(torch.load(out / "prompt.pt")).logits
            row["lowering_max_abs_diff"] = float((ours - torch.load(out / "logits.pt")).abs().max())
            self.evaluate(module, row)
        except Exception as exc:  # noqa: BLE001
            row["error"] = first_line(exc)
            log(TAG, f"  {method} @{ratio} failed: {row['error']}")
            self.save()
            return
        self.recover_rows(module, method, ratio, row["share_removed"])

    def fail(self, row: dict, exc: Exception) -> None:
        from lorashear.errors import first_line

        row["error"] = f"{type(exc).__name__}: {first_line(exc)}"
        row["traceback"] = traceback.format_exc(limit=4)
        log(TAG, f"  {row['method']} @{row['ratio']} [{row['stage']}] failed: {row['error']}")
        self.save()


def _jsonable(stats: dict) -> dict:
    """The statistics JSON can hold: scalars, lists of scalars (knowledge's protected layers) and
    tables of scalars (auto's split losses)."""
    scalar = (int, float, str, bool, type(None))
    return {k: v for k, v in stats.items() if isinstance(v, scalar)
            or isinstance(v, list | tuple) and all(isinstance(x, scalar) for x in v)
            or isinstance(v, dict) and all(isinstance(x, scalar) for x in v.values())}


# --- the table --------------------------------------------------------------------------------
def _fmt_ppl(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.1f}"


def _final(rows: list[dict], method: str, ratio: float, stage: str) -> dict | None:
    for row in rows:
        if row["method"] == method and row["ratio"] == ratio and row["stage"] == stage and "ppl" in row:
            return row
    return None


def versus(rows: list[dict], row: dict) -> str:
    """Who wins on the headline perplexity: this row or lorashear at the same tokens."""
    if row["method"] in ("dense", "lorashear") or "ppl" not in row:
        return ""
    stage = {"+ recovery (= LHSPG tokens)": "LHSPG", "+ recovery (equal budget)": STAGE2}
    ours = _final(rows, "lorashear", row["ratio"], stage.get(row["stage"], ""))
    if ours is None:
        return ""
    return "lorashear" if ours["ppl"][SOURCES[0]] < row["ppl"][SOURCES[0]] else "**this row**"


def markdown(data: dict) -> str:
    rows, m, b = data["rows"], data["machine"], data["budget_sizes"]
    adapt = b.get("adapt", 0)  # tables before the adaptation stage started from a fresh LoRA
    lora = (f"LoRA r=8 trained {adapt} steps ({adapt * b['batch'] * b['seq_len']:,} tokens) on the "
            "sources, shared by every method" if adapt else "fresh LoRA r=8")
    head = (f"Side by side, SmolLM2-135M-Instruct + {lora}; {m['date']}; {m['cpu']}, "
            f"{m['cores']} cores ({m['threads']} threads); torch {m['torch']}; budget "
            f"`{data['budget']}`: {data['train_tokens_per_method']:,} training tokens per "
            f"method (LHSPG {b['periods']}x{b['lhspg_steps']} steps, recovery stage 1 "
            f"{b['stage1']} + stage 2 (kd) {b['stage2']} steps, batch {b['batch']}x{b['seq_len']}; "
            f"one-shot and Torch-Pruning recover {b['periods'] * b['lhspg_steps'] + b['stage1']} + "
            f"{b['stage2']} steps); held-out ppl on {b['eval_windows']}x{b['eval_window']} tokens "
            f"per source; local task {b['task_items']} items on Persuasion; prefill "
            f"batch 1/8 x {b['speed_seq']} tokens ({data.get('speed_timing', 'mean of 2 runs')}), "
            "PyTorch = lorashear's executor.")
    # runs before BENCH_LHSPG_METRIC existed chose by taylor
    head += f" lorashear's `lhspg` chooses groups by `metric={data.get('lhspg_metric', 'taylor')}`"
    if data.get("lhspg_batches", 4) != 4:
        head += f" on {data['lhspg_batches']} calibration batches"
    if data.get("lhspg_options"):
        head += f" (`lhspg{{{data['lhspg_options']}}}`)"
    # runs before BENCH_KNOWLEDGE existed had no knowledge analysis
    gamma = data.get("knowledge_gamma", 0)
    head += (f", after `knowledge{{gamma={gamma:g}}}` (its calibration: no training tokens); the one-shot "
             "rows have no knowledge analysis, like the methods they stand for." if gamma else ".")
    if data.get("adapted_from"):
        head += f" The adapted model was read from `{data['adapted_from']}`, a previous run's adaptation."
    if data.get("reconstruct"):
        options = [*(["bias=true"] if data.get("reconstruct_bias") else []),
                   *([data["reconstruct_options"]] if data.get("reconstruct_options") else [])]
        bias = "{" + ",".join(options) + "}" if options else ""
        head += (f" With `reconstruct{bias}`: `lhspg{{reconstruct=true}}`, and each one-shot `prune` followed "
                 "by `reconstruct` against the adapted model (its own row, no training).")
    if data.get("oneshot_calibration") and not data["oneshot_calibration"].startswith("batches=4,"):
        head += f" Each one-shot `prune` calibrates on `{data['oneshot_calibration']}`."
    if data.get("recover_train", "lora") != "lora" or data.get("stage2_loss", "kd") != "kd":
        head += (f" Every recovery trains `{data.get('recover_train', 'lora')}`; stage 2's loss is "
                 f"`{data.get('stage2_loss', 'kd')}`.")
    if data.get("attn_share") is not None:
        head += f" lorashear and one-shot prune with `attn-share={data['attn_share']}`."
    else:  # the passes' own defaults: say which, a row's split is no longer visible otherwise
        head += " Each pass with its default `attn-share` (`lhspg`: auto, `prune`: proportional)."
    cols = ["ratio", "method", "stage", "train tokens", "removed", "params",
            *[f"ppl {s}" for s in data["sources"]], "task acc", "PyTorch tok/s 1/8",
            "ORT tok/s 1/8", "better ppl ({})".format(data["sources"][0])]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for row in rows:
        if "error" in row and "ppl" not in row:
            cells = [str(row["ratio"]), row["method"], row["stage"], f"{row['train_tokens']:,}",
                     _share(row), "-", f"failed: {row['error'][:160].replace('|', '/')}",
                     *["" for _ in data["sources"][1:]], "", "", "", ""]
        else:
            ppl = row.get("ppl", {})
            cells = [str(row["ratio"]), row["method"], row["stage"], f"{row['train_tokens']:,}",
                     _share(row), f"{row['parameters'] / 1e6:.1f}M" if "parameters" in row else "-",
                     *[_fmt_ppl(ppl.get(s)) for s in data["sources"]],
                     f"{row['task_acc']:.3f}" if "task_acc" in row else "-",
                     _speed(row, "pt_tps", dense), _speed(row, "ort_tps", dense), versus(rows, row)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(closing_line(rows))
    splits = split_line(rows)
    if splits:
        lines += ["", splits]
    return "\n".join(lines) + "\n"


def split_line(rows: list[dict]) -> str:
    """What ``attn-share=auto`` chose for each method and ratio (empty when it did not run)."""
    chosen = []
    for row in rows:
        stats = row.get("lhspg_stats") or row.get("prune_stats") or {}
        if "attn-share chosen" in stats:
            losses = ", ".join(f"{k} {v:.2f}" for k, v in stats.get("attn-share losses", {}).items())
            chosen.append(f"{row['method']} @{row['ratio']}: {stats['attn-share chosen']}"
                          + (f" ({losses})" if losses else ""))
    return ("`attn-share=auto` chose (calibration loss of each split tried): " + "; ".join(chosen) + "."
            ) if chosen else ""


def _share(row: dict) -> str:
    share = row.get("share_removed")
    return "-" if share is None else f"{100 * share:.1f}%"


def _speed(row: dict, key: str, dense: dict | None = None) -> str:
    """``batch-1 / batch-8`` tokens/s, with the speed-up over the dense model at batch 8."""
    if key not in row:
        return "-"
    text = f"{row[key][0]:.0f} / {row[key][1]:.0f}"
    if dense is not None and dense is not row and key in dense:
        text += f" ({row[key][1] / dense[key][1]:.2f}x)"
    return text


def closing_line(rows: list[dict]) -> str:
    """Which rows lorashear does not beat on headline perplexity, said plainly."""
    lost, won = [], []
    for row in rows:
        who = versus(rows, row)
        if who:
            (won if who == "lorashear" else lost).append(f"{row['method']} {row['stage']} @{row['ratio']}")
    if not won and not lost:
        return "No comparable rows finished."
    text = f"lorashear has the lower {SOURCES[0]} perplexity in {len(won)} of {len(won) + len(lost)} comparisons"
    return text + (f"; it does not win against: {'; '.join(lost)}." if lost else "; it wins them all.")


def main() -> int:
    warnings.filterwarnings("ignore")
    budget_name = os.environ.get("BENCH_BUDGET", "default")
    if budget_name not in BUDGETS:
        print(f"BENCH_BUDGET must be one of {', '.join(BUDGETS)}", file=sys.stderr)
        return 2
    set_threads()
    b = BUDGETS[budget_name]
    # AxB step counts: the LHSPG schedule (e.g. 1x100 for the full budget's 2x50), recovery's stages
    for name, form, fields in (("BENCH_LHSPG", "PERIODSxSTEPS (e.g. 1x100)", ("periods", "lhspg_steps")),
                               ("BENCH_RECOVER", "STAGE1xSTAGE2 (e.g. 320x160)", ("stage1", "stage2"))):
        if os.environ.get(name):
            try:
                first, second = map(int, os.environ[name].split("x"))
            except ValueError:
                print(f"{name} must be {form}, got {os.environ[name]}", file=sys.stderr)
                return 2
            b = replace(b, **dict(zip(fields, (first, second), strict=True)))
    if os.environ.get("BENCH_ADAPT"):
        b = replace(b, adapt=int(os.environ["BENCH_ADAPT"]))
    log(TAG, f"budget {budget_name}: {b.train_tokens:,} training tokens per method "
             f"({b.lhspg_tokens:,} in LHSPG); estimate {estimate_seconds(b) / 60:.0f} min")
    ratios = [float(r) for r in os.environ.get("BENCH_RATIOS", ",".join(map(str, RATIOS))).split(",")]
    metrics = os.environ.get("BENCH_METRICS", ",".join(METRICS)).split(",")
    skip = set(filter(None, os.environ.get("BENCH_SKIP", "").split(",")))
    if skip - {"dense", "lorashear", "torch-pruning"}:
        print(f"BENCH_SKIP names dense, lorashear, torch-pruning; got {','.join(sorted(skip))}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="lorashear-side-by-side-"))
    bench = Bench(budget_name, b, work)
    try:
        bench.prepare()
        if "dense" not in skip:
            bench.dense()
        one_shot_first = os.environ.get("BENCH_ONESHOT_FIRST", "0") != "0"
        for ratio in ratios:
            if "lorashear" not in skip and not one_shot_first:
                bench.lorashear(ratio)
            for metric in filter(None, metrics):
                bench.one_shot(ratio, metric)
            if "lorashear" not in skip and one_shot_first:
                bench.lorashear(ratio)
            if "torch-pruning" not in skip:
                bench.torch_pruning(ratio)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        bench.save()
    data = json.loads((OUT_DIR / f"{OUT_NAME}.json").read_text())
    table = markdown(data)
    (OUT_DIR / f"{OUT_NAME}.md").write_text(table)
    print("\n" + table)
    print("| phase | seconds |\n|---|---:|")
    for p in bench.phases:
        print(f"| {p['phase']} | {p['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
