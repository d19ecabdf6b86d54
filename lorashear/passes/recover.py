"""`recover`: LoRA recovery training after pruning (LoRAShear's dynamic knowledge recovery, DESIGN.md 6).

Stage 1 (``stage1-steps`` steps) trains on the text sources of a data spec. Each source's
windows are split into training windows and a small fixed held-out probe (``probe-windows``
windows). Before training and every ``probe-every`` steps the pass measures each source's
probe perplexity on the current (pruned) model and compares it with the unpruned reference:
the sampling weight of a source is its degradation ratio ``ppl_pruned / ppl_reference``,
normalised over the sources, so the batches go where the most knowledge was lost. Each
step's source is drawn with those weights from a generator seeded by ``seed`` and the step,
and its windows follow :func:`batch_for_step`, so a resumed run sees the same data. The
``recover-cursor`` attribute counts the steps of data that recover runs on the module have
drawn; a later run (stage 2 as a second ``recover``, a second round of recovery) draws from
there on instead of training on the same windows again (SmolLM2 at 20%, 18 more steps after 36:
held-out Austen 87.7 on the same windows against 85.0 on the next ones in
``bench/bench_recover_chain.py``, 101.1 against 87.8 in a first ad-hoc run).

The reference: with ``reference=PATH.ir`` (the module before pruning) the reference probe
losses are computed once on that model. Without it, the reference is the model as it is when
the pass starts, so the degradation is ``current probe ppl / start probe ppl`` (weights
start uniform and follow whichever source training hurts or helps least).

Stage 2 (``steps - stage1-steps`` steps): with ``loss=lm``, instruction tuning on the spec's
instruction sources (Alpaca records; the loss falls on the output tokens only; needs the
source model's tokenizer); with ``loss=kd``, distillation of the reference model's logits
(KL divergence) on the stage-1 text windows, which needs ``reference=``.

Only the LoRA factors train (AdamW). On a masked model (a ``prune-mask`` attribute from
``prune``/``lhspg``) the LoRA rows and columns of removed units are set back to zero after
every step (``zero_groups`` semantics on the live tensors), so ``compress`` stays exact.
Per-source probe perplexities and weights go into the ``recover-log`` attribute and, with
``log=``, a JSON-lines file.

``device``, ``precision``, ``grad-checkpoint`` and data parallelism under ``torchrun`` come from
:mod:`lorashear.training.runtime`. Under data parallelism every rank draws the same source and
global batch and trains on its slice; stage-2 gradients are weighted by each slice's count of
labelled tokens; probe losses are rank 0's on every rank, so all ranks sample alike.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lorashear.analysis.manager import AnalysisManager
from lorashear.data.calibration import (
    batch_for_step,
    check_seq_len,
    lazy_tokenizer,
    source_for_step,
    source_token_ids,
)
from lorashear.data.loaders import TOKEN_ID_SUFFIX
from lorashear.errors import DataError, LorashearError, PassError
from lorashear.ir.attributes import Attribute, RecordListAttr, register_attribute
from lorashear.ir.core import Module
from lorashear.ir.storage import DataStorage
from lorashear.ir.types import torch_dtype
from lorashear.passes.base import ModulePass, PassResult, option
from lorashear.passes.options import (
    device_option,
    grad_checkpoint_option,
    precision_option,
    warmup_option,
)
from lorashear.passes.pipeline import format_pass
from lorashear.passes.registry import register_pass
from lorashear.runtime.executor import lora_param_names
from lorashear.training.checkpoint import (
    TrainingCheckpoint,
    load_checkpoint,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
    trim_log_after,
)
from lorashear.training.runtime import (
    Precision,
    Schedule,
    TrainingRuntime,
    check_device_text,
    check_warmup,
    set_warmup_lr,
    tensors_of,
    warmup_steps,
)

#: Suffixes of a single data file that can hold no instruction records.
PLAIN_TEXT_SUFFIXES = (".txt", TOKEN_ID_SUFFIX)


@register_attribute
@dataclass(frozen=True)
class RecoverLogAttr(RecordListAttr):
    """What recovery measured: one entry per probe (step, per-source ppl, sampling weights)."""

    kind: ClassVar[str] = "recover-log"
    records_field: ClassVar[str] = "probes"
    probes: tuple[dict, ...]


@register_attribute
@dataclass(frozen=True)
class RecoverCursorAttr(Attribute):
    """Steps of data that recover runs on this module have drawn: the next run's first step."""

    kind: ClassVar[str] = "recover-cursor"
    steps: int

    def to_json(self) -> Any:
        return {"steps": self.steps}

    @classmethod
    def from_json(cls, data: Any) -> RecoverCursorAttr:
        steps = data.get("steps") if isinstance(data, dict) else None
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError("recover-cursor must be a JSON object with a step count >= 0: {\"steps\": N}")
        return cls(steps)


def data_cursor(module: Module) -> int:
    """The step at which a recover run on ``module`` starts drawing data (0 on a first run)."""
    cursor = module.attributes.get("recover-cursor")
    return cursor.steps if isinstance(cursor, RecoverCursorAttr) else 0


@dataclass
class SourceWindows:
    """One stage-1 source: its training windows and its fixed held-out probe windows."""

    name: str
    train: torch.Tensor  # [N, seq_len]
    probe: torch.Tensor  # [probe_windows, seq_len]


@dataclass
class InstructionRows:
    """Stage-2 instruction examples: padded rows with labels on the output tokens only."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor


def degradation_weights(current: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """Sampling weight per source: ``ppl_current / ppl_reference``, normalised to sum to 1.

    Losses are mean token cross-entropies, so the ratio is ``exp(loss - reference_loss)``."""
    ratios = {name: math.exp(current[name] - reference[name]) for name in current}
    total = sum(ratios.values())
    return {name: ratio / total for name, ratio in ratios.items()}


def labelled_tokens(labels: torch.Tensor) -> int:
    """Tokens the shifted LM loss counts: labels after the first position that are not -100."""
    return int((labels[:, 1:] != -100).sum())


@register_pass
@dataclass(frozen=True)
class Recover(ModulePass):
    """Recover a pruned model with LoRA: degradation-weighted text, then instructions or KD."""

    name: ClassVar[str] = "recover"
    data: str = option("", "YAML data spec (text, JSON/JSONL or .ids sources; instruction sources for stage 2)")
    steps: int = option(40, "optimizer steps in all (stage 1 + stage 2)")
    stage1_steps: int = option(20, "steps of stage 1 (degradation-weighted text sources)")
    probe_every: int = option(10, "measure probe perplexities and reweight every this many steps")
    sampling: Literal["dynamic", "static"] = option(
        "dynamic", "dynamic: weights from degradation; static: the spec's weights (a baseline)")
    loss: Literal["lm", "kd"] = option("lm", "stage 2: lm (instruction tuning) or kd (distil reference logits)")
    reference: str = option("", "IR file of the unpruned model (reference ppl, KD teacher); "
                            "without it the reference is the model at the pass's start")
    lr: float = option(1e-3, "AdamW learning rate of the LoRA factors")
    schedule: Schedule = option("constant", "learning rate after the warmup: constant, or cosine "
                                "(decays to 0 over the run's steps)")
    warmup: int = warmup_option(-1, "a fresh AdamW's first steps move every LoRA element by "
                                   "about lr, which undid recovery at small budgets")
    seq_len: int = option(128, "tokens per training window")
    batch: int = option(4, "windows per step")
    seed: int = option(0, "seed of the data order and the source draws")
    probe_windows: int = option(8, "held-out windows per source for the probe perplexity")
    log: str = option("", "append one JSON line per probe to this file")
    checkpoint_dir: str = option("", "save a checkpoint at every probe and resume from it when present")
    progress: bool = option(True, "show a progress bar")
    device: str = device_option()
    precision: Precision = precision_option()
    grad_checkpoint: bool = grad_checkpoint_option()

    def __post_init__(self) -> None:
        if not self.data:
            raise PassError("recover needs a data spec", hint="recover{data=sources.yaml}")
        if self.steps < 1 or not 0 <= self.stage1_steps <= self.steps:
            raise PassError(f"recover needs steps >= 1 and 0 <= stage1-steps <= steps, got "
                            f"steps={self.steps}, stage1-steps={self.stage1_steps}")
        if min(self.probe_every, self.batch, self.probe_windows) < 1 or self.seq_len < 2:
            raise PassError("recover needs probe-every, batch, probe-windows >= 1 and seq-len >= 2")
        check_warmup(self.name, self.warmup)
        check_device_text(self.name, self.device)
        # what is plain from the options alone fails while the pipeline parses, before any
        # earlier pass has spent its time; the data spec's contents are checked when it loads
        if self.steps > self.stage1_steps:
            if self.loss == "kd" and not self.reference:
                raise PassError("recover: loss=kd distils the unpruned model's logits and needs it",
                                hint="give reference=PATH.ir (the module before pruning)")
            if self.loss == "lm" and Path(self.data).suffix.lower() in PLAIN_TEXT_SUFFIXES:
                raise PassError(f"recover: stage 2 (loss=lm) tunes on instruction records, and data={self.data} "
                                "is plain text", hint="distil the unpruned model instead (loss=kd,reference="
                                "PATH.ir), or train stage 1 only (stage1-steps equal to steps)")

    # --- data ------------------------------------------------------------------------------
    def load_data(self, module: Module) -> tuple[list[SourceWindows], InstructionRows | None, dict]:
        """Stage-1 windows per text source, stage-2 instruction rows, the spec's weights."""
        from lorashear.data.spec import load_spec

        limit = check_seq_len(module, self.seq_len, "recover")
        try:
            spec = load_spec(self.data)
            text_sources, instruction_sources = [], []
            for source in spec.sources:
                suffix = source.path.suffix.lower() if source.path is not None else ""
                if suffix != TOKEN_ID_SUFFIX and (source.format == "instruction" or (
                        source.format == "auto" and suffix in (".json", ".jsonl", ".ndjson")
                        and self._looks_like_instructions(source))):
                    instruction_sources.append((source, source.load_instruction_records()))
                else:
                    text_sources.append(source)
        except DataError as exc:
            raise PassError(f"recover: {exc.message}", hint=exc.hint) from None
        windows: list[SourceWindows] = []
        tokenizer = lazy_tokenizer(module, "recover")
        for index, source in enumerate(text_sources):
            ids = source_token_ids(module, source, "recover", tokenizer)
            if ids.numel() == 0:
                raise PassError(f"recover: source {source.name} ({source.location()}) is empty")
            count = ids.numel() // self.seq_len
            if count < self.probe_windows + self.batch:
                raise PassError(f"recover: source {source.name} holds {ids.numel()} tokens: {count} "
                                f"windows of {self.seq_len}, fewer than probe-windows + batch = "
                                f"{self.probe_windows + self.batch}", hint="lower seq-len or give more data")
            all_windows = ids[:count * self.seq_len].view(count, self.seq_len)
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed + index))
            all_windows = all_windows[order]
            windows.append(SourceWindows(source.name, all_windows[self.probe_windows:],
                                         all_windows[:self.probe_windows]))
        rows = None
        if instruction_sources:
            from lorashear.data.blocks import encode_instructions

            records = [r for _, recs in instruction_sources for r in recs]
            try:
                encoded = encode_instructions(records, tokenizer("instruction records"),
                                              self.seq_len, max_length=limit)
            except DataError as exc:
                raise PassError(f"recover: {exc.message}", hint=exc.hint) from None
            rows = InstructionRows(encoded.input_ids, encoded.labels, encoded.attention_mask)
        weights = {s.name: s.weight for s in text_sources}
        return windows, rows, weights

    @staticmethod
    def _looks_like_instructions(source) -> bool:
        from lorashear.data.loaders import read_local_records

        records = read_local_records(source.path)
        return any(isinstance(r, dict) and "instruction" in r for r in records)

    def check_plan(self, windows: list[SourceWindows], rows: InstructionRows | None) -> None:
        """Fail before training when a stage has no data or no teacher."""
        if self.stage1_steps and not windows:
            raise PassError("recover: stage 1 needs at least one text source in the data spec")
        if self.steps > self.stage1_steps:
            if self.loss == "kd":  # its reference was checked with the options
                if not windows:
                    raise PassError("recover: loss=kd needs text sources to distil on")
            elif rows is None:
                raise PassError("recover: stage 2 needs an instruction source (Alpaca JSON/JSONL) in "
                                "the data spec, or loss=kd with reference=PATH.ir",
                                hint="or set stage1-steps equal to steps")

    # --- the masked model ---------------------------------------------------------------------
    @staticmethod
    def lora_keep_masks(module: Module) -> list[tuple[str, int, torch.Tensor]]:
        """(LoRA param, axis, keep mask) for every LoRA slice belonging to a removed unit."""
        mask, groups = module.attributes.get("prune-mask"), module.attributes.get("groups")
        if mask is None:
            return []
        if groups is None:
            raise PassError("recover: the module has a prune-mask but no groups attribute")
        from lorashear.analysis.masking import keep_masks, validate_removal

        removed = mask.as_dict()
        validate_removal(groups, removed)
        lora = lora_param_names(module)
        return [(name, axis, keep) for (name, axis), keep in keep_masks(module, groups, removed).items()
                if name in lora]

    # --- the pass ------------------------------------------------------------------------------
    def run(self, module: Module, am: AnalysisManager) -> PassResult:
        if not lora_param_names(module):
            raise PassError("recover trains LoRA adapters, and the module has none",
                            hint="lower with --adapter DIR or --lora-rank R")
        runtime = TrainingRuntime.create(self.name, self.device, self.precision, self.grad_checkpoint)
        runtime.check_batch(self.batch)
        windows, rows, spec_weights = self.load_data(module)
        self.check_plan(windows, rows)
        teacher = None
        if self.reference:
            from lorashear.ir.fileformat import load_ir

            path = Path(self.reference).expanduser()
            if not path.is_file():
                raise PassError(f"recover: reference model {path} does not exist")
            try:
                teacher = runtime.build_model(load_ir(path), trainable=False)
            except LorashearError as exc:
                raise PassError(f"recover: reference model {path}: {exc}") from None
        masks = self.lora_keep_masks(module)
        first = data_cursor(module)  # data steps earlier runs drew: this run draws after them
        runtime.seed(self.seed)
        model = runtime.build_model(module)
        trainable = [p for p in model.parameters() if p.requires_grad]
        names = {id(p): n for n, p in model.named_parameters()}
        optimizer = torch.optim.AdamW(trainable, lr=self.lr, weight_decay=0.0)
        by_name = {s.name: s for s in windows}
        source_names = [s.name for s in windows]
        total = sum(spec_weights.values()) or 1.0
        static = {n: spec_weights[n] / total for n in source_names}

        def probe_losses(net: torch.nn.Module) -> dict[str, float]:
            """Every source's probe loss; rank 0's on every rank, so all sample alike."""
            was_training = net.training
            net.eval()
            with torch.no_grad(), runtime.autocast():
                out = {s.name: net(probe, labels=probe).loss.item()
                       for s, probe in ((s, runtime.to_device(s.probe)) for s in windows)}
            net.train(was_training)
            return runtime.broadcast_object(out)

        # where and with how much memory a run trains does not change its result
        owner = format_pass(replace(self, checkpoint_dir="", progress=True, log="", device="auto",
                                    grad_checkpoint=False))
        resumed = load_checkpoint(self.checkpoint_dir, owner) if self.checkpoint_dir else None
        if resumed is not None:
            with torch.no_grad():
                for p in trainable:
                    p.copy_(resumed.tensors[names[id(p)]])
            restore_optimizer(optimizer, dict(model.named_parameters()), resumed.tensors)
            state = resumed.state
            step, probes, weights = state["step"], state["probes"], state["weights"]
            reference_losses, losses = state["reference_losses"], state["losses"]
            runtime.restore_rng(resumed.tensors, self.seed, step)
            if self.log and runtime.is_main:
                trim_log_after(self.log, step)
        else:
            step, probes, losses = 0, [], []
            reference_losses = probe_losses(teacher if teacher is not None else model) if windows else {}
            weights = dict(static)
        log_file = open(self.log, "a", encoding="utf-8") if self.log and runtime.is_main else None  # noqa: SIM115

        def record_probe() -> None:
            nonlocal weights
            current = probe_losses(model)
            if self.sampling == "dynamic":
                weights = degradation_weights(current, reference_losses)
            entry = {"step": step, "stage": 1 if step < self.stage1_steps else 2,
                     "ppl": {n: math.exp(v) for n, v in current.items()},
                     "reference_ppl": {n: math.exp(v) for n, v in reference_losses.items()},
                     "weights": dict(weights)}
            probes.append(entry)
            if log_file:
                log_file.write(json.dumps(entry, sort_keys=True) + "\n")
                log_file.flush()

        def save() -> None:
            runtime.sync_tensors(tensors_of(model, (names[id(p)] for p in trainable)))
            tensors = {names[id(p)]: p for p in trainable}
            tensors.update(optimizer_tensors(optimizer, names))
            tensors.update(runtime.rng_tensors())  # a collective: every rank takes part
            if runtime.is_main:
                save_checkpoint(self.checkpoint_dir, TrainingCheckpoint(owner, {
                    "step": step, "probes": probes, "weights": weights, "losses": losses,
                    "reference_losses": reference_losses}, tensors))

        def text_batch(source_weights: dict[str, float]) -> torch.Tensor:
            """This rank's slice of the step's text batch: a source drawn with ``source_weights``,
            then its windows, both at the step's place in the data after the cursor."""
            name = source_for_step(source_names, source_weights, self.seed, first + step)
            index = source_names.index(name)
            (batch,) = runtime.local(batch_for_step(by_name[name].train, self.batch, self.seed + index,
                                                    first + step))
            return batch

        warmup = warmup_steps(self.warmup, self.steps)
        try:
            if resumed is None and windows:
                record_probe()
            bar = tqdm(range(step, self.steps), desc="recover", disable=not runtime.progress(self.progress),
                       leave=False)
            for _ in bar:
                share = 1.0 / runtime.world_size  # full windows: equal token counts per rank
                if step < self.stage1_steps:
                    batch = text_batch(weights)
                    with runtime.autocast():
                        loss = model(batch, labels=batch).loss
                elif self.loss == "kd":
                    batch = text_batch(static)
                    with runtime.autocast():
                        with torch.no_grad():
                            target = F.log_softmax(teacher(batch).logits.float(), dim=-1)
                        student = F.log_softmax(model(batch).logits.float(), dim=-1)
                        loss = F.kl_div(student.flatten(0, 1), target.flatten(0, 1), log_target=True,
                                        reduction="batchmean")
                else:
                    pick = self._instruction_rows(rows, first + step)
                    labels = rows.labels[pick]
                    ids, mask, local_labels = runtime.local(rows.input_ids[pick], rows.attention_mask[pick],
                                                            labels)
                    # the loss is a mean over labelled tokens, which differ per slice
                    share = labelled_tokens(local_labels) / max(labelled_tokens(labels), 1)
                    with runtime.autocast():
                        loss = model(ids, attention_mask=mask, labels=local_labels).loss
                set_warmup_lr(optimizer, self.lr, step, warmup, self.schedule, self.steps)
                loss_value = runtime.step(loss, optimizer, trainable, share)
                if masks:
                    with torch.no_grad():
                        for param_name, axis, keep in masks:
                            tensor = model.tensor(param_name)
                            shape = [1] * tensor.dim()
                            shape[axis] = -1
                            tensor.mul_(keep.view(shape).to(tensor.device, tensor.dtype))
                losses.append(loss_value)
                step += 1
                bar.set_postfix(loss=f"{loss_value:.3f}")
                if windows and (step % self.probe_every == 0 or step == self.steps):
                    record_probe()
                    if self.checkpoint_dir:
                        save()
        finally:
            if log_file:
                log_file.close()
        with torch.no_grad():
            for p in trainable:
                ir_dtype = torch_dtype(module.params[names[id(p)]].type.dtype)
                module.params[names[id(p)]].storage = DataStorage(p.detach().to(device="cpu", dtype=ir_dtype).clone())
        module.attributes["recover-log"] = RecoverLogAttr(tuple(probes))
        module.attributes["recover-cursor"] = RecoverCursorAttr(first + step)
        statistics: dict[str, Any] = {"steps": step, "first loss": losses[0] if losses else None,
                                      "last loss": losses[-1] if losses else None}
        if probes:
            statistics["final ppl"] = {n: round(v, 4) for n, v in probes[-1]["ppl"].items()}
            statistics["final weights"] = {n: round(v, 4) for n, v in probes[-1]["weights"].items()}
        return PassResult(True, frozenset(), statistics)

    def _instruction_rows(self, rows: InstructionRows, step: int) -> torch.Tensor:
        """Row indices of a stage-2 instruction step (seeded epochs, as batch_for_step);
        ``step`` counts from the data cursor of the first run on the module."""
        index = torch.arange(len(rows.input_ids))
        if len(index) < self.batch:
            return index
        return batch_for_step(index, self.batch, self.seed, step - self.stage1_steps)
