"""Allocation: how many units of each group family a pruning ratio removes, and which.

Shared by the one-shot ``prune`` pass and ``lhspg``.

``ratio`` is the share of the *prunable parameters* to remove: the parameters held by the
units of every family of the chosen ``kinds`` (``param_units_numel`` x size). Kinds are
served coarsest unit first (a KV head before a hidden channel before an MLP channel): each
gets its share of what is still to remove, rounded to whole units, and the last kind absorbs
the rounding, so the total lands within about one unit of the target. DESIGN.md section 9's
"one of 3 KV groups + 239 MLP channels per layer at 20%" is exactly this allocation.
``attn-share=S`` instead gives the attention kind the share S of the parameters to remove and
the other kinds the rest: with few KV groups per layer (SmolLM2 has 3) removing one is a large
step, and ``attn-share=0`` beat the proportional default there (``bench/RESULTS.md``,
"Ablations and component measurements": "allocation and warmup from an adapted LoRA" and
"``attn-share=auto`` against the outcome"). ``attn-share=auto`` measures the
split instead of guessing it: the proportional one and each of :data:`AUTO_SHARES` give a set
of units, every distinct set is zeroed in turn on a live model (restored bit-exactly after) and
its LM loss taken on the calibration windows, and the least loss wins -- one forward pass per
distinct split and calibration batch, no copy of the weights.

- ``scope=per-layer``: every family of a kind loses the same share of its units (the same
  count when the families are the same size), the lowest-scoring ones; shapes stay uniform
  across layers, so a stock ``config.json`` still describes the model (unless a ``knowledge``
  analysis protects some families: they keep their full size). The price: when one
  coarse unit per layer is more than the finer kinds can balance (a tiny MLP beside a KV
  head), the total can miss the ratio by up to half a coarse unit per layer.
- ``scope=global``: units of one kind compete across families on scores normalised by
  their family's RMS (layers score on different scales); shapes may differ per layer. The
  ``obs`` metrics' scores are a share of the family's output already and compete as they are.

- ``uniform=true`` (with ``scope=per-layer``): every family of a kind keeps the same count of
  units, so each layer has the same widths and the stock ``config.json`` describes the result
  (stock transformers, vLLM, TGI and llama.cpp's converter need that). The count is the one of
  its whole-unit (or ``align``-multiple) neighbours whose removal lands nearest the kind's
  target that the finer kinds can still balance, as ``per-layer`` rounds; which units go is
  each family's own lowest scores. A ``knowledge`` analysis does not widen the families it
  protects (that would break uniformity): they are scored and give the uniform count like every
  other, so a sensitive layer is protected by its share of the uniform budget -- it gives its
  equal share and never more, where ``scope=global`` can take more from it -- and the units it
  gives are its least salient. Graded weights (``spread``) do not apply either.

No family ever loses every unit. ``align=N`` rounds each MLP (and ``other``) family's kept
count to a multiple of N; attention and hidden families are left in whole units (a KV head
already is a hardware-friendly block; the hidden size is one global choice). ``align=auto``
is :data:`AUTO_ALIGN` for families of at least :data:`AUTO_ALIGN_MIN_UNITS` units and 1 for
narrower ones (a tiny model's MLP would lose whole tens of percent to the rounding). Units an
earlier pass already removed (an existing ``prune-mask``) stay removed and count towards
the ratio. Families a ``knowledge`` analysis protects give no units, but their parameters stay
in the ratio's base: after ``knowledge{gamma=0.1}``, ``ratio=0.2`` still removes 20% of the
attention + MLP parameters, all of it from the other families (an error names the ratio the
unprotected families cannot reach). A graded analysis (``knowledge{spread=S}``) also weights the
other families' shares: per-layer, a family takes its kind's share times its weight (the share
solved so that the kind still gives its part); global, its normalised scores are divided by its
weight. The result is the masked model plus a ``prune-mask`` attribute that ``compress`` slices away.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lorashear.analysis.groups import (
    GroupFamily,
    GroupsAttr,
    param_units_numel,
)
from lorashear.analysis.knowledge import allocation_weights, protected_families
from lorashear.analysis.masking import units_zeroed
from lorashear.errors import PassError
from lorashear.ir.core import Module

#: Kinds whose units are whole blocks already; ``align`` leaves them alone.
UNALIGNED_KINDS = frozenset({"attn", "hidden"})
#: ``align=auto``: the multiple GPU matrix kernels like for MLP widths (tensor-core tiles)...
AUTO_ALIGN = 64
#: ... for families this wide at least (rounding then moves a family's count by at most 1/16).
AUTO_ALIGN_MIN_UNITS = 8 * AUTO_ALIGN
#: What ``align`` takes: a multiple of at least 1, or ``auto``.
Align = int | Literal["auto"]


def family_align(align: Align, family: GroupFamily) -> int:
    """The multiple ``family``'s kept count is rounded to under ``align`` (1: none)."""
    if family.kind in UNALIGNED_KINDS:
        return 1
    if align == "auto":
        return AUTO_ALIGN if family.size >= AUTO_ALIGN_MIN_UNITS else 1
    return int(align)


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


@dataclass(frozen=True)
class FamilyBudget:
    """One family as the allocation sees it: its scores, unit size and fixed removals.

    A ``protected`` family (a knowledge analysis shielded it) gives no units, but its
    parameters still count in the base of the ratio, so the other families give that much more.
    ``weight`` multiplies the share of its units the family gives relative to the others of its
    kind (a graded knowledge analysis, ``spread``; 1.0: the same share as every other).
    ``comparable`` scores compare across families as they are (``obs``: a share of the
    family's output), so ``scope=global`` does not divide them by the family's RMS.
    ``keep`` units always stay: one, or for experts as many as their router's top-k chooses.
    """

    family: GroupFamily
    scores: torch.Tensor
    unit_numel: int
    already: tuple[int, ...]
    protected: bool = False
    weight: float = 1.0
    comparable: bool = False
    keep: int = 1

    @property
    def most(self) -> int:
        """The most units the family can give (all but ``keep``)."""
        return max(self.family.size - self.keep, 0)

    def ranked(self) -> list[int]:
        """Units in removal order: already removed first, then by ascending score."""
        already = set(self.already)
        rest = [u for u in torch.argsort(self.scores, stable=True).tolist() if u not in already]
        return [*sorted(already), *rest]

    def normalised(self) -> torch.Tensor:
        """Scores divided by their RMS over the units not yet removed (0 when all are 0); the
        scores themselves when they are ``comparable``."""
        if self.comparable:
            return self.scores
        free = torch.ones(self.family.size, dtype=torch.bool)
        free[list(self.already)] = False
        rms = self.scores[free].pow(2).mean().sqrt() if free.any() else torch.tensor(0.0)
        return self.scores / rms if rms > 0 else torch.zeros_like(self.scores)


def align_count(removed: int, size: int, align: int, already: int) -> int:
    """Units to remove so that the kept count is the multiple of ``align`` nearest to
    ``size - removed``: at least ``align`` kept, never fewer removed than ``already``."""
    kept = _half_up((size - removed) / align) * align
    kept = min(max(kept, align), (size // align) * align)
    return max(size - kept, already)


def _select_per_layer(budgets: list[FamilyBudget], target: float, remaining: float,
                      later_capacity: float) -> dict[int, int]:
    """The same share of every family, rounded down, to nearest or up: whichever leaves the
    finer kinds served later a remainder they can absorb (``0 <= rest <= later_capacity``),
    then whichever is nearest to ``target``. One KV group too many per layer cannot be taken
    back by MLP channels, so a coarse kind must not overshoot what the rest can balance."""
    free = [b for b in budgets if not b.protected]
    share = _weighted_share(free, target)

    def counts(rounding) -> dict[int, int]:
        chosen = {b.family.id: len(b.already) for b in budgets if b.protected}
        chosen.update({b.family.id: min(max(rounding(share * b.weight * b.family.size), len(b.already)),
                                        b.most) for b in free})
        return chosen

    return _best_rounding(budgets, target, remaining, later_capacity, counts)


def _best_rounding(budgets: list[FamilyBudget], target: float, remaining: float,
                   later_capacity: float, counts) -> dict[int, int]:
    """Of ``counts(rounding)`` for rounding to nearest, down and up, the first whose remainder
    the later kinds can absorb best (``0 <= rest <= later_capacity``), then nearest ``target``."""
    best: tuple[float, float] | None = None
    chosen: dict[int, int] = {}
    for rounding in (_half_up, math.floor, math.ceil):
        candidate = counts(rounding)
        taken = sum(b.unit_numel * candidate[b.family.id] for b in budgets)
        rest = remaining - taken
        cost = (max(0.0, -rest) + max(0.0, rest - later_capacity), abs(taken - target))
        if best is None or cost < best:
            best, chosen = cost, candidate
    return chosen


def _select_uniform(budgets: list[FamilyBudget], target: float, remaining: float,
                     later_capacity: float, align: Align) -> dict[int, int]:
    """``uniform=true``: one kept count for every family of the kind (a multiple of the
    families' ``align`` when they are wide enough to allow one), chosen among the neighbours of
    the count that removes ``target`` as :func:`_select_per_layer` chooses its rounding."""
    step = max(family_align(align, b.family) for b in budgets)
    most = min(b.family.size - len(b.already) for b in budgets)  # never fewer removed than before
    least = max(b.keep for b in budgets)  # every family keeps at least its own minimum
    per_unit = sum(b.unit_numel for b in budgets)
    exact = (sum(b.unit_numel * b.family.size for b in budgets) - target) / per_unit / step
    high = (most // step) * step or most

    def counts(rounding) -> dict[int, int]:
        kept = min(max(rounding(exact) * step, min(step, high), least), high)
        return {b.family.id: b.family.size - kept for b in budgets}

    return _best_rounding(budgets, target, remaining, later_capacity, counts)


def _weighted_share(free: list[FamilyBudget], target: float) -> float:
    """The share ``s`` of units that, taken as ``s * weight`` of each family (at most all but
    one unit), removes ``target`` parameters; with every weight 1 simply target / parameters.
    A family that a large weight caps leaves its excess to the others (bisection)."""
    total = sum(b.unit_numel * b.weight * b.family.size for b in free)
    if not total:
        return 0.0
    share = min(max(target / total, 0.0), 1.0)
    if all(b.weight == 1.0 for b in free):
        return share

    def removed(s: float) -> float:
        return sum(b.unit_numel * min(s * b.weight * b.family.size, b.most) for b in free)

    low, high = share, 1.0 / min(b.weight for b in free)
    if removed(low) >= target:
        return low
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if removed(middle) < target else (low, middle)
    return high


def _select_global(budgets: list[FamilyBudget], target: float) -> dict[int, int]:
    counts = {b.family.id: len(b.already) for b in budgets}
    removed = sum(b.unit_numel * len(b.already) for b in budgets)
    candidates = []
    for b in budgets:
        if b.protected:
            continue
        normalised = b.normalised() / b.weight  # a family that gives more ranks its units lower
        candidates += [(float(normalised[u]), b.family.id, u, b) for u in b.ranked()[len(b.already):]]
    candidates.sort(key=lambda c: (c[0], c[1], c[2]))
    for _, family_id, _, b in candidates:
        if counts[family_id] + 1 > b.most:
            continue
        if removed + b.unit_numel / 2 <= target:  # take it if that lands nearer the target
            counts[family_id] += 1
            removed += b.unit_numel
    return counts


def choose_units(budgets: list[FamilyBudget], ratio: float, scope: str, align: Align = 1,
                 attn_share: float | None = None, uniform: bool = False) -> dict[int, tuple[int, ...]]:
    """Units to remove per family id: ``ratio`` of the parameters of the ``budgets``' families
    (protected ones included, though they give no units), lowest scores first. ``uniform``:
    every family of a kind keeps the same count (the caller protects no family then).

    With ``attn_share``, the attention kind is served first and takes that share of the
    parameters to remove (rounded to whole units); the other kinds split the rest as usual.
    Without it every kind takes a share in proportion to its parameters.
    """
    by_kind: dict[str, list[FamilyBudget]] = {}
    for b in budgets:
        by_kind.setdefault(b.family.kind, []).append(b)
    for b in budgets:
        if b.family.kind not in UNALIGNED_KINDS and align != "auto" and align > b.family.size:
            raise PassError(f"align={align} is larger than family {b.family.id} ({b.family.kind}, "
                            f"layer {b.family.layer}), which has {b.family.size} groups")
    kind_params = {k: sum(b.unit_numel * b.family.size for b in bs) for k, bs in by_kind.items()}
    # coarsest units first; finer kinds absorb the rounding of coarser ones
    order = sorted(by_kind, key=lambda k: -kind_params[k] / sum(b.family.size for b in by_kind[k]))
    capacity = {k: sum(b.unit_numel * b.most for b in bs if not b.protected)
                for k, bs in by_kind.items()}
    remaining = ratio * sum(kind_params.values())
    fixed: dict[str, float] = {}
    if attn_share is not None and "attn" in by_kind:
        fixed["attn"] = attn_share * remaining
        order = ["attn", *(k for k in order if k != "attn")]
    params_left = sum(v for k, v in kind_params.items() if k not in fixed)
    removed: dict[int, tuple[int, ...]] = {}
    for index, kind in enumerate(order):
        kind_budgets = by_kind[kind]
        last = index == len(order) - 1
        if kind in fixed:
            target = fixed[kind]
        else:
            target = max(remaining if last else remaining * kind_params[kind] / params_left, 0.0)
        later = sum(capacity[k] for k in order[index + 1:])
        if uniform:
            counts = _select_uniform(kind_budgets, target, remaining, later, align)
        elif scope == "per-layer":
            counts = _select_per_layer(kind_budgets, target, remaining, later)
        else:
            counts = _select_global(kind_budgets, target)
        for b in kind_budgets:
            count = counts[b.family.id]
            multiple = family_align(align, b.family)
            if multiple > 1 and not b.protected and not uniform:
                count = align_count(count, b.family.size, multiple, len(b.already))
            removed[b.family.id] = tuple(sorted(b.ranked()[:count]))
            remaining -= count * b.unit_numel
        if kind not in fixed:
            params_left -= kind_params[kind]
    return removed


#: What ``attn-share`` takes: a share in [0, 1], ``proportional`` or ``auto``.
AttnShare = float | Literal["proportional", "auto"]
#: The fixed shares that ``attn-share=auto`` tries besides the proportional allocation: fine
#: enough that every whole number of KV groups per layer a ratio allows is among the splits
#: (on SmolLM2 at 50% one KV group per layer is 17% of the removal), and cheap, since only
#: distinct splits are measured (per-layer: at most one per KV-group count).
AUTO_SHARES: tuple[float, ...] = tuple(i / 20 for i in range(21))


def check_attn_share(pass_name: str, attn_share: AttnShare, kinds: tuple[str, ...]) -> None:
    """A :class:`PassError` naming the pass when ``attn_share`` is out of range or has nothing
    to act on."""
    if attn_share in ("proportional", "auto"):
        return  # auto with attention alone, or none, has one split: the proportional one
    if not 0.0 <= attn_share <= 1.0:
        raise PassError(f"{pass_name} attn-share must be in [0, 1], proportional or auto, got {attn_share}")
    if "attn" not in kinds:
        raise PassError(f"{pass_name} attn-share={attn_share} needs attn among the kinds, got "
                        f"kinds={','.join(kinds)}")
    if attn_share < 1.0 and set(kinds) <= {"attn"}:
        raise PassError(f"{pass_name} attn-share={attn_share} leaves {1 - attn_share:.0%} of the "
                        "removal to other kinds, and kinds=attn has none", hint="add mlp to kinds")


def check_uniform(pass_name: str, uniform: bool, scope: str) -> None:
    """A :class:`PassError` naming the pass when ``uniform`` meets ``scope=global``."""
    if uniform and scope == "global":
        raise PassError(f"{pass_name} uniform=true keeps every layer's widths the same, and "
                        "scope=global lets them differ", hint="drop scope=global (per-layer is the default)")


@dataclass(frozen=True)
class SplitChoice:
    """The allocation ``attn-share=auto`` settled on and what it measured on the way."""

    share: float | None  # None: proportional
    removed: dict[int, tuple[int, ...]]
    #: (candidate, attention units it removes, masked calibration loss), in the order tried
    tried: tuple[tuple[str, int, float], ...]

    @property
    def label(self) -> str:
        return "proportional" if self.share is None else f"{self.share:g}"

    def statistics(self) -> dict[str, Any]:
        return {"attn-share chosen": self.label,
                "attn-share losses": {c: round(loss, 4) for c, _, loss in self.tried}}


def families_to_prune(module: Module, groups: GroupsAttr, kinds: tuple[str, ...]
                      ) -> tuple[list[GroupFamily], set[int]]:
    """The families of ``kinds`` and the ids of those a knowledge analysis protects (they give
    no units but count in the ratio's base); fails when there are none, or all are protected."""
    families = [f for f in groups.families if f.kind in kinds]
    if not families:
        found = sorted({f.kind for f in groups.families})
        raise PassError(f"no group families of kinds {','.join(kinds)} to prune "
                        f"(discover found {','.join(found) or 'none'})")
    protected = protected_families(module) & {f.id for f in families}
    if len(protected) == len(families):
        raise PassError(f"every family of kinds {','.join(kinds)} is protected by the knowledge analysis",
                        hint="lower knowledge's gamma")
    return families, protected


def family_budgets(module: Module, families: Iterable[GroupFamily], scores: dict[int, torch.Tensor],
                   removed: dict[int, tuple[int, ...]], protected: set[int], *,
                   comparable: bool = False) -> list[FamilyBudget]:
    """The budgets of ``families``: a protected one needs no scores (it gives no units); the
    weights come from the module's knowledge analysis (all 1.0 without a graded one).
    ``comparable``: the scores compare across families as they are (see :class:`FamilyBudget`)."""
    from lorashear.analysis.moe import experts_chosen

    families = list(families)
    weights = allocation_weights(module, families)
    routed = experts_chosen(module, families)
    return [FamilyBudget(f, torch.zeros(f.size, dtype=torch.float64) if f.id in protected
                         else scores[f.id].double(),
                         param_units_numel(module, f),
                         tuple(removed.get(f.id, ())), f.id in protected, weights[f.id], comparable,
                         max(routed.get(f.id, 1), 1))
            for f in families]


def check_reachable(budgets: list[FamilyBudget], ratio: float) -> None:
    """Fail when the families a knowledge analysis left prunable cannot give ``ratio`` of the
    parameters (each keeps at least one unit), rather than prune less than asked."""
    if not any(b.protected for b in budgets):
        return
    total = sum(b.unit_numel * b.family.size for b in budgets)
    free = sum(b.unit_numel * (len(b.already) if b.protected else b.most) for b in budgets)
    if ratio * total > free:
        shielded = sum(b.protected for b in budgets)
        raise PassError(f"ratio={ratio:g} asks for {ratio * total:,.0f} of {total:,} parameters, "
                        f"but with the {shielded} families the knowledge analysis protects the rest can give "
                        f"at most {free:,}", hint="lower ratio or knowledge's gamma")


def search_attn_share(budgets: list[FamilyBudget], ratio: float, scope: str, align: Align,
                      loss_of: Callable[[dict[int, tuple[int, ...]]], float],
                      uniform: bool = False) -> SplitChoice:
    """``attn-share=auto``: of the proportional split and each of :data:`AUTO_SHARES`, the one
    whose removal leaves the least loss (``loss_of`` the masked model). Splits that choose the
    same units are measured once; on a tie the earlier candidate (proportional first) wins."""
    attn = {b.family.id for b in budgets if b.family.kind == "attn"}
    seen: dict[tuple, float] = {}
    tried: list[tuple[str, int, float]] = []
    best: SplitChoice | None = None
    best_loss = math.inf
    for share in (None, *AUTO_SHARES):
        removed = choose_units(budgets, ratio, scope, align, share, uniform)
        key = tuple(sorted(removed.items()))
        if key in seen:
            continue
        seen[key] = loss = float(loss_of(removed))
        choice = SplitChoice(share, removed, ())
        tried.append((choice.label, sum(len(removed[f]) for f in attn), loss))
        if loss < best_loss:
            best, best_loss = choice, loss
    if best is None:  # every candidate gave a NaN loss
        raise PassError("attn-share=auto: the masked model's calibration loss is NaN for every split",
                        hint="check the calibration data, or give attn-share a number")
    return SplitChoice(best.share, best.removed, tuple(tried))


def has_split(budgets: list[FamilyBudget]) -> bool:
    """Whether there is a split to search: attention families beside families of other kinds."""
    kinds = {b.family.kind for b in budgets if not b.protected}
    return "attn" in kinds and len(kinds) > 1


def fixed_attn_share(attn_share: AttnShare) -> float | None:
    """``attn-share`` as ``choose_units`` takes it when no search runs (None: proportional).
    ``auto`` unsearched -- nothing to split, or a run from before auto existed -- is the
    proportional split."""
    return None if attn_share in ("proportional", "auto") else float(attn_share)


def masked_loss_fn(model: torch.nn.Module, module: Module, groups: GroupsAttr,
                   batches: Iterable[torch.Tensor], autocast: Callable[[], Any] = contextlib.nullcontext,
                   ) -> Callable[[dict[int, tuple[int, ...]]], float]:
    """``loss_of(removed)``: the mean LM loss over ``batches`` of ``model`` with those units
    zeroed in place, restored bit-exactly afterwards. It runs in eval mode (no LoRA dropout:
    the measure is deterministic, and a training pass's RNG stream is left as it was)."""
    batches = list(batches)

    def loss_of(removed: dict[int, tuple[int, ...]]) -> float:
        training = model.training
        model.eval()
        try:
            with torch.no_grad(), units_zeroed(model, module, groups, removed), autocast():
                return sum(float(model(b, labels=b).loss) for b in batches) / len(batches)
        finally:
            model.train(training)

    return loss_of


