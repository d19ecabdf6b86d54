"""Dead-code elimination: drop ops whose results nothing reads, and unused parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorashear.analysis.manager import AnalysisManager
from lorashear.ir.core import Module
from lorashear.passes.base import ModulePass, PassResult
from lorashear.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(ModulePass):
    """Remove ops whose results are never used and parameters no op reads."""

    name: ClassVar[str] = "dce"

    def run(self, module: Module, am: AnalysisManager) -> PassResult:
        ops = module.graph.remove_dead_ops()
        params = module.remove_unused_params()
        if not ops and not params:
            return PassResult.unchanged()
        return PassResult(True, frozenset(), {"ops removed": ops, "params removed": len(params)})
