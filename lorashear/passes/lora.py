"""`lora{rank=R}`: fold every LoRA adapter into its base weight and start a fresh one of rank R.

The passes that train (``lhspg``, ``recover``) train only the LoRA factors, so the adapter's
rank is their capacity (DESIGN.md 5 lists it among LHSPG's knobs). A user's adapter comes
with the rank it was tuned at; this pass sets another one without changing the model's
function: each ``lora_linear`` gets ``W <- W + s*B@A`` (as ``merge-lora``), then a fresh
``A`` of shape ``(R, in)`` drawn as peft draws it and ``B = 0`` of shape ``(out, R)``. The
factors keep their names, and the rank is no prunable axis (DESIGN.md 2), so the groups that
``discover`` found, and any masks, stay valid: ``lora{rank=32},recover{...}`` after
``compress`` recovers with four times the trainable parameters of an r=8 adapter. Run at the
same rank it restarts the adapters (their update so far kept in the weights), as ReLoRA does.

``alpha`` sets the new scaling ``alpha / R``; by default each adapter keeps its scaling, so a
learning rate means the same step per factor element at any rank. On a module lowered on
``meta`` the factors stay shapes only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lorashear.analysis.manager import AnalysisManager
from lorashear.analysis.masking import zero_groups
from lorashear.errors import PassError
from lorashear.ir.core import Module, Param
from lorashear.ir.lora import adapters, check_adapter_storage, fold_adapter
from lorashear.ir.storage import DataStorage, MetaStorage
from lorashear.ir.types import TensorType, torch_dtype
from lorashear.passes.base import ModulePass, PassResult, option
from lorashear.passes.registry import register_pass
from lorashear.runtime.executor import lora_param_names


def rerank_lora(module: Module, rank: int, *, alpha: float = 0.0, seed: int = 0) -> int:
    """Fold each ``lora_linear`` adapter into its weight and give it fresh factors of ``rank``
    (``alpha / rank`` scaling, or its own scaling when ``alpha`` is 0); returns the count."""
    from lorashear.frontend.pretrained import fresh_lora_factor

    check_adapter_storage(module, "lora")
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for op, parts in list(adapters(module)):
        real = fold_adapter(op)
        out_features, in_features = parts.weight.type.shape
        for factor, shape in ((parts.lora_a, (rank, in_features)), (parts.lora_b, (out_features, rank))):
            factor.type = TensorType(factor.type.dtype, shape)
            factor.storage = (DataStorage(fresh_lora_factor(factor.name, shape, generator)
                                          .to(torch_dtype(factor.type.dtype)))
                              if real else MetaStorage())
        if alpha:
            op.kwargs["scaling"] = alpha / rank
        count += 1
    return count


def _shared_factors(module: Module) -> list[str]:
    """Adapter weights and factors read by more than one op (rewriting them for one op would
    change the others)."""
    seen: dict[str, int] = {}
    for op in module.graph.ops:
        for param in op.params():
            seen[param.name] = seen.get(param.name, 0) + 1
    lora: list[Param] = [p for _, parts in adapters(module) for p in (parts.weight, *parts.factors)]
    return sorted({p.name for p in lora if seen[p.name] > 1})


@register_pass
@dataclass(frozen=True)
class Lora(ModulePass):
    """Fold each LoRA adapter into its weight and start a fresh one of another rank (same function)."""

    name: ClassVar[str] = "lora"

    rank: int = option(0, "rank of the fresh adapters (required)")
    alpha: float = option(0.0, "LoRA alpha of the fresh adapters, scaling = alpha / rank "
                               "(0: each adapter keeps its scaling)")
    seed: int = option(0, "seed of the fresh A factors")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise PassError(f"lora needs rank >= 1, got rank={self.rank}", hint="lora{rank=32}")
        if self.alpha < 0:
            raise PassError(f"lora needs alpha >= 0 (0 keeps each adapter's scaling), got alpha={self.alpha}")

    def run(self, module: Module, am: AnalysisManager) -> PassResult:
        factors = [parts.factors for _, parts in adapters(module)]
        if not factors:
            raise PassError("lora: the module has no LoRA adapters to re-rank",
                            hint="lower it with --lora-rank R or --adapter DIR")
        shared = _shared_factors(module)
        if shared:
            raise PassError(f"lora: @{shared[0]} is read by more than one op; re-ranking its "
                            "adapter would change the others")
        mask, groups = module.attributes.get("prune-mask"), module.attributes.get("groups")
        if mask is not None and groups is None:
            raise PassError("lora: the module has a prune-mask but no groups attribute")
        before = sum(p.type.numel() for pair in factors for p in pair)
        count = rerank_lora(module, self.rank, alpha=self.alpha, seed=self.seed)
        if mask is not None and all(module.params[n].storage.has_data for n in lora_param_names(module)):
            # the masked model: a fresh A has columns on removed input units; zero them (and
            # every other slice the mask removes), as the training passes keep them
            zero_groups(module, groups, mask.as_dict())
        after = sum(p.type.numel() for pair in factors for p in pair)
        return PassResult(True, frozenset(), {"adapters re-ranked": count, "rank": self.rank,
                                              "LoRA parameters before": before,
                                              "LoRA parameters after": after})
