"""LoRA folding: ``W <- W + scaling * B @ A`` for one adapter or every adapter of a module.

The ``merge-lora`` pass and emission (HF, ONNX) fold through these; the base weight keeps its
name, so emitted checkpoints keep HF names. :func:`lora_parts` is the one way to read an
adapter's parts from its ``lora_linear`` op.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lorashear.errors import PassError
from lorashear.ir.core import Module, Op, Param, Value
from lorashear.ir.storage import DataStorage
from lorashear.ir.types import torch_dtype


@dataclass(frozen=True)
class LoraParts:
    """What one ``lora_linear`` op computes: ``x @ W^T + b + scaling * B(A(dropout(x)))``."""

    x: Value
    weight: Param
    bias: Param | None
    lora_a: Param
    lora_b: Param
    scaling: float
    dropout: float

    @property
    def factors(self) -> tuple[Param, Param]:
        return self.lora_a, self.lora_b


def lora_parts(op: Op) -> LoraParts:
    """The named parts of a ``lora_linear`` op (a ValueError for any other kind)."""
    if op.kind != "lora_linear":
        raise ValueError(f"op {op.kind} at {op.loc or 'top level'} is not a lora_linear")
    bound = op.bound_args()
    return LoraParts(bound["x"], bound["weight"], bound["bias"], bound["lora_A"], bound["lora_B"],
                     float(bound["scaling"]), float(bound["dropout"]))


def adapters(module: Module) -> Iterator[tuple[Op, LoraParts]]:
    """Every ``lora_linear`` op of the module with its parts, in graph order."""
    for op in module.graph.ops:
        if op.kind == "lora_linear":
            yield op, lora_parts(op)


def merged_weight(weight: Param, lora_a: Param, lora_b: Param, scaling: float) -> torch.Tensor:
    """``W + scaling * B @ A`` computed in fp32, returned in W's dtype."""
    w = weight.storage.load().float()
    delta = lora_b.storage.load().float() @ lora_a.storage.load().float()
    return (w + scaling * delta).to(torch_dtype(weight.type.dtype))


def check_adapter_storage(module: Module, pass_name: str) -> None:
    """Raise unless each ``lora_linear`` op's weight and factors all have data or are all shapes
    only: folding a factor without data into a weight with data would silently drop the weight's
    values. Callers run it before changing anything."""
    for op, parts in adapters(module):
        empty = [p.name for p in (parts.weight, *parts.factors) if not p.storage.has_data]
        if empty and len(empty) < 3:
            raise PassError(
                f"{pass_name}: the adapter at module {op.loc or parts.weight.name} mixes data and "
                f"shapes only: {', '.join('@' + n for n in empty)} "
                f"{'has' if len(empty) == 1 else 'have'} no data while the rest of its weight and "
                "factors have",
                hint="lower the model and its adapter together, both with weights or both "
                     "with --meta")


def fold_adapter(op: Op) -> bool:
    """``W <- W + s*B@A`` for one ``lora_linear`` op whose weight and factors all have data or
    all are shapes only (``check_adapter_storage``); returns whether they had data."""
    parts = lora_parts(op)
    if not parts.weight.storage.has_data:  # shapes only: nothing to fold
        return False
    parts.weight.storage = DataStorage(merged_weight(parts.weight, parts.lora_a, parts.lora_b,
                                                     parts.scaling))
    return True


def merge_lora(module: Module) -> int:
    """Rewrite every ``lora_linear`` into ``linear`` with the merged weight; returns the count."""
    check_adapter_storage(module, "merge-lora")
    merged = 0
    folded: set[int] = set()  # a layer run several times (HRM's cycles) is folded once
    for index, op in enumerate(module.graph.ops):
        if op.kind != "lora_linear":
            continue
        parts = lora_parts(op)
        if id(parts.weight) not in folded:
            folded.add(id(parts.weight))
            fold_adapter(op)
        args = [parts.x, parts.weight] + ([] if parts.bias is None else [parts.bias])
        module.graph.ops[index] = Op("linear", args, {}, op.results, op.loc)
        merged += 1
    if merged:
        module.remove_unused_params()
    return merged
