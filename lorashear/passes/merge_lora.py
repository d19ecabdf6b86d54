"""Fold every LoRA adapter into its base weight: W <- W + scaling * B @ A.

The result is a plain ``linear`` per adapted layer and no LoRA parameters: what a deployed
model wants. The base weight keeps its name, so emitted checkpoints keep HF names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorashear.analysis.manager import AnalysisManager
from lorashear.ir.core import Module
from lorashear.ir.lora import merge_lora
from lorashear.passes.base import ModulePass, PassResult
from lorashear.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class MergeLora(ModulePass):
    """Fold LoRA adapters into their base weights (W + s*B@A) and drop the adapters."""

    name: ClassVar[str] = "merge-lora"

    def run(self, module: Module, am: AnalysisManager) -> PassResult:
        count = merge_lora(module)
        if not count:
            return PassResult.unchanged()
        return PassResult(True, frozenset(), {"adapters merged": count})
