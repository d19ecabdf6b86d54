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
there on instead of training on the same windows again (compared in
``bench/bench_recover_chain.py``; figures in ``bench/RESULTS.md``, "`recover` run twice").

The reference: with ``reference=PATH.ir`` (the module before pruning) the reference probe
losses are computed once on that model. Without it, the reference is the model as it is when
the pass starts, so the degradation is ``current probe ppl / start probe ppl`` (weights
start uniform and follow whichever source training hurts or helps least).

Stage 2 (``steps - stage1-steps`` steps; ``stage1-steps`` defaults to half the steps): with
``loss=lm``, instruction tuning on the spec's instruction sources (Alpaca records; the loss
falls on the output tokens only; needs the source model's tokenizer); with ``loss=kd``, distillation of the reference model's logits
(KL divergence) on the stage-1 text windows, which needs ``reference=``.

``train=`` says what trains (AdamW): ``lora`` the LoRA factors; ``lora+norms`` also every
1-D base weight (norm scales, biases); ``all`` also the base weights. The factors train at
``lr``, the base weights at ``base-lr``. On a masked model (a
``prune-mask`` attribute from ``prune``/``lhspg``) the trained rows and columns of removed
units are set back to zero after every step (``zero_groups`` semantics on the live tensors),
so ``compress`` stays exact.
Per-source probe perplexities and weights go into the ``recover-log`` attribute and, with
``log=``, a JSON-lines file.

Device, precision, data parallelism under ``torchrun``, the optimizer with its warmup and
schedule, checkpoints, the log file and the write-back into the IR are the
:class:`~lorashear.training.harness.LoraHarness`'s. Under data parallelism every rank draws the
same source and global batch and trains on its slice; stage-2 gradients are weighted by each
slice's count of labelled tokens; probe losses are rank 0's on every rank, so all ranks sample
alike. With ``shard=fsdp2`` the model (and the reference of ``loss=kd``) is sharded per
decoder layer over the ranks (FSDP2); the removed units' rows and columns are zeroed in each
rank's rows of the trained tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

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
from lorashear.ir.types import torch_dtype
from lorashear.passes.base import ModulePass, PassResult, option
from lorashear.passes.options import (
    device_option,
    grad_checkpoint_option,
    precision_option,
    shard_option,
    warmup_option,
)
from lorashear.passes.registry import register_pass
from lorashear.passes.resume import result_text
from lorashear.runtime.executor import IRModel, lora_param_names
from lorashear.training.harness import LoraHarness
from lorashear.training.runtime import (
    Precision,
    Schedule,
    Shard,
    check_device_text,
    check_shard_text,
    check_warmup,
    local_rows_of,
)

#: Suffixes of a single data file that can hold no instruction records.
PLAIN_TEXT_SUFFIXES = (".txt", TOKEN_ID_SUFFIX)
#: ``base-lr``'s default: on one-shot-pruned SmolLM2-135M, 40 steps of ``train=all`` at one
#: learning rate for everything recovered most at 1e-4 of {1e-3, 1e-4, 3e-5} (1e-3 undid the
#: pruned model; ``bench/RESULTS.md``, "Recovery that trains the base weights").
BASE_LR = 1e-4


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


@dataclass
class RecoveryData:
    """What a recover run trains on: stage-1 windows per text source, stage-2 instruction
    rows, the spec's source weights (normalised) and the data cursor the run starts at."""

    windows: list[SourceWindows]
    rows: InstructionRows | None
    static: dict[str, float]
    first: int
    hidden_keep: torch.Tensor | None = None
    """1 for each kept hidden channel, 0 for a removed one (None: all kept): loss=kd-hidden."""

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.windows]


@dataclass
class RecoverState:
    """Where a recover run stands: its steps and losses, its probes, the sampling weights they
    set and the reference's probe losses; its checkpoint holds all of it."""

    step: int
    probes: list[dict]
    weights: dict[str, float]
    losses: list[float]
    reference_losses: dict[str, float]

    @classmethod
    def restore(cls, state: dict[str, Any]) -> RecoverState:
        return cls(state["step"], state["probes"], state["weights"], state["losses"],
                   state["reference_losses"])

    def checkpoint_state(self) -> dict[str, Any]:
        return {"step": self.step, "probes": self.probes, "weights": self.weights,
                "losses": self.losses, "reference_losses": self.reference_losses}


@register_pass
@dataclass(frozen=True)
class Recover(ModulePass):
    """Recover a pruned model with LoRA: degradation-weighted text, then instructions or KD."""

    name: ClassVar[str] = "recover"
    data: str = option("", "YAML data spec (text, JSON/JSONL or .ids sources; instruction sources for stage 2)")
    steps: int = option(40, "optimizer steps in all (stage 1 + stage 2)")
    stage1_steps: int = option(-1, "steps of stage 1 (degradation-weighted text sources); -1: half "
                               "of steps, rounded up (20 of the default 40)")
    probe_every: int = option(10, "measure probe perplexities and reweight every this many steps")
    sampling: Literal["dynamic", "static"] = option(
        "dynamic", "dynamic: weights from degradation; static: the spec's weights (a baseline)")
    loss: Literal["lm", "kd", "kd-hidden"] = option(
        "lm", "stage 2: lm (instruction tuning), kd (distil reference logits) or kd-hidden (kd plus "
        "each decoder layer's output against the reference's, as Minitron)")
    hidden_weight: float = option(1.0, "loss=kd-hidden: weight of the mean per-layer hidden-state "
                                  "error (MSE over the kept channels / the reference's mean square)")
    reference: str = option("", "IR file of the unpruned model (reference ppl, KD teacher); "
                            "without it the reference is the model at the pass's start")
    train: Literal["lora", "lora+norms", "all"] = option(
        "lora", "what recovery trains: lora (the adapters), lora+norms (also every 1-D weight: "
        "norm scales, biases), all (also the base weights; removed units stay zero). AdamW keeps "
        "two fp32 moments per trained element (statistic 'optimizer state MB')")
    lr: float = option(1e-3, "AdamW learning rate of the LoRA factors")
    base_lr: float = option(BASE_LR, "AdamW learning rate of the base weights train= adds (norms, "
                            "biases, matrices): full weights want a smaller step than the factors")
    schedule: Schedule = option("constant", "learning rate after the warmup: constant, or cosine "
                                "(decays to 0 over the run's steps)")
    warmup: int = warmup_option(-1, "a fresh AdamW's first steps move every LoRA element by "
                                   "about lr, which undid recovery at small budgets")
    seq_len: int = option(128, "tokens per training window")
    batch: int = option(4, "windows per step")
    seed: int = option(0, "seed of the data order and the source draws")
    probe_windows: int = option(8, "held-out windows per source for the probe perplexity")
    log: str = option("", "append one JSON line per probe to this file", run_only=True)
    checkpoint_dir: str = option("", "save a checkpoint at every probe and resume from it when present",
                                 run_only=True)
    progress: bool = option(True, "show a progress bar", run_only=True)
    device: str = device_option()
    precision: Precision = precision_option()
    grad_checkpoint: bool = grad_checkpoint_option()
    shard: Shard = shard_option()

    def __post_init__(self) -> None:
        if not self.data:
            raise PassError("recover needs a data spec", hint="recover{data=sources.yaml}")
        if self.steps < 1 or not -1 <= self.stage1_steps <= self.steps:
            raise PassError(f"recover needs steps >= 1 and 0 <= stage1-steps <= steps (or -1: half of "
                            f"steps), got steps={self.steps}, stage1-steps={self.stage1_steps}")
        if min(self.probe_every, self.batch, self.probe_windows) < 1 or self.seq_len < 2:
            raise PassError("recover needs probe-every, batch, probe-windows >= 1 and seq-len >= 2")
        check_warmup(self.name, self.warmup)
        check_device_text(self.name, self.device)
        check_shard_text(self.name, self.shard)
        # what is plain from the options alone fails while the pipeline parses, before any
        # earlier pass has spent its time; the data spec's contents are checked when it loads
        if self.steps > self.stage1_length:
            if self.loss in ("kd", "kd-hidden") and not self.reference:
                raise PassError(f"recover: loss={self.loss} distils the unpruned model's logits and needs it",
                                hint="give reference=PATH.ir (the module before pruning)")
            if self.loss == "lm" and Path(self.data).suffix.lower() in PLAIN_TEXT_SUFFIXES:
                raise PassError(f"recover: stage 2 (loss=lm) tunes on instruction records, and data={self.data} "
                                "is plain text", hint="distil the unpruned model instead (loss=kd,reference="
                                "PATH.ir), or train stage 1 only (stage1-steps equal to steps)")

    @property
    def stage1_length(self) -> int:
        """Steps of stage 1: ``stage1-steps``, or half of ``steps`` rounded up when it is -1."""
        return (self.steps + 1) // 2 if self.stage1_steps == -1 else self.stage1_steps

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
        if self.stage1_length and not windows:
            raise PassError("recover: stage 1 needs at least one text source in the data spec")
        if self.steps > self.stage1_length:
            if self.loss in ("kd", "kd-hidden"):  # its reference was checked with the options
                if not windows:
                    raise PassError(f"recover: loss={self.loss} needs text sources to distil on")
            elif rows is None:
                raise PassError("recover: stage 2 needs an instruction source (Alpaca JSON/JSONL) in "
                                "the data spec, or loss=kd with reference=PATH.ir",
                                hint="or set stage1-steps equal to steps")

    # --- the masked model ---------------------------------------------------------------------
    def base_trained(self, module: Module) -> set[str]:
        """The base parameters ``train=`` adds to the LoRA factors."""
        if self.train == "lora":
            return set()
        lora = lora_param_names(module)
        return {p.name for p in module.params.values()
                if not p.buffer and p.name not in lora and torch_dtype(p.type.dtype).is_floating_point
                and (self.train == "all" or p.type.rank == 1)}

    @staticmethod
    def keep_masks(module: Module, trained: set[str]) -> list[tuple[str, int, torch.Tensor]]:
        """(param, axis, keep mask) for every slice of a trained tensor (the LoRA factors and
        ``trained``) that belongs to a removed unit."""
        mask, groups = module.attributes.get("prune-mask"), module.attributes.get("groups")
        if mask is None:
            return []
        if groups is None:
            raise PassError("recover: the module has a prune-mask but no groups attribute")
        from lorashear.analysis.masking import keep_masks, validate_removal

        removed = mask.as_dict()
        validate_removal(groups, removed)
        trained = lora_param_names(module) | trained
        return [(name, axis, keep) for (name, axis), keep in keep_masks(module, groups, removed).items()
                if name in trained]

    @staticmethod
    def zero_removed(model: IRModel, masks: list[tuple[str, int, torch.Tensor]],
                     sharded: bool = False) -> None:
        """Set the live trained rows and columns of removed units back to zero (``sharded``:
        in this rank's rows of each tensor)."""
        with torch.no_grad():
            for param_name, axis, keep in masks:
                tensor = model.tensor(param_name)
                shape = [1] * tensor.dim()
                shape[axis] = -1
                if sharded:
                    tensor, start = local_rows_of(tensor)
                    if axis == 0:
                        keep = keep[start:start + tensor.shape[0]]
                tensor.mul_(keep.view(shape).to(tensor.device, tensor.dtype))

    # --- the pass ------------------------------------------------------------------------------
    def run(self, module: Module, am: AnalysisManager) -> PassResult:
        harness = LoraHarness.create(self, module, owner=result_text(self), total_steps=self.steps,
                                     schedule=self.schedule)
        windows, rows, spec_weights = self.load_data(module)
        self.check_plan(windows, rows)
        teacher = self.load_reference(harness) if self.reference else None
        trained = self.base_trained(module)
        masks = self.keep_masks(module, trained)
        first = data_cursor(module)  # data steps earlier runs drew: this run draws after them
        model = harness.build(module, self.seed, trained, self.base_lr)
        total = sum(spec_weights.values()) or 1.0
        data = RecoveryData(windows, rows, {s.name: spec_weights[s.name] / total for s in windows}, first,
                            self.hidden_keep(module) if self.loss == "kd-hidden" else None)
        saved = harness.resume("step")
        if saved is not None:
            state = RecoverState.restore(saved)
        else:
            reference = (self.probe_losses(harness, teacher if teacher is not None else model, windows)
                         if windows else {})
            state = RecoverState(0, [], dict(data.static), [], reference)
        with harness.logging():
            if saved is None and windows:
                self.record_probe(harness, model, windows, state)
            bar = harness.bar(range(state.step, self.steps), "recover")
            for _ in bar:
                loss, share = self.step_loss(harness, model, teacher, data, state)
                loss_value = harness.step(loss, state.step, share)
                if masks:  # removed units stay removed, so compress stays exact
                    self.zero_removed(model, masks, harness.runtime.sharded)
                state.losses.append(loss_value)
                state.step += 1
                bar.set_postfix(loss=f"{loss_value:.3f}")
                if windows and (state.step % self.probe_every == 0 or state.step == self.steps):
                    self.record_probe(harness, model, windows, state)
                    if harness.saves_checkpoints:
                        harness.checkpoint(state.checkpoint_state())
        harness.write_back(module)
        module.attributes["recover-log"] = RecoverLogAttr(tuple(state.probes))
        module.attributes["recover-cursor"] = RecoverCursorAttr(first + state.step)
        losses, probes = state.losses, state.probes
        statistics: dict[str, Any] = {"steps": state.step, "first loss": losses[0] if losses else None,
                                      "last loss": losses[-1] if losses else None}
        if trained:
            elements = sum(p.numel() for p in harness.trainable)
            statistics["trained parameters"] = elements
            statistics["optimizer state MB"] = round(elements * 2 * 4 / 2**20, 1)
        if probes:
            statistics["final ppl"] = {n: round(v, 4) for n, v in probes[-1]["ppl"].items()}
            statistics["final weights"] = {n: round(v, 4) for n, v in probes[-1]["weights"].items()}
        return PassResult(True, frozenset(), statistics)

    def load_reference(self, harness: LoraHarness) -> IRModel:
        """The unpruned model of ``reference=``, frozen: the reference probes and the KD teacher."""
        from lorashear.ir.fileformat import load_ir

        path = Path(self.reference).expanduser()
        if not path.is_file():
            raise PassError(f"recover: reference model {path} does not exist")
        try:
            return harness.frozen(load_ir(path))
        except LorashearError as exc:
            raise PassError(f"recover: reference model {path}: {exc}") from None

    def step_loss(self, harness: LoraHarness, model: IRModel, teacher: IRModel | None, data: RecoveryData,
                  state: RecoverState) -> tuple[torch.Tensor, float | None]:
        """The loss of step ``state.step`` on this rank's slice, and the slice's share of the
        global batch's tokens (None: an equal share): stage 1's LM loss on a source drawn by
        degradation, or stage 2's (KD on text drawn by the spec's weights, or instruction LM)."""
        runtime = harness.runtime
        if state.step < self.stage1_length:
            (batch,) = runtime.local(self.text_batch(data, state.weights, state.step))
            with runtime.autocast():
                return model(batch, labels=batch).loss, None
        if self.loss in ("kd", "kd-hidden"):
            hidden = self.loss == "kd-hidden"
            (batch,) = runtime.local(self.text_batch(data, data.static, state.step))
            with runtime.autocast():
                with torch.no_grad():
                    taught = teacher(batch, output_hidden_states=hidden)
                    target = F.log_softmax(taught.logits.float(), dim=-1)
                out = model(batch, output_hidden_states=hidden)
                student = F.log_softmax(out.logits.float(), dim=-1)
                loss = F.kl_div(student.flatten(0, 1), target.flatten(0, 1), log_target=True,
                                reduction="batchmean")
                if hidden:
                    loss = loss + self.hidden_weight * self.hidden_error(
                        out.hidden_states, taught.hidden_states, data.hidden_keep)
                return loss, None
        rows = data.rows
        pick = self._instruction_rows(rows, data.first + state.step)
        labels = rows.labels[pick]
        ids, mask, local_labels = runtime.local(rows.input_ids[pick], rows.attention_mask[pick], labels)
        # the loss is a mean over labelled tokens, which differ per slice
        share = labelled_tokens(local_labels) / max(labelled_tokens(labels), 1)
        with runtime.autocast():
            out = model(ids, attention_mask=mask, labels=local_labels)
        if share == 0 and runtime.sharded:
            # a mean over no tokens is NaN, and every rank must run the backward (FSDP2's
            # reduce-scatters): a zero over the logits gives zero gradients instead
            return out.logits.sum() * 0.0, share
        return out.loss, share

    @staticmethod
    def hidden_keep(module: Module) -> torch.Tensor | None:
        """The kept hidden channels of a masked model (a removed ``hidden`` family's units are
        zero in the pruned model however it trains, so they are left out of the error)."""
        mask, groups = module.attributes.get("prune-mask"), module.attributes.get("groups")
        if mask is None or groups is None:
            return None
        keep = None
        for family_id, units in mask.as_dict().items():
            family = groups.families[family_id]
            if family.kind == "hidden" and units:
                keep = torch.ones(family.size) if keep is None else keep
                keep[list(units)] = 0.0
        return keep

    @staticmethod
    def hidden_error(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                     keep: torch.Tensor | None) -> torch.Tensor:
        """The mean over decoder layers of the squared error of the layer's output against the
        reference's, over the kept hidden channels, relative to the reference's mean square
        (so every layer counts alike whatever the residual stream's scale)."""
        if len(student) != len(teacher) or any(s.shape != t.shape for s, t in zip(student, teacher)):
            raise PassError("recover: loss=kd-hidden compares each decoder layer's output with the "
                            "reference's, and their layers or widths differ",
                            hint="run recover before compress (on the masked model)")
        errors = []
        for s, t in zip(student, teacher, strict=True):
            s, t = s.float(), t.float()
            if keep is not None:
                keep_here = keep.to(s.device)
                s, t = s * keep_here, t * keep_here
            errors.append((s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12))
        return torch.stack(errors).mean()

    def text_batch(self, data: RecoveryData, source_weights: dict[str, float], step: int) -> torch.Tensor:
        """The global text batch of ``step``: a source drawn with ``source_weights``, then its
        windows, both at the step's place in the data after the cursor."""
        names = data.source_names
        name = source_for_step(names, source_weights, self.seed, data.first + step)
        index = names.index(name)
        return batch_for_step(data.windows[index].train, self.batch, self.seed + index, data.first + step)

    def probe_losses(self, harness: LoraHarness, net: torch.nn.Module,
                     windows: list[SourceWindows]) -> dict[str, float]:
        """Every source's probe loss; rank 0's on every rank, so all sample alike."""
        runtime = harness.runtime
        was_training = net.training
        net.eval()
        with torch.no_grad(), runtime.autocast():
            out = {s.name: net(probe, labels=probe).loss.item()
                   for s, probe in ((s, runtime.to_device(s.probe)) for s in windows)}
        net.train(was_training)
        return runtime.broadcast_object(out)

    def record_probe(self, harness: LoraHarness, model: IRModel, windows: list[SourceWindows],
                     state: RecoverState) -> None:
        """Probe every source at ``state.step``, reweight the sources by their degradation
        (``sampling=dynamic``), and log the probe."""
        current = self.probe_losses(harness, model, windows)
        if self.sampling == "dynamic":
            state.weights = degradation_weights(current, state.reference_losses)
        entry = {"step": state.step, "stage": 1 if state.step < self.stage1_length else 2,
                 "ppl": {n: math.exp(v) for n, v in current.items()},
                 "reference_ppl": {n: math.exp(v) for n, v in state.reference_losses.items()},
                 "weights": dict(state.weights)}
        state.probes.append(entry)
        harness.write_log(entry, sort_keys=True)

    def _instruction_rows(self, rows: InstructionRows, step: int) -> torch.Tensor:
        """Row indices of a stage-2 instruction step (seeded epochs, as batch_for_step);
        ``step`` counts from the data cursor of the first run on the module."""
        index = torch.arange(len(rows.input_ids))
        if len(index) < self.batch:
            return index
        return batch_for_step(index, self.batch, self.seed, step - self.stage1_length)
