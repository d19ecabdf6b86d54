"""IR rewrites the lowering applies after tracing: ``x @ W.T`` into ``linear(x, W)``, GPT-2's
``Conv1D`` into ``linear`` on its weight read transposed, and peft's LoRA pattern
``linear(x, W) + linear(linear(dropout(x), A), B) * s`` into one ``lora_linear``."""

from __future__ import annotations

import dataclasses
from typing import Any

from lorashear.ir.attributes import StoredTransposedAttr
from lorashear.ir.core import Graph, Module, Op, Param, Value
from lorashear.ir.storage import DataStorage, FileStorage, MetaStorage
from lorashear.ir.types import TensorType


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


def linear_from_conv1d(module: Module) -> int:
    """Rewrite GPT-2's ``Conv1D`` (``reshape(addmm(b, reshape(x, [-1, in]), W), [.., out])`` with
    W stored ``[in, out]``) into ``linear(x, W, b)`` with W held ``[out, in]``; returns how many.

    The decision: a Conv1D is a linear layer whose checkpoint stores the weight transposed, so
    the IR holds that parameter in the linear layout (a transposed reference into the file,
    ``FileStorage.transposed``, or a transposed copy of data in memory) and records its name in
    the ``stored-transposed`` attribute, which HF emission reads to write it back ``[in, out]``.
    Every pass then sees one layout: peft's LoRA on a Conv1D (``fan_in_fan_out``; its A and B
    are ordinary ``[r, in]`` and ``[out, r]``) fuses into a ``lora_linear`` like any other,
    and ``discover``, ``prune``, ``compress`` and ``merge-lora`` (``W + s * B @ A``, in the
    ``[out, in]`` layout) need no transposed variant. Only a weight that this ``addmm`` alone
    reads is rewritten (another reader would see the layout change)."""
    graph = module.graph
    users = graph.users()
    readers: dict[str, int] = {}
    for op in graph.ops:
        for p in op.params():
            readers[p.name] = readers.get(p.name, 0) + 1
    rewritten: list[str] = []
    for index, op in enumerate(graph.ops):
        match = _conv1d_match(op, users, readers)
        if match is None:
            continue
        x, weight, bias = match
        _transpose_param(weight)
        new = Op("linear", [x, weight, bias], {}, op.results, loc=op.loc)
        for r in new.results:
            r.producer = new
        graph.ops[index] = new
        rewritten.append(weight.name)
    if rewritten:
        known = module.attributes.get("stored-transposed")
        names = known.params if isinstance(known, StoredTransposedAttr) else ()
        module.attributes["stored-transposed"] = StoredTransposedAttr(tuple(names) + tuple(rewritten))
    return len(rewritten)


def _conv1d_match(op: Op, users, readers: dict[str, int]) -> tuple[Value, Param, Param | None] | None:
    """``(x, W, b)`` where ``op`` is the final reshape of a Conv1D (see :func:`linear_from_conv1d`)."""
    if op.kind != "reshape" or not isinstance(op.args[0], Value) or op.args[0].producer is None:
        return None
    mm = op.args[0].producer
    if mm.kind != "addmm" or not single_use(op.args[0], users):
        return None
    a = mm.bound_args()
    bias, flat, weight = a["self"], a["mat1"], a["mat2"]
    if a["alpha"] != 1 or a["beta"] != 1 or not isinstance(weight, Param) or readers.get(weight.name) != 1 \
            or not isinstance(flat, Value) or flat.producer is None or flat.producer.kind != "reshape":
        return None
    if bias is not None and not (isinstance(bias, Param) and bias.type.shape == weight.type.shape[1:]):
        return None
    x = flat.producer.args[0]
    if not isinstance(x, Value) or len(weight.type.shape) != 2 \
            or tuple(op.results[0].type.shape) != (*x.type.shape[:-1], weight.type.shape[1]) \
            or x.type.shape[-1] != weight.type.shape[0]:
        return None
    return x, weight, bias


def _transpose_param(param: Param) -> None:
    """Hold the 2-D ``param`` transposed: its type, and its storage read transposed."""
    storage = param.storage
    if isinstance(storage, FileStorage):
        param.storage = dataclasses.replace(storage, transposed=not storage.transposed)
    elif storage.has_data:
        param.storage = DataStorage(storage.load().t().contiguous())
    else:
        param.storage = MetaStorage()
    param.type = TensorType(param.type.dtype, tuple(param.type.shape[::-1]))


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
