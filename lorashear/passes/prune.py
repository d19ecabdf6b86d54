"""`prune`: one-shot structured pruning -- zero the lowest-saliency groups, no training.

The allocation it uses (how ``ratio``, ``scope``, ``attn-share``, ``align`` and a ``knowledge``
analysis decide the removed units) is :mod:`lorashear.analysis.allocation`.
"""


from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from lorashear.analysis.allocation import (
    Align,
    AttnShare,
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
from lorashear.analysis.coupling import DimensionCoupling
from lorashear.analysis.groups import (
    GroupsAttr,
    PruneMaskAttr,
    check_kinds,
)
from lorashear.analysis.layerwise import layerwise_masked_loss_fn, use_layerwise
from lorashear.analysis.manager import AnalysisManager
from lorashear.analysis.masking import zero_groups
from lorashear.analysis.obs import COMPARABLE_METRICS
from lorashear.analysis.saliency import (
    DATA_METRICS,
    MetricName,
    check_metric,
    score_groups,
)
from lorashear.analysis.scores import SaliencyAttr
from lorashear.data.calibration import calibration_batches
from lorashear.errors import PassError
from lorashear.ir.core import Module
from lorashear.passes.base import ModulePass, PassResult, option
from lorashear.passes.options import (
    OPTION_DOCS,
    Layerwise,
    attn_share_option,
    calibration_options,
    check_placement_text,
    device_option,
    layerwise_option,
    placement_of,
    run_precision_option,
)
from lorashear.passes.registry import register_pass
from lorashear.training.runtime import Precision


@register_pass
@dataclass(frozen=True)
class Prune(ModulePass):
    """Zero the lowest-saliency groups until `ratio` of the prunable parameters is gone."""

    name: ClassVar[str] = "prune"
    requires_attributes: ClassVar[dict[str, str]] = {"groups": "discover"}
    ratio: float = option(0.2, "share of the parameters of the chosen kinds to remove, in [0, 1)")
    metric: MetricName | None = option(None, "saliency metric; default: the scores of an earlier "
                                       "saliency pass, else magnitude")
    seed: int = option(0, OPTION_DOCS["seed"])
    scope: Literal["per-layer", "global"] = option(
        "per-layer", "per-layer: the same share of every family; global: compare normalised "
        "scores across the families of a kind")
    kinds: tuple[str, ...] = option(("attn", "mlp"), "group kinds to prune (attn, mlp, hidden, other)")
    align: Align = option(1, "round each MLP family's kept count to a multiple of this; auto: 64 "
                          "for families of at least 512 channels, else 1")
    uniform: bool = option(False, "every layer keeps the same number of units of each kind (the "
                           "stock config then describes the result); knowledge-protected layers "
                           "give the same count as the others")
    attn_share: AttnShare = attn_share_option()
    weights: tuple[float, ...] = option((1.0, 1.0, 1.0, 1.0, 1.0), OPTION_DOCS["weights"])
    data: str = option("", OPTION_DOCS["data"])
    batches: int = option(8, OPTION_DOCS["batches"])
    batch: int = option(4, OPTION_DOCS["batch"])
    seq_len: int = option(128, OPTION_DOCS["seq_len"])
    device: str = device_option("run the model (scoring, the attn-share=auto search)")
    precision: Precision = run_precision_option()
    layerwise: Layerwise = layerwise_option()

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise PassError(f"prune ratio must be in [0, 1), got {self.ratio}")
        if self.metric is not None:
            check_metric(self.metric, self.weights)
        check_kinds(self.name, self.kinds)
        if self.align != "auto" and self.align < 1:
            raise PassError(f"prune align must be at least 1 or auto, got {self.align}")
        check_uniform(self.name, self.uniform, self.scope)
        check_placement_text(self)
        check_attn_share(self.name, self.attn_share, self.kinds)
        if self.attn_share == "auto" and "attn" in self.kinds and len(self.kinds) > 1 and not self.data:
            raise PassError("prune attn-share=auto compares splits by their loss on calibration "
                            "text, and no data is given", hint="prune{attn-share=auto,data=PATH}")

    def scores(self, module: Module, groups: GroupsAttr, family_ids: list[int],
               read_batches: Callable[[], torch.Tensor]) -> tuple[str, dict]:
        """(metric, scores by family id): an earlier saliency pass's if it fits, else fresh (the
        data-driven metrics on the calibration windows ``read_batches`` gives)."""
        stored = module.attributes.get("saliency")
        if isinstance(stored, SaliencyAttr) and self.metric in (None, stored.metric):
            mismatch = stored.matches({f.id: f.size for f in groups.families})
            if mismatch:
                raise PassError(f"the saliency scores do not fit the groups: {mismatch}",
                                hint="run saliency again after discover")
            values = stored.as_dict()
            return stored.metric, {f: torch.tensor(values[f], dtype=torch.float64) for f in family_ids}
        metric = self.metric or "magnitude"
        placement = placement_of(self)
        return metric, score_groups(module, groups, metric, weights=self.weights, seed=self.seed,
                                    family_ids=family_ids,
                                    batches=read_batches() if metric in DATA_METRICS else None,
                                    placement=placement,
                                    layerwise=use_layerwise(self.name, self.layerwise, module, placement))

    def run(self, module: Module, am: AnalysisManager) -> PassResult:
        groups = module.attributes["groups"]
        if not isinstance(groups, GroupsAttr):
            raise PassError("the 'groups' attribute is not a groups attribute", hint="run discover")
        families, protected = families_to_prune(module, groups, self.kinds)
        if self.uniform:  # protected by their share of the uniform budget, not by their width
            protected = set()
        free = [f.id for f in families if f.id not in protected]
        # read at most once, for scoring and the split search alike, and only if one needs it
        read_batches = functools.cache(lambda: calibration_batches(module, calibration_options(self), "prune"))
        metric, scores = self.scores(module, groups, free, read_batches)
        mask = module.attributes.get("prune-mask")
        already = mask.as_dict() if isinstance(mask, PruneMaskAttr) else {}
        budgets = family_budgets(module, families, scores, already, protected,
                                 comparable=metric in COMPARABLE_METRICS)
        check_reachable(budgets, self.ratio)
        split = None
        if self.attn_share == "auto" and has_split(budgets):
            loss_of = self.masked_loss(module, groups, read_batches())
            split = search_attn_share(budgets, self.ratio, self.scope, self.align, loss_of, self.uniform)
            chosen = split.removed
        else:
            chosen = choose_units(budgets, self.ratio, self.scope, self.align,
                                  fixed_attn_share(self.attn_share), self.uniform)
        removed = {**already, **chosen}
        zero_groups(module, groups, removed)
        module.attributes["prune-mask"] = PruneMaskAttr.from_dict(removed)
        prunable = sum(b.unit_numel * b.family.size for b in budgets)
        taken = sum(b.unit_numel * len(removed.get(b.family.id, ())) for b in budgets)
        per_kind = Counter()
        for b in budgets:
            per_kind[b.family.kind] += len(removed.get(b.family.id, ()))
        statistics = {f"{kind} groups removed": n for kind, n in sorted(per_kind.items())}
        if protected:
            statistics["families protected"] = len(protected)
        statistics.update({"metric": metric, "prunable parameters": prunable,
                           "parameters removed": taken,
                           "parameter share removed": round(taken / prunable, 6) if prunable else 0.0})
        statistics.update(split.statistics() if split else {})
        return PassResult(True, frozenset({DimensionCoupling}), statistics)


    def masked_loss(self, module: Module, groups: GroupsAttr, batches: torch.Tensor
                    ) -> Callable[[dict[int, tuple[int, ...]]], float]:
        """``attn-share=auto``'s ``loss_of(removed)`` on the placement, whole or layer-wise."""
        placement = placement_of(self)
        if use_layerwise(self.name, self.layerwise, module, placement):
            return layerwise_masked_loss_fn(module, groups, batches, placement)
        return masked_loss_fn(placement.model(module), module, groups,
                              [placement.to_device(b) for b in batches], autocast=placement.autocast)
