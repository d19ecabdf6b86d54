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
zero, so the last period does not end the pass the very step its groups vanish: the LoRA that
survives gets steps to take over what the zeroed groups did. The default 0.75 is the schedule
``bench/bench_lhspg_ablation.py`` measured best (``bench/RESULTS.md``, "LHSPG schedule at
50%": against other settle shares, against more periods without settling, and against one-shot
pruning followed by as many ``recover`` steps). With ``rescore`` the taylor scores of every
period after the first are taken on the live model (trained LoRA, earlier groups at zero)
instead of once before training. ``warmup`` raises the learning rate linearly, as in
``recover``; it is off by default because on a fresh LoRA the same ablation measured it worse:
a slow start leaves the shrink nobody to hand its knowledge to.

``attn-share`` splits the removal between attention and the other kinds as in ``prune``;
with ``auto`` the split of the whole ``ratio`` is measured once, before training, on the
model as it comes (the calibration windows that score the groups, each distinct split's units
zeroed on the live model and restored), and every period allocates with the share chosen;
a checkpoint keeps the choice. ``ratio`` counts the parameters of every family of ``kinds``,
as in ``prune``: families a ``knowledge`` analysis protects give none, the others the more.
``metric`` defaults to ``wanda``: with the split measured, it chose better units than
``taylor`` on SmolLM2 at 20% and 50% in both benchmarks that compared them (``bench/RESULTS.md``:
"`lhspg` choosing by wanda" and the `attn-share=auto` rows of the ablations).

With ``reconstruct=true``, what each shrink step takes from the period's attn/mlp groups'
consumer columns (``o_proj`` and ``down_proj`` inputs) is folded into the surviving columns
as it goes, by least squares on the calibration windows of the live model at the period's
start (:mod:`lorashear.passes.progressive_fold`); the groups and the steps are the same as
without it, which is the default. ``batches`` sets how many calibration windows of ``batch``
score the groups, measure the split and solve the fold. With training text that covers the
text the model will serve, ``metric=obs,batches=16,reconstruct=true`` measured best at both
ratios benchmarked (``bench/RESULTS.md``: "`lhspg` choosing by obs on 16 batches and folding
what each shrink step takes"); the fold wants several times the consumers' input widths in
calibration tokens, and obs and the fold fit the calibration text, so on text it does not
cover they measured worse than the defaults (the demo's section there).

The result is the masked model plus the
``prune-mask`` attribute (``compress`` slices it away) and an ``lhspg-log`` attribute.

Device, precision, data parallelism under ``torchrun``, the optimizer, checkpoints, the step
log and the write-back into the IR are the :class:`~lorashear.training.harness.LoraHarness`'s:
every rank trains on its slice of the same global batch, the LoRA gradients are all-reduced,
and the projection runs on every rank alike. With ``shard=fsdp2`` each rank holds a row-chunk
of every weight and LoRA B (FSDP2): the projection reads and writes only this rank's rows, its
per-group sums (norms, inner products of the trial point with the base slice) are summed over
the ranks between its passes, and only the small LoRA A factors are gathered whole for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from lorashear.analysis.allocation import (
    Align,
    AttnShare,
    FamilyBudget,
    check_attn_share,
    check_reachable,
    check_uniform,
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
from lorashear.analysis.obs import COMPARABLE_METRICS
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
from lorashear.ir.lora import adapters
from lorashear.kernels import GroupedWeight, ProjectionPlan, group_norms, group_sq_norms
from lorashear.passes.base import ModulePass, PassResult, option
from lorashear.passes.options import (
    attn_share_option,
    device_option,
    grad_checkpoint_option,
    precision_option,
    shard_option,
    warmup_option,
)
from lorashear.passes.progressive_fold import ProgressiveFold
from lorashear.passes.reconstruct import DEFAULT_DAMP, FOLDED_KINDS
from lorashear.passes.registry import register_pass
from lorashear.passes.resume import result_text
from lorashear.runtime.executor import IRModel, lora_param_names
from lorashear.training.harness import LoraHarness
from lorashear.training.runtime import (
    Precision,
    Shard,
    TrainingRuntime,
    check_device_text,
    check_shard_text,
    check_warmup,
    local_rows_of,
    whole,
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
    #: sharded model: (LoRA A parameter, its whole copy the kernels read and write), per weight
    gathered: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def gid(self, family_id: int, unit: int) -> int:
        return self.offsets[family_id] + unit

    def gather(self) -> None:
        """Sharded: refresh the whole copies of the LoRA A factors (r x in each: the only
        tensors gathered for the projection; a base row's update ``B[row] @ A`` needs every
        row of A, and a column group zeroes a column of A on every rank)."""
        for param, copy in self.gathered:
            copy.copy_(whole(param))

    def scatter(self) -> None:
        """Sharded: write this rank's rows of the projected A copies back into the shards."""
        for param, copy in self.gathered:
            local, start = local_rows_of(param)
            local.copy_(copy[start:start + local.shape[0]])


def build_group_index(module: Module, model: IRModel, groups: GroupsAttr, family_ids: list[int],
                      *, sharded: bool = False) -> GroupIndex:
    """Row/column group ids per base weight; LoRA factors ride along with their base weight.

    ``sharded`` (FSDP2): each grouped weight is this rank's rows of the base weight (and of
    LoRA B, sharded alike), with their row group ids; LoRA A is a whole copy
    (:meth:`GroupIndex.gather`). The projection then sums its per-group partial sums over the
    ranks (:class:`~lorashear.kernels.ProjectionPlan`'s ``reduce``)."""
    offsets, total = {}, 0
    for f in family_ids:
        offsets[f] = total
        total += groups.families[f].size
    lora_of = {parts.weight.name: (parts.lora_a.name, parts.lora_b.name, parts.scaling)
               for _, parts in adapters(module)}
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
            unit = m.unit_of(shape[m.axis], family.size)
            inside = unit >= 0  # a member may cover a range of the axis (a fused projection's piece)
            if (axes[m.axis][inside] >= 0).any():
                raise PassError(f"lhspg: @{m.param} axis {m.axis} belongs to two chosen families")
            axes[m.axis][inside] = (unit[inside] + offsets[f]).to(torch.int32)
    weights, touched, gathered = [], [], []
    device = model.device
    for name, (rows, cols) in ids.items():
        rows, cols = rows.to(device), cols.to(device)
        tensor = model.tensor(name)
        a_name, b_name, scaling = lora_of.get(name, (None, None, 1.0))
        if sharded:
            local, start = local_rows_of(tensor)
            rows = rows[start:start + local.shape[0]]
            view = local if local.dim() == 2 else local.view(-1, 1)
            lora_a = lora_b = None
            if a_name:
                lora_b, b_start = local_rows_of(model.tensor(b_name))
                if (b_start, lora_b.shape[0]) != (start, local.shape[0]):
                    raise PassError(f"lhspg: @{b_name} is not sharded by the rows of @{name}")
                lora_a = whole(model.tensor(a_name)).clone()
                gathered.append((model.tensor(a_name), lora_a))
        else:
            view = tensor.data if tensor.dim() == 2 else tensor.data.view(-1, 1)
            lora_a = model.tensor(a_name).data if a_name else None
            lora_b = model.tensor(b_name).data if b_name else None
        weights.append(GroupedWeight(view, rows.to(view.device), cols.to(view.device),
                                     lora_b, lora_a, scaling))
        touched += [n for n in (name, a_name, b_name) if n]
    return GroupIndex(offsets, total, weights, touched, gathered)


@dataclass
class LhspgState:
    """Where an lhspg run stands: the units chosen so far (by family and as global group ids),
    the steps taken, the periods' log and the attention split; its checkpoint holds all of it."""

    chosen_units: dict[int, tuple[int, ...]]
    chosen: torch.Tensor  # bool per global group id
    attn_share: float | None
    split: dict[str, Any]  # the statistics of the attn-share=auto search ({} without one)
    period_log: list[dict]
    next_period: int = 0
    step_total: int = 0
    first_loss: float | None = None

    @classmethod
    def restore(cls, state: dict[str, Any], index: GroupIndex, attn_share: AttnShare) -> LhspgState:
        """The state a checkpoint saved at a period's end; one written before ``attn-share=auto``
        has no split, and continues with ``attn_share`` fixed (its default was proportional)."""
        chosen_units = {int(f): tuple(u) for f, u in state["chosen_units"].items()}
        chosen = torch.zeros(index.num_groups, dtype=torch.bool)
        for f_id, units in chosen_units.items():
            for u in units:
                chosen[index.gid(f_id, u)] = True
        share, split = ((state["attn_share"], state["split"]) if "split" in state
                        else (fixed_attn_share(attn_share), {}))
        return cls(chosen_units, chosen, share, split, state["period_log"], state["period"] + 1,
                   state["step_total"], state["first_loss"])

    def checkpoint_state(self, period: int) -> dict[str, Any]:
        """What a checkpoint at the end of ``period`` saves (JSON)."""
        return {"period": period, "step_total": self.step_total, "first_loss": self.first_loss,
                "period_log": self.period_log, "attn_share": self.attn_share, "split": self.split,
                "chosen_units": {str(f): list(u) for f, u in self.chosen_units.items()}}

    def choose(self, index: GroupIndex, chosen_units: dict[int, tuple[int, ...]]) -> torch.Tensor:
        """Take ``chosen_units`` (this period's choice, the earlier ones included); returns the
        groups new in this period."""
        self.chosen_units = chosen_units
        current = torch.zeros_like(self.chosen)
        for f_id, units in chosen_units.items():
            for u in units:
                gid = index.gid(f_id, u)
                current[gid] = not self.chosen[gid]
                self.chosen[gid] = True
        return current


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
    reconstruct: bool = option(False, "fold what each shrink step takes from the period's attn/mlp "
                               "groups' consumer columns (o_proj, down_proj inputs) into the "
                               "surviving columns, by least squares on the calibration windows "
                               "(the reconstruct pass's algebra)")
    damp: float = option(DEFAULT_DAMP, "reconstruct=true: ridge added to X_K X_K^T, as a share of its "
                         "mean diagonal (>= 0), as in reconstruct")
    settle: float = option(0.75, "share of each period's steps that train LoRA after the period's "
                           "groups are forced to zero (the shrink spans the rest; 0: the "
                           "groups reach zero at the period's last step)")
    metric: MetricName = option("wanda", "saliency metric choosing the groups (wanda: weights x "
                                "activation norms on the training text; taylor: gradients there; "
                                "magnitude is worse than random on SmolLM2; obs: the output error "
                                "left after a least-squares fold, as with reconstruct=true)")
    rescore: bool = option(False, "taylor: score the groups again at every period's start, on the "
                           "model as trained so far (else the scores before training choose all)")
    kinds: tuple[str, ...] = option(("attn", "mlp"), "group kinds to prune (attn, mlp, hidden)")
    scope: Literal["per-layer", "global"] = option("per-layer", "allocation, as in prune")
    uniform: bool = option(False, "every layer keeps the same number of units of each kind, as in prune")
    align: Align = option(1, "round each MLP family's kept count to a multiple of this, as in prune")
    attn_share: AttnShare = attn_share_option("auto")  # lhspg always has data to measure on
    data: str = option("", "training text: a text/JSON/Parquet file (model's tokenizer), a .ids file "
                       "of token ids, a cached source name, or a YAML data spec (steps draw sources by weight)")
    seq_len: int = option(128, "tokens per training window")
    batch: int = option(4, "windows per step")
    batches: int = option(4, "calibration batches (of batch x seq-len tokens, drawn from data) "
                          "that score the groups, measure attn-share=auto and solve reconstruct's fold")
    seed: int = option(0, "seed of data order and the random metric")
    log: str = option("", "append one JSON line per step to this file (loss, sparsity)",
                      run_only=True)
    checkpoint_dir: str = option("", "save a checkpoint here at every period's end and resume "
                                 "from it when present (a killed run continues exactly)",
                                 run_only=True)
    progress: bool = option(True, "show a progress bar per period", run_only=True)
    cuda_graph: bool = option(False, "replay the per-step projection as a CUDA graph (Triton on "
                              "CUDA; cuts launch overhead; not yet measured on a GPU)")
    device: str = device_option()
    precision: Precision = precision_option()
    grad_checkpoint: bool = grad_checkpoint_option()
    shard: Shard = shard_option()

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise PassError(f"lhspg ratio must be in [0, 1), got {self.ratio}")
        if self.periods < 1 or self.steps < 1 or self.batches < 1:
            raise PassError("lhspg periods, steps and batches must be at least 1")
        if not 0.0 <= self.settle < 1.0:
            raise PassError(f"lhspg settle must be in [0, 1), got {self.settle}")
        if not self.damp >= 0 or self.damp == float("inf"):
            raise PassError(f"lhspg damp must be a finite number >= 0, got {self.damp}")
        check_warmup(self.name, self.warmup)
        check_attn_share(self.name, self.attn_share, self.kinds)
        check_uniform(self.name, self.uniform, self.scope)
        if self.align != "auto" and self.align < 1:
            raise PassError(f"lhspg align must be at least 1 or auto, got {self.align}")
        check_metric(self.metric)
        if self.rescore and self.metric != "taylor":
            raise PassError(f"lhspg rescore needs metric=taylor (got {self.metric}): only taylor "
                            "scores the live model", hint="metric=taylor, or rescore=false")
        check_kinds(self.name, self.kinds)
        if not self.data:
            raise PassError("lhspg needs training data", hint="lhspg{data=book.txt}, a .ids file, a cached source (data=austen) or a YAML data spec")
        check_device_text(self.name, self.device)
        check_shard_text(self.name, self.shard)
        if self.shard == "fsdp2":
            for asked, what in ((self.cuda_graph, "cuda-graph=true (the projection all-reduces "
                                 "its group sums between kernels)"),
                                (self.rescore, "rescore=true (taylor scores of the live model)"),
                                (self.reconstruct, "reconstruct=true (least squares on whole "
                                 "live weights)")):
                if asked:
                    raise PassError(f"lhspg: shard=fsdp2 does not support {what}",
                                    hint="drop the option, or shard=none")

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
        if self.uniform:  # protected by their share of the uniform budget, not by their width
            protected = set()
        family_ids = [f.id for f in of_kinds if f.id not in protected]  # the ones that may lose units
        harness = LoraHarness.create(self, module, owner=result_text(self),
                                     total_steps=self.periods * self.steps)
        runtime = harness.runtime
        data = self.training_data(module)
        # the data is read once: these windows score the groups, choose the split and rescore
        calibration = data.draw(min(self.batches, data.count // self.batch), self.batch, self.seed)
        # every rank scores alike; rank 0's scores choose the groups, so all ranks agree;
        # sharded, one decoder layer at a time (the model need not fit one device)
        scores = runtime.broadcast_object(score_groups(
            module, groups, self.metric, seed=self.seed, family_ids=family_ids, batches=calibration,
            placement=runtime.placement, progress=runtime.progress(self.progress),
            **({"layerwise": True} if runtime.sharded else {})))
        start_budgets = family_budgets(module, of_kinds, scores, {}, protected,
                                       comparable=self.metric in COMPARABLE_METRICS)
        check_reachable(start_budgets, self.ratio)
        model = harness.build(module, self.seed)
        index = build_group_index(module, model, groups, family_ids, sharded=runtime.sharded)
        harness.track(index.touched)  # the projection changes base slices in place
        saved = harness.resume("step_total")
        if saved is not None:
            state = LhspgState.restore(saved, index, self.attn_share)
        else:
            share, split = self.choose_split(module, groups, model, runtime, start_budgets, calibration)
            state = LhspgState({}, torch.zeros(index.num_groups, dtype=torch.bool), share, split, [])
        with harness.logging():
            for period in range(state.next_period, self.periods):
                if self.rescore and period > 0:  # on the same calibration windows every period
                    scores = runtime.broadcast_object(model_gradient_scores(
                        model, module, groups, family_ids,
                        (runtime.to_device(b) for b in calibration), autocast=runtime.autocast))
                budgets = family_budgets(module, of_kinds, scores, state.chosen_units, protected,
                                         comparable=self.metric in COMPARABLE_METRICS)
                target = self.ratio * (period + 1) / self.periods
                earlier = state.chosen_units
                current = state.choose(index, choose_units(budgets, target, self.scope, self.align,
                                                           state.attn_share, self.uniform))
                fold = self.progressive_fold(module, groups, model, runtime, calibration, earlier,
                                             state.chosen_units) if self.reconstruct else None
                losses = self.train_period(harness, data, index, state, current, period, fold)
                state.period_log.append({"period": period, "chosen": int(state.chosen.sum()),
                                         "new": int(current.sum()), "mean_loss": sum(losses) / len(losses),
                                         "last_loss": losses[-1]})
                if fold is not None:
                    state.period_log[-1]["reconstruct_error_left"] = fold.error_left
                harness.checkpoint(state.checkpoint_state(period))
        harness.write_back(module)  # the projected base slices and the trained LoRA factors
        module.attributes["prune-mask"] = PruneMaskAttr.from_dict(state.chosen_units)
        module.attributes["lhspg-log"] = LhspgLogAttr(tuple(state.period_log))
        prunable = sum(param_units_numel(module, f) * f.size for f in of_kinds)
        taken = sum(param_units_numel(module, f) * len(state.chosen_units.get(f.id, ())) for f in of_kinds)
        return PassResult(True, frozenset(), {
            "groups zeroed": int(state.chosen.sum()), "parameter share removed": round(taken / prunable, 6),
            "first loss": state.first_loss, "last loss": state.period_log[-1]["last_loss"], **state.split})

    def progressive_fold(self, module: Module, groups: GroupsAttr, model: IRModel,
                         runtime: TrainingRuntime, calibration: torch.Tensor,
                         earlier: dict[int, tuple[int, ...]],
                         chosen: dict[int, tuple[int, ...]]) -> ProgressiveFold:
        """``reconstruct=true``: the fold of this period's new attn/mlp units (``chosen`` less
        ``earlier``) into the survivors, solved on the live model at the period's start."""
        new = {f: tuple(u for u in units if u not in set(earlier.get(f, ())))
               for f, units in chosen.items()}
        folded = {f: units for f, units in new.items()
                  if units and groups.families[f].kind in FOLDED_KINDS}
        with runtime.autocast():
            return ProgressiveFold.prepare(model, module, groups, chosen, folded,
                                           [runtime.to_device(b) for b in calibration], self.damp)

    def train_period(self, harness: LoraHarness, data: TextData, index: GroupIndex, state: LhspgState,
                     current: torch.Tensor, period: int, fold: ProgressiveFold | None = None) -> list[float]:
        """One period's steps: train LoRA, then project the period's ``current`` groups (shrink
        them, zero them at the shrink's last step; with a ``fold``, what each shrink step takes
        is folded into the survivors) and clear the LoRA of earlier ones; returns the steps'
        losses."""
        runtime, shrink_steps = harness.runtime, self.shrink_steps
        chosen_here, current_here = runtime.to_device(state.chosen), runtime.to_device(current)
        # sharded: each rank's rows give partial group sums, summed over the ranks
        reduce = runtime.sum_over_ranks if runtime.sharded else None
        if reduce is None:
            start_norms = group_norms(index.weights, index.num_groups)
        else:
            start_norms = group_sq_norms(index.weights, index.num_groups)
            reduce(start_norms)
            start_norms = start_norms.sqrt()
        lambdas = torch.where(current_here, self.lam * start_norms / shrink_steps,
                              torch.zeros_like(start_norms))
        # groups of earlier periods are exactly zero: the plan only clears their LoRA
        plan = ProjectionPlan(index.weights, current_here, done=chosen_here & ~current_here,
                              cuda_graph=self.cuda_graph, reduce=reduce)
        losses = []
        bar = harness.bar(range(self.steps), f"lhspg period {period + 1}/{self.periods}")
        for step in bar:
            (batch,) = runtime.local(data.training_batch(self.batch, self.seed, state.step_total))
            with runtime.autocast():
                loss = harness.model(batch, labels=batch).loss
            loss_value = harness.step(loss, state.step_total)
            shrinking = fold is not None and step < shrink_steps
            before = fold.removed_parts() if shrinking else None
            index.gather()  # sharded: the whole LoRA A factors (else nothing)
            stats = plan.step(lambdas, eps=self.eps, force=step == shrink_steps - 1)
            index.scatter()
            if shrinking:
                fold.fold(before)
            if step == shrink_steps - 1 and shrink_steps < self.steps:
                # settling: this period's groups are zero now and stay so, like earlier ones
                plan = ProjectionPlan(index.weights, torch.zeros_like(chosen_here),
                                      done=chosen_here, cuda_graph=self.cuda_graph, reduce=reduce)
            zero_share = float(stats.zeroed[chosen_here].float().mean()) if state.chosen.any() else 0.0
            losses.append(loss_value)
            state.first_loss = loss_value if state.first_loss is None else state.first_loss
            state.step_total += 1
            bar.set_postfix(loss=f"{loss_value:.3f}", zero=f"{zero_share:.2f}")
            harness.write_log({"period": period, "step": state.step_total, "loss": loss_value,
                               "chosen": int(state.chosen.sum()), "chosen_zero_share": zero_share})
        return losses

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
        with runtime.masks_on_shards():  # sharded: each split's units zeroed on every rank's rows
            split = runtime.broadcast_object(search_attn_share(budgets, self.ratio, self.scope,
                                                               self.align, loss_of, self.uniform))
        return split.share, split.statistics()
