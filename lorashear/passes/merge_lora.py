"""Fold every LoRA adapter into its base weight: W <- W + scaling * B @ A.

The result is a plain ``linear`` per adapted layer and no LoRA parameters: what a deployed
model wants. The base weight keeps its name, so emitted checkpoints keep HF names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lorashear.ir.core import Module, Op, Param
from lorashear.ir.storage import DataStorage, MetaStorage
from lorashear.ir.types import torch_dtype
from lorashear.passes.base import ModulePass, PassResult
from lorashear.passes.registry import register_pass


def merged_weight(weight: Param, lora_a: Param, lora_b: Param, scaling: float) -> torch.Tensor:
    """``W + scaling * B @ A`` computed in fp32, returned in W's dtype."""
    w = weight.storage.load().float()
    delta = lora_b.storage.load().float() @ lora_a.storage.load().float()
    return (w + scaling * delta).to(torch_dtype(weight.type.dtype))


def fold_adapter(op: Op) -> bool:
    """``W <- W + s*B@A`` for one ``lora_linear`` op (the weight becomes shapes only when any of
    the three has no data); returns whether it had data."""
    _, weight, _, lora_a, lora_b = op.args
    real = weight.storage.has_data and lora_a.storage.has_data and lora_b.storage.has_data
    weight.storage = (DataStorage(merged_weight(weight, lora_a, lora_b, float(op.kwargs["scaling"])))
                      if real else MetaStorage())
    return real


def merge_lora(module: Module) -> int:
    """Rewrite every ``lora_linear`` into ``linear`` with the merged weight; returns the count."""
    merged = 0
    for index, op in enumerate(module.graph.ops):
        if op.kind != "lora_linear":
            continue
        x, weight, bias, _, _ = op.args
        fold_adapter(op)
        args = [x, weight] if bias is None else [x, weight, bias]
        new = Op("linear", args, {}, op.results, op.loc)
        module.graph.ops[index] = new
        merged += 1
    if merged:
        module.remove_unused_params()
    return merged


@register_pass
@dataclass(frozen=True)
class MergeLora(ModulePass):
    """Fold LoRA adapters into their base weights (W + s*B@A) and drop the adapters."""

    name: ClassVar[str] = "merge-lora"

    def run(self, module: Module, analyses) -> PassResult:
        count = merge_lora(module)
        if not count:
            return PassResult.unchanged()
        return PassResult(True, frozenset(), {"adapters merged": count})
