"""LoRA folding: ``W <- W + scaling * B @ A`` for one adapter or every adapter of a module.

The ``merge-lora`` pass and emission (HF, ONNX) fold through these; the base weight keeps its
name, so emitted checkpoints keep HF names.
"""


from __future__ import annotations

import torch

from lorashear.errors import PassError
from lorashear.ir.core import Module, Op, Param
from lorashear.ir.storage import DataStorage
from lorashear.ir.types import torch_dtype


def merged_weight(weight: Param, lora_a: Param, lora_b: Param, scaling: float) -> torch.Tensor:
    """``W + scaling * B @ A`` computed in fp32, returned in W's dtype."""
    w = weight.storage.load().float()
    delta = lora_b.storage.load().float() @ lora_a.storage.load().float()
    return (w + scaling * delta).to(torch_dtype(weight.type.dtype))


def check_adapter_storage(module: Module, pass_name: str) -> None:
    """Raise unless each ``lora_linear`` op's weight and factors all have data or are all shapes
    only: folding a factor without data into a weight with data would silently drop the weight's
    values. Callers run it before changing anything."""
    for op in module.graph.ops:
        if op.kind != "lora_linear":
            continue
        _, weight, _, lora_a, lora_b = op.args
        empty = [p.name for p in (weight, lora_a, lora_b) if not p.storage.has_data]
        if empty and len(empty) < 3:
            raise PassError(
                f"{pass_name}: the adapter at module {op.loc or weight.name} mixes data and shapes "
                f"only: {', '.join('@' + n for n in empty)} {'has' if len(empty) == 1 else 'have'} "
                "no data while the rest of its weight and factors have",
                hint="lower the model and its adapter together, both with weights or both "
                     "with --meta")


def fold_adapter(op: Op) -> bool:
    """``W <- W + s*B@A`` for one ``lora_linear`` op whose weight and factors all have data or
    all are shapes only (``check_adapter_storage``); returns whether they had data."""
    _, weight, _, lora_a, lora_b = op.args
    if not weight.storage.has_data:  # shapes only: nothing to fold
        return False
    weight.storage = DataStorage(merged_weight(weight, lora_a, lora_b, float(op.kwargs["scaling"])))
    return True


def merge_lora(module: Module) -> int:
    """Rewrite every ``lora_linear`` into ``linear`` with the merged weight; returns the count."""
    check_adapter_storage(module, "merge-lora")
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


