"""`lhspg`: progressive structured pruning while LoRA trains (LoRAShear's LHSPG, DESIGN.md 5).

Over ``periods`` periods of ``steps`` optimizer steps, the pass trains only the LoRA factors
(AdamW, LM loss) and, after every step, applies the half-space projection to the groups
chosen so far: each chosen group's LoRA part is merged into its base slice, the slice shrinks
by ``lambda_g * W_g / ||W_g||``, and it is zeroed once it leaves the half-space (always at
its period's end). At the start of a period the next share of the target is chosen by
saliency among the units not yet chosen. The kernels of :mod:`lorashear.kernels` do the
projection (Triton on CUDA, the torch reference elsewhere), through a
:class:`~lorashear.kernels.ProjectionPlan` prepared once per period.

``lambda_g = lam * ||W_g||_0 / shrink steps``, with ``||W_g||_0`` the group's norm when its period
starts: a linear schedule that would reach zero at the shrink's end. DHSPG's gradient-
adaptive lambda is not implemented (base weights have no gradients here); the forced zeroing
at each period's end keeps the guarantee.

``settle`` splits each period: the shrink spans its first ``(1 - settle) * steps`` steps and
ends with the forced zeroing; the remaining steps train LoRA with the period's groups held at
zero, so the last period does not end the pass the very step its groups vanish. The default
0.75 is what ``bench/bench_lhspg_ablation.py`` measured best on SmolLM2 at 50% (48 steps:
held-out Austen ppl 288 with one period, against 310 at 0.5, 340 at 0.9, 375 with two periods
and no settling; one-shot taylor + as many ``recover`` steps: 353 without a learning-rate
warmup, 292 with recover's default warmup). With
``rescore`` the taylor scores of every period after the first are taken on the live model
(trained LoRA, earlier groups at zero) instead of once before training. ``warmup`` raises
the learning rate linearly, as in ``recover``; it is off by default because on a fresh LoRA the
ablation measured it worse (48 steps, settle 0.75: 350 with a 16-step warmup against 288
without): a slow start leaves the shrink nobody to hand its knowledge to.

``attn-share`` splits the removal between attention and the other kinds as in ``prune``;
with ``auto`` the split of the whole ``ratio`` is measured once, before training, on the
model as it comes (the calibration windows that score the groups, each distinct split's units
zeroed on the live model and restored), and every period allocates with the share chosen;
a checkpoint keeps the choice. ``ratio`` counts the parameters of every family of ``kinds``,
as in ``prune``: families a ``knowledge`` analysis protects give none, the others the more.
``metric`` defaults to ``wanda``: with the split measured, it
chose better units than ``taylor`` on SmolLM2 at 20% and 50% in both benchmarks that compared them
(held-out Austen after the pass, 12 steps from an adapted LoRA: 87.6 vs 100.4 and 248.0 vs 303.4
in the side-by-side, 89.9 vs 98.5 and 220.4 vs 245.6 in the ablation).

The result is the masked model plus the
``prune-mask`` attribute (``compress`` slices it away) and an ``lhspg-log`` attribute.

``device``, ``precision`` and ``grad-checkpoint`` and data parallelism under ``torchrun`` come
from :mod:`lorashear.training.runtime`: every rank trains on its slice of the same global batch,
the LoRA gradients are all-reduced, and the projection runs on every rank alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
from tqdm.auto import tqdm

from lorashear.analysis.allocation import (
    AttnShare,
    FamilyBudget,
    check_attn_share,
    check_reachable,
    choose_units,
    families_to_prune,
    family_budgets,
    fixed_attn_share,
    has_split,
    masked_loss_fn,
    search_attn_share,
)
from lorashear.analysis.groups import GroupsAttr, PruneMaskAttr, check_kinds, param_units_numel
from lorashear.analysis.manager import AnalysisManager
from lorashear.analysis.saliency import (
    MetricName,
    check_metric,
    model_gradient_scores,
    score_groups,
)
from lorashear.data.calibration import TextData, text_data
from lorashear.errors import PassError
from lorashear.ir.attributes import RecordListAttr, register_attribute
from lorashear.ir.core import Module
from lorashear.ir.storage import DataStorage
from lorashear.ir.types import torch_dtype
from lorashear.kernels import GroupedWeight, ProjectionPlan, group_norms
from lorashear.passes.base import ModulePass, PassResult, option
from lorashear.passes.options import (
    attn_share_option,
    device_option,
    grad_checkpoint_option,
    precision_option,
    warmup_option,
)
from lorashear.passes.pipeline import format_pass
from lorashear.passes.registry import register_pass
from lorashear.runtime.executor import IRModel, lora_param_names
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
    TrainingRuntime,
    check_device_text,
    check_warmup,
    set_warmup_lr,
    tensors_of,
    warmup_steps,
)


@register_attribute
@dataclass(frozen=True)
class LhspgLogAttr(RecordListAttr):
    """What LHSPG did, per period: units chosen, mean loss, share of chosen groups at zero."""

    kind: ClassVar[str] = "lhspg-log"
    records_field: ClassVar[str] = "periods"
    periods: tuple[dict, ...]


@dataclass
class GroupIndex:
    """Global group ids (family offset + unit) and the grouped weights the kernels read."""

    offsets: dict[int, int]
    num_groups: int
    weights: list[GroupedWeight]
    touched: list[str]  # names of every parameter the projection may change

    def gid(self, family_id: int, unit: int) -> int:
        return self.offsets[family_id] + unit


def build_group_index(module: Module, model: IRModel, groups: GroupsAttr, family_ids: list[int]
                      ) -> GroupIndex:
    """Row/column group ids per base weight; LoRA factors ride along with their base weight."""
    offsets, total = {}, 0
    for f in family_ids:
        offsets[f] = total
        total += groups.families[f].size
    lora_of: dict[str, tuple[str, str, float]] = {}
    for op in module.graph.ops:
        if op.kind == "lora_linear":
            lora_of[op.args[1].name] = (op.args[3].name, op.args[4].name, float(op.kwargs["scaling"]))
    lora = lora_param_names(module)
    ids: dict[str, list[torch.Tensor]] = {}
    for f in family_ids:
        family = groups.families[f]
        for m in family.members:
            if m.param in lora:
                continue
            shape = module.params[m.param].type.shape
            if m.axis > 1:
                raise PassError(f"lhspg: @{m.param} is grouped along axis {m.axis}; only rows "
                                "and columns of 1-D/2-D weights are supported")
            axes = ids.setdefault(m.param, [torch.full((shape[0],), -1, dtype=torch.int32),
                                            torch.full((shape[1] if len(shape) > 1 else 1,), -1,
                                                       dtype=torch.int32)])
            unit = (torch.arange(shape[m.axis]) // m.stride) % family.size
            if (axes[m.axis] >= 0).any():
                raise PassError(f"lhspg: @{m.param} axis {m.axis} belongs to two chosen families")
            axes[m.axis] = (unit + offsets[f]).to(torch.int32)
    weights, touched = [], []
    device = model.device
    for name, (rows, cols) in ids.items():
        rows, cols = rows.to(device), cols.to(device)
        tensor = model.tensor(name)
        view = tensor.data if tensor.dim() == 2 else tensor.data.view(-1, 1)
        a_name, b_name, scaling = lora_of.get(name, (None, None, 1.0))
        lora_a = model.tensor(a_name).data if a_name else None
        lora_b = model.tensor(b_name).data if b_name else None
        weights.append(GroupedWeight(view, rows.to(view.device), cols.to(view.device),
                                     lora_b, lora_a, scaling))
        touched += [n for n in (name, a_name, b_name) if n]
    return GroupIndex(offsets, total, weights, touched)


@register_pass
@dataclass(frozen=True)
class Lhspg(ModulePass):
    """Progressively zero the least salient groups while LoRA training moves their knowledge."""

    name: ClassVar[str] = "lhspg"
    requires_attributes: ClassVar[dict[str, str]] = {"groups": "discover"}
    ratio: float = option(0.2, "share of the parameters of the chosen kinds to remove, in [0, 1)")
    periods: int = option(3, "pruning periods; each chooses the next share of the target")
    steps: int = option(20, "optimizer steps per period")
    lr: float = option(1e-3, "AdamW learning rate of the LoRA factors")
    warmup: int = warmup_option(0, "for an adapter trained before; a fresh LoRA measured worse "
                                  "with it, since the shrink then outpaces LoRA")
    lam: float = option(1.0, "shrink strength: lambda_g = lam * ||W_g|| at period start / shrink steps")
    eps: float = option(0.0, "half-space margin: zero a group when <x~_g, W_g> < eps ||W_g||^2")
    settle: float = option(0.75, "share of each period's steps that train LoRA after the period's "
                           "groups are forced to zero (the shrink spans the rest; 0: the "
                           "groups reach zero at the period's last step)")
    metric: MetricName = option("wanda", "saliency metric choosing the groups (wanda: weights x "
                                "activation norms on the training text; taylor: gradients there; "
                                "magnitude is worse than random on SmolLM2)")
    rescore: bool = option(False, "taylor: score the groups again at every period's start, on the "
                           "model as trained so far (else the scores before training choose all)")
    kinds: tuple[str, ...] = option(("attn", "mlp"), "group kinds to prune (attn, mlp, hidden)")
    scope: Literal["per-layer", "global"] = option("per-layer", "allocation, as in prune")
    attn_share: AttnShare = attn_share_option("auto")  # lhspg always has data to measure on
    data: str = option("", "training text: a text/JSON/Parquet file (model's tokenizer), a .ids file "
                       "of token ids, a cached source name, or a YAML data spec (steps draw sources by weight)")
    seq_len: int = option(128, "tokens per training window")
    batch: int = option(4, "windows per step")
    seed: int = option(0, "seed of data order and the random metric")
    log: str = option("", "append one JSON line per step to this file (loss, sparsity)")
    checkpoint_dir: str = option("", "save a checkpoint here at every period's end and resume "
                                 "from it when present (a killed run continues exactly)")
    progress: bool = option(True, "show a progress bar per period")
    cuda_graph: bool = option(False, "replay the per-step projection as a CUDA graph (Triton on "
                              "CUDA; cuts launch overhead; not yet measured on a GPU)")
    device: str = device_option()
    precision: Precision = precision_option()
    grad_checkpoint: bool = grad_checkpoint_option()

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise PassError(f"lhspg ratio must be in [0, 1), got {self.ratio}")
        if self.periods < 1 or self.steps < 1:
            raise PassError("lhspg periods and steps must be at least 1")
        if not 0.0 <= self.settle < 1.0:
            raise PassError(f"lhspg settle must be in [0, 1), got {self.settle}")
        check_warmup(self.name, self.warmup)
        check_attn_share(self.name, self.attn_share, self.kinds)
        check_metric(self.metric)
        if self.rescore and self.metric != "taylor":
            raise PassError(f"lhspg rescore needs metric=taylor (got {self.metric}): only taylor "
                            "scores the live model", hint="metric=taylor, or rescore=false")
        check_kinds(self.name, self.kinds)
        if not self.data:
            raise PassError("lhspg needs training data", hint="lhspg{data=book.txt}, a .ids file, a cached source (data=austen) or a YAML data spec")
        check_device_text(self.name, self.device)

    @property
    def shrink_steps(self) -> int:
        """Steps of a period that shrink its groups (the last one forces them to zero)."""
        return max(1, self.steps - round(self.settle * self.steps))

    def training_data(self, module: Module) -> TextData:
        """Every source's non-overlapping ``seq_len`` windows of the training data."""
        data = text_data(module, self.data, self.seq_len, "lhspg")
        data.check_batch(self.batch, "lhspg")
        return data

    def run(self, module: Module, am: AnalysisManager) -> PassResult:
        groups: GroupsAttr = module.attributes["groups"]
        of_kinds, protected = families_to_prune(module, groups, self.kinds)
        families = [f for f in of_kinds if f.id not in protected]  # the ones that may lose units
        if not lora_param_names(module):
            raise PassError("lhspg trains LoRA adapters, and the module has none",
                            hint="lower with --adapter DIR or --lora-rank R")
        runtime = TrainingRuntime.create(self.name, self.device, self.precision, self.grad_checkpoint)
        runtime.check_batch(self.batch)
        data = self.training_data(module)
        # the data is read once: these windows score the groups, choose the split and rescore
        calibration = data.draw(min(4, data.count // self.batch), self.batch, self.seed)
        # every rank scores alike; rank 0's scores choose the groups, so all ranks agree
        scores = runtime.broadcast_object(score_groups(
            module, groups, self.metric, seed=self.seed, family_ids=[f.id for f in families],
            batches=calibration))
        start_budgets = family_budgets(module, of_kinds, scores, {}, protected)
        check_reachable(start_budgets, self.ratio)
        runtime.seed(self.seed)
        model = runtime.build_model(module)
        index = build_group_index(module, model, groups, [f.id for f in families])
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.lr, weight_decay=0.0)
        chosen_units: dict[int, tuple[int, ...]] = {}
        chosen = torch.zeros(index.num_groups, dtype=torch.bool)
        period_log: list[dict] = []
        step_total, first_period, first_loss = 0, 0, None
        # where and with how much memory a run trains does not change its result
        owner = format_pass(replace(self, checkpoint_dir="", progress=True, log="", device="auto",
                                    grad_checkpoint=False))
        names = {id(p): n for n, p in model.named_parameters()}
        synced = set(index.touched) | {names[id(p)] for p in trainable}
        resumed = load_checkpoint(self.checkpoint_dir, owner) if self.checkpoint_dir else None
        if resumed is not None:
            with torch.no_grad():
                for name in synced:
                    model.tensor(name).copy_(resumed.tensors[name])
            restore_optimizer(optimizer, dict(model.named_parameters()), resumed.tensors)
            chosen_units = {int(f): tuple(u) for f, u in resumed.state["chosen_units"].items()}
            for f_id, units in chosen_units.items():
                for u in units:
                    chosen[index.gid(f_id, u)] = True
            step_total, first_period = resumed.state["step_total"], resumed.state["period"] + 1
            period_log, first_loss = resumed.state["period_log"], resumed.state["first_loss"]
            runtime.restore_rng(resumed.tensors, self.seed, step_total)
            if self.log and runtime.is_main:
                trim_log_after(self.log, step_total)
        log_file = open(self.log, "a", encoding="utf-8") if self.log and runtime.is_main else None  # noqa: SIM115
        shrink_steps = self.shrink_steps
        if resumed is not None and "split" in resumed.state:  # the split the killed run settled on
            attn_share, split_stats = resumed.state["attn_share"], resumed.state["split"]
        elif resumed is not None:  # written before attn-share=auto, whose default was proportional
            attn_share, split_stats = fixed_attn_share(self.attn_share), {}
        else:
            attn_share, split_stats = self.choose_split(module, groups, model, runtime, start_budgets,
                                                        calibration)
        warmup = warmup_steps(self.warmup, self.periods * self.steps)
        # every period's rescoring runs on the same calibration windows
        rescore_batches = calibration if self.rescore else None
        try:
            for period in range(first_period, self.periods):
                target = self.ratio * (period + 1) / self.periods
                if rescore_batches is not None and period > 0:
                    scores = runtime.broadcast_object(model_gradient_scores(
                        model, module, groups, [f.id for f in families],
                        (runtime.to_device(b) for b in rescore_batches), autocast=runtime.autocast))
                budgets = family_budgets(module, of_kinds, scores, chosen_units, protected)
                chosen_units = choose_units(budgets, target, self.scope, attn_share=attn_share)
                current = torch.zeros_like(chosen)
                for f_id, units in chosen_units.items():
                    for u in units:
                        gid = index.gid(f_id, u)
                        current[gid] = not chosen[gid]
                        chosen[gid] = True
                chosen_here, current_here = runtime.to_device(chosen), runtime.to_device(current)
                start_norms = group_norms(index.weights, index.num_groups)
                lambdas = torch.where(current_here, self.lam * start_norms / shrink_steps,
                                      torch.zeros_like(start_norms))
                # groups of earlier periods are exactly zero: the plan only clears their LoRA
                plan = ProjectionPlan(index.weights, current_here, done=chosen_here & ~current_here,
                                      cuda_graph=self.cuda_graph)
                losses = []
                bar = tqdm(range(self.steps), desc=f"lhspg period {period + 1}/{self.periods}",
                           disable=not runtime.progress(self.progress), leave=False)
                for step in bar:
                    (batch,) = runtime.local(data.training_batch(self.batch, self.seed, step_total))
                    with runtime.autocast():
                        loss = model(batch, labels=batch).loss
                    set_warmup_lr(optimizer, self.lr, step_total, warmup)
                    # full windows: every rank holds the same number of tokens
                    loss_value = runtime.step(loss, optimizer, trainable, 1.0 / runtime.world_size)
                    stats = plan.step(lambdas, eps=self.eps, force=step == shrink_steps - 1)
                    if step == shrink_steps - 1 and shrink_steps < self.steps:
                        # settling: this period's groups are zero now and stay so, like earlier ones
                        plan = ProjectionPlan(index.weights, torch.zeros_like(chosen_here),
                                              done=chosen_here, cuda_graph=self.cuda_graph)
                    zero_share = float(stats.zeroed[chosen_here].float().mean()) if chosen.any() else 0.0
                    losses.append(loss_value)
                    first_loss = loss_value if first_loss is None else first_loss
                    step_total += 1
                    bar.set_postfix(loss=f"{loss_value:.3f}", zero=f"{zero_share:.2f}")
                    row = {"period": period, "step": step_total, "loss": loss_value,
                           "chosen": int(chosen.sum()), "chosen_zero_share": zero_share}
                    if log_file:  # flushed: a live plot (or a kill) sees every finished step
                        log_file.write(json.dumps(row) + "\n")
                        log_file.flush()
                period_log.append({"period": period, "chosen": int(chosen.sum()), "new": int(current.sum()),
                                   "mean_loss": sum(losses) / len(losses), "last_loss": losses[-1]})
                runtime.sync_tensors(tensors_of(model, synced))
                if self.checkpoint_dir:
                    tensors = {n: model.tensor(n) for n in synced}
                    tensors.update(optimizer_tensors(optimizer, names))
                    tensors.update(runtime.rng_tensors())  # a collective: every rank takes part
                if self.checkpoint_dir and runtime.is_main:
                    save_checkpoint(self.checkpoint_dir, TrainingCheckpoint(owner, {
                        "period": period, "step_total": step_total, "first_loss": first_loss,
                        "period_log": period_log, "attn_share": attn_share, "split": split_stats,
                        "chosen_units": {str(f): list(u) for f, u in chosen_units.items()}}, tensors))
        finally:
            if log_file:
                log_file.close()
        with torch.no_grad():
            for name in synced:  # the projected base slices and the trained LoRA factors
                ir_dtype = torch_dtype(module.params[name].type.dtype)
                module.params[name].storage = DataStorage(
                    model.tensor(name).detach().to(device="cpu", dtype=ir_dtype).clone())
        module.attributes["prune-mask"] = PruneMaskAttr.from_dict(chosen_units)
        module.attributes["lhspg-log"] = LhspgLogAttr(tuple(period_log))
        prunable = sum(param_units_numel(module, f) * f.size for f in of_kinds)
        taken = sum(param_units_numel(module, f) * len(chosen_units.get(f.id, ())) for f in of_kinds)
        return PassResult(True, frozenset(), {
            "groups zeroed": int(chosen.sum()), "parameter share removed": round(taken / prunable, 6),
            "first loss": first_loss, "last loss": period_log[-1]["last_loss"], **split_stats})

    def choose_split(self, module: Module, groups: GroupsAttr, model: IRModel, runtime: TrainingRuntime,
                     budgets: list[FamilyBudget],
                     calibration: torch.Tensor) -> tuple[float | None, dict]:
        """The fixed attention share every period allocates with (None: proportional) and the
        statistics of the search when ``attn-share=auto``: the split of the whole ``ratio``
        whose masked model has the least loss on the calibration windows, before training."""
        if self.attn_share != "auto" or not has_split(budgets):
            return fixed_attn_share(self.attn_share), {}
        batches = [runtime.to_device(b) for b in calibration]
        loss_of = masked_loss_fn(model, module, groups, batches, autocast=runtime.autocast)
        # every rank measures alike; rank 0's choice counts, so all ranks prune the same units
        split = runtime.broadcast_object(search_attn_share(budgets, self.ratio, self.scope, 1, loss_of))
        return split.share, split.statistics()
