"""IR rewrites the lowering applies after tracing: ``x @ W.T`` into ``linear(x, W)``, and peft's
LoRA pattern ``linear(x, W) + linear(linear(dropout(x), A), B) * s`` into one ``lora_linear``."""

from __future__ import annotations

from typing import Any

from lorashear.ir.core import Graph, Op, Param, Value


def transposed_param(value: Any) -> Param | None:
    """The 2-D parameter W when ``value`` is ``W.T`` (``t``, ``permute([1, 0])``, ``transpose``)."""
    op = value.producer if isinstance(value, Value) else None
    if op is None or not op.args or not isinstance(op.args[0], Param) or len(op.args[0].type.shape) != 2:
        return None
    if op.kind == "t" or op.kind == "permute" and [d % 2 for d in op.args[1]] == [1, 0] \
            or op.kind == "transpose" and {d % 2 for d in op.args[1:3]} == {0, 1}:
        return op.args[0]
    return None


def linear_from_transposed_matmul(graph: Graph) -> int:
    """Rewrite ``x @ W.T`` into ``linear(x, W)`` (Falcon's own linear layer multiplies by the
    transposed weight), so such layers are linear layers to the analyses and to LoRA fusion;
    returns how many were rewritten."""
    rewritten = 0
    for index, op in enumerate(graph.ops):
        if op.kind != "matmul" or len(op.args) != 2 or not isinstance(op.args[0], Value):
            continue
        weight = transposed_param(op.args[1])
        if weight is None or len(op.args[0].type.shape) < 2:
            continue
        new = Op("linear", [op.args[0], weight], {}, [], loc=op.loc)
        new.results = op.results
        for r in new.results:
            r.producer = new
        graph.ops[index] = new
        rewritten += 1
    return rewritten


def fuse_lora(graph: Graph) -> int:
    """Rewrite peft's LoRA pattern into ``lora_linear`` ops; returns how many were fused."""
    users = graph.users()
    fused = 0
    for index, op in enumerate(graph.ops):
        if op.kind != "add" or len(op.args) != 2 or not all(isinstance(a, Value) for a in op.args):
            continue
        for base_v, delta_v in (op.args, op.args[::-1]):
            match = match_lora(base_v, delta_v, users)
            if match is None:
                continue
            x, weight, bias, lora_a, lora_b, scaling, dropout = match
            new = Op("lora_linear", [x, weight, bias, lora_a, lora_b],
                     {"scaling": scaling, "dropout": dropout}, [], loc=base_v.producer.loc)
            new.results = op.results
            for r in new.results:
                r.producer = new
            graph.ops[index] = new
            fused += 1
            break
    return fused




def single_use(v: Value, users) -> bool:
    return len(users.get(v, [])) == 1


def match_lora(base_v: Value, delta_v: Value, users):
    base = base_v.producer
    if base is None or base.kind != "linear" or not isinstance(base.args[1], Param):
        return None
    x = base.args[0]
    bias = base.args[2] if len(base.args) > 2 else None
    scaling = 1.0
    scaled = delta_v.producer
    if scaled is not None and scaled.kind == "mul" and isinstance(scaled.args[1], (int, float)) \
            and not isinstance(scaled.args[1], bool):
        scaling = float(scaled.args[1])
        if not single_use(delta_v, users):
            return None
        delta_v = scaled.args[0]
    up = delta_v.producer
    if up is None or up.kind != "linear" or len(up.args) > 2 and up.args[2] is not None \
            or not isinstance(up.args[1], Param) or not single_use(delta_v, users):
        return None
    down_v = up.args[0]
    down = down_v.producer
    if down is None or down.kind != "linear" or len(down.args) > 2 and down.args[2] is not None \
            or not isinstance(down.args[1], Param) or not single_use(down_v, users):
        return None
    inner = down.args[0]
    dropout = 0.0
    if inner is not x:
        drop = inner.producer
        if drop is None or drop.kind != "dropout" or drop.args[0] is not x:
            return None
        dropout = float(drop.args[1])
    lora_a, lora_b = down.args[1], up.args[1]
    if not (lora_a.name.endswith("lora_A.weight") and lora_b.name.endswith("lora_B.weight")):
        return None
    return x, base.args[1], bias, lora_a, lora_b, scaling, dropout
