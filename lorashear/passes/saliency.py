"""`saliency`: score every removable group (the metrics are :mod:`lorashear.analysis.saliency`)
and store the scores as the ``saliency`` attribute for ``prune`` and ``lhspg``.
"""


from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorashear.analysis.groups import GroupsAttr
from lorashear.analysis.manager import ALL, AnalysisManager
from lorashear.analysis.saliency import METRICS, MetricName, check_metric, score_groups
from lorashear.analysis.scores import SaliencyAttr
from lorashear.errors import PassError
from lorashear.ir.core import Module
from lorashear.passes.base import ModulePass, PassResult, option
from lorashear.passes.options import OPTION_DOCS, calibration_options
from lorashear.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class Saliency(ModulePass):
    """Score every removable group (magnitude, LoRA-proxy Taylor, taylor, wanda, random, ...)."""

    name: ClassVar[str] = "saliency"
    requires_attributes: ClassVar[dict[str, str]] = {"groups": "discover"}
    metric: MetricName = option("magnitude", f"one of {', '.join(METRICS)}")
    weights: tuple[float, ...] = option((1.0, 1.0, 1.0, 1.0, 1.0), OPTION_DOCS["weights"])
    data: str = option("", OPTION_DOCS["data"])
    batches: int = option(8, OPTION_DOCS["batches"])
    batch: int = option(4, OPTION_DOCS["batch"])
    seq_len: int = option(128, OPTION_DOCS["seq_len"])
    seed: int = option(0, OPTION_DOCS["seed"])

    def __post_init__(self) -> None:
        check_metric(self.metric, self.weights)

    def run(self, module: Module, am: AnalysisManager) -> PassResult:
        groups = module.attributes["groups"]
        if not isinstance(groups, GroupsAttr):
            raise PassError("the 'groups' attribute is not a groups attribute", hint="run discover")
        scores = score_groups(module, groups, self.metric, weights=self.weights,
                              calibration=calibration_options(self), seed=self.seed)
        module.attributes["saliency"] = SaliencyAttr.from_dict(self.metric, scores)
        return PassResult(True, ALL, {"families scored": len(scores),
                                                   "groups scored": sum(len(s) for s in scores.values())})
