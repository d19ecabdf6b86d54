"""`knowledge{gamma=...}`: knowledge-distribution analysis (LoRAShear; DESIGN.md 4).

Zero each family of groups as a whole (one layer's attention, one layer's MLP) on held-out
calibration text, measure how much the LM loss rises, and mark the most sensitive ``gamma``
share of the families unprunable: ``prune`` and ``lhspg`` leave them alone and take their
``ratio`` from the other families, so the model shrinks as much as without the analysis. The first and
last layers usually come out on top. Families are zeroed in place on one executor and
restored bit-exactly, and each loss reruns the model only from the family's layer on (the
values before it are recorded once, :class:`~lorashear.runtime.executor.SuffixLoss`), with the
result of full forwards, more cheaply. With ``layerwise`` (models larger than the device) one
walk brings the decoder layers in one at a time and runs every family's zeroed copy from its
own layer on alongside the model (:func:`~lorashear.analysis.layerwise.variant_losses`): the
same losses, each layer read once.

``spread=S`` grades the rest as well (OWL-style, Yin et al. 2024, on the loss increases rather
than outlier counts): within each kind the unprotected families are ranked by loss increase and
the least sensitive prunes ``1 + S`` times the kind's average share, the most sensitive ``1 - S``
times it, linearly by rank in between; the kind still gives its share in total. ``spread=0`` (the
default) leaves every unprotected family the same share: grading did not clearly help where it
was measured.

What ``gamma`` and ``spread`` did to held-out perplexity, and what the analysis costs, is in
``bench/RESULTS.md``, "Ablations and component measurements", the row "knowledge-distribution
analysis before ``lhspg``" (``bench/bench_lhspg_ablation.py``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from lorashear.analysis.groups import GroupsAttr, check_kinds
from lorashear.analysis.knowledge import KnowledgeAttr
from lorashear.analysis.layerwise import use_layerwise, variant_losses, zero_edit
from lorashear.analysis.manager import ALL, AnalysisManager
from lorashear.data.calibration import CalibrationOptions, calibration_batches
from lorashear.errors import PassError
from lorashear.ir.core import Module
from lorashear.passes.base import ModulePass, PassResult, option
from lorashear.passes.options import (
    Layerwise,
    check_placement_text,
    device_option,
    layerwise_option,
    placement_of,
    run_precision_option,
)
from lorashear.passes.registry import register_pass
from lorashear.runtime.executor import IRModel, SuffixLoss
from lorashear.training.runtime import Precision


@register_pass
@dataclass(frozen=True)
class Knowledge(ModulePass):
    """Mark the families whose removal hurts the LM loss most (share gamma) unprunable."""

    name: ClassVar[str] = "knowledge"
    requires_attributes: ClassVar[dict[str, str]] = {"groups": "discover"}
    gamma: float = option(0.1, "share of the families (of the chosen kinds) to protect, in [0, 1)")
    spread: float = option(0.0, "grade the other families' pruning shares within a kind from 1+spread "
                           "(least sensitive) to 1-spread (most) times the average, in [0, 1); 0: equal shares")
    kinds: tuple[str, ...] = option(("attn", "mlp"), "family kinds to analyse")
    data: str = option("", "held-out text: a text/JSON/Parquet file (model's tokenizer), a .ids file "
                       "of token ids, a cached source name, or a YAML data spec")
    batches: int = option(4, "calibration batches")
    batch: int = option(2, "windows per batch")
    seq_len: int = option(128, "tokens per window")
    seed: int = option(0, "seed of the window choice")
    progress: bool = option(True, "show a progress bar", run_only=True)
    device: str = device_option("run the model")
    precision: Precision = run_precision_option()
    layerwise: Layerwise = layerwise_option()

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma < 1.0:
            raise PassError(f"knowledge gamma must be in [0, 1), got {self.gamma}")
        if not 0.0 <= self.spread < 1.0:
            raise PassError(f"knowledge spread must be in [0, 1), got {self.spread}")
        check_kinds(self.name, self.kinds)
        check_placement_text(self)

    def run(self, module: Module, am: AnalysisManager) -> PassResult:
        groups: GroupsAttr = module.attributes["groups"]
        families = [f for f in groups.families if f.kind in self.kinds]
        if not families:
            raise PassError(f"no group families of kinds {','.join(self.kinds)} to analyse")
        windows = calibration_batches(
            module, CalibrationOptions(self.data, self.batches, self.batch, self.seq_len, self.seed),
            "knowledge")
        placement = placement_of(self)
        if use_layerwise(self.name, self.layerwise, module, placement):
            # one walk through the layers: every family's loss from its own layer on
            base, losses = variant_losses(module, windows, placement, {
                f.id: {m.param: zero_edit for m in f.members} for f in families})
            increase = {f.id: losses[f.id] - base for f in families}
        else:
            base, increase = self.family_increases(families, placement.model(module),
                                                   [placement.to_device(w) for w in windows],
                                                   placement.autocast)
        count = math.ceil(self.gamma * len(families)) if self.gamma > 0 else 0
        ranked = sorted(increase, key=lambda f: -increase[f])
        protected = tuple(sorted(ranked[:count]))
        module.attributes["knowledge"] = KnowledgeAttr(base, tuple(sorted(increase.items())), protected,
                                                     self.spread)
        layers = sorted({groups.families[f].layer for f in protected if groups.families[f].layer is not None})
        return PassResult(True, ALL, {"families analysed": len(families),
                                                   "families protected": len(protected),
                                                   "protected layers": layers, "base loss": base})

    def family_increases(self, families: list, model: IRModel, windows: list[torch.Tensor],
                         autocast: Callable[[], Any]) -> tuple[float, dict[int, float]]:
        """(base loss, each family's loss increase) with the whole model on its device: each
        family zeroed in place, its loss rerun from its first layer on, restored bit-exactly."""
        with autocast():
            losses = SuffixLoss(model, windows)
        base = losses.base
        increase: dict[int, float] = {}
        for family in tqdm(families, desc="knowledge", disable=not self.progress, leave=False):
            saved = []
            with torch.no_grad():
                for m in family.members:
                    tensor = model.tensor(m.param)
                    saved.append((tensor, tensor.detach().clone()))
                    tensor.data.zero_()
                with autocast():
                    increase[family.id] = losses.loss({m.param for m in family.members}) - base
                for tensor, original in saved:
                    tensor.data.copy_(original)
        return base, increase
