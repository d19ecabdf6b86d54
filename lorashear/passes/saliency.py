"""`saliency`: score every removable group (the metrics are :mod:`lorashear.analysis.saliency`)
and store the scores as the ``saliency`` attribute for ``prune`` and ``lhspg``.
"""


from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorashear.analysis.groups import GroupsAttr
from lorashear.analysis.layerwise import use_layerwise
from lorashear.analysis.manager import ALL, AnalysisManager
from lorashear.analysis.saliency import METRICS, MetricName, check_metric, score_groups
from lorashear.analysis.scores import SaliencyAttr
from lorashear.errors import PassError
from lorashear.ir.core import Module
from lorashear.passes.base import ModulePass, PassResult, option
from lorashear.passes.options import (
    OPTION_DOCS,
    Layerwise,
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
class Saliency(ModulePass):
    """Score every removable group (magnitude, LoRA-proxy Taylor, taylor, wanda, random, ...).

    The model runs on ``device`` in ``precision`` (the weight-only metrics take their sums there,
    in float32); ``layerwise`` brings the decoder layers in one at a time (taylor: a layer-by-layer
    forward, then a layer-by-layer backward)."""

    name: ClassVar[str] = "saliency"
    requires_attributes: ClassVar[dict[str, str]] = {"groups": "discover"}
    metric: MetricName = option("magnitude", f"one of {', '.join(METRICS)}")
    weights: tuple[float, ...] = option((1.0, 1.0, 1.0, 1.0, 1.0), OPTION_DOCS["weights"])
    data: str = option("", OPTION_DOCS["data"])
    batches: int = option(8, OPTION_DOCS["batches"])
    batch: int = option(4, OPTION_DOCS["batch"])
    seq_len: int = option(128, OPTION_DOCS["seq_len"])
    seed: int = option(0, OPTION_DOCS["seed"])
    device: str = device_option("run the model")
    precision: Precision = run_precision_option()
    layerwise: Layerwise = layerwise_option()

    def __post_init__(self) -> None:
        check_metric(self.metric, self.weights)
        check_placement_text(self)

    def run(self, module: Module, am: AnalysisManager) -> PassResult:
        groups = module.attributes["groups"]
        if not isinstance(groups, GroupsAttr):
            raise PassError("the 'groups' attribute is not a groups attribute", hint="run discover")
        placement = placement_of(self)
        layerwise = self.metric != "random" and use_layerwise(self.name, self.layerwise, module, placement)
        scores = score_groups(module, groups, self.metric, weights=self.weights,
                              calibration=calibration_options(self), seed=self.seed,
                              placement=placement, layerwise=layerwise)
        module.attributes["saliency"] = SaliencyAttr.from_dict(self.metric, scores)
        return PassResult(True, ALL, {"families scored": len(scores),
                                                   "groups scored": sum(len(s) for s in scores.values())})
