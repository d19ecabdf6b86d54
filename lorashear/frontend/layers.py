"""Lowering a deep model from a trace of its first few decoder layers.

``torch.export`` with dynamic shapes spends most of its time per traced op, and a causal LM
is one decoder layer repeated. So :func:`~lorashear.frontend.lower.lower` traces the model
with its layer stack cut to :data:`TRACED_LAYERS` layers and writes the other layers' ops
itself, each a copy of the last traced layer under the layer's own parameters and module
paths. The result is the graph the full trace gives, op for op; whenever that cannot be
shown, lowering falls back to tracing every layer.

What is checked before copying, and what is assumed:

* the model has exactly one ``nn.ModuleList`` of ``config.num_hidden_layers`` modules, and the
  layers from :data:`TRACED_LAYERS` - 1 on are alike: the same module tree, module classes,
  parameter and buffer shapes, and attribute values (``layer_idx`` aside, and layer indices
  in strings such as peft's ``target_name``); no parameter is shared with another module;
* the last traced layer is the one before it with the layer index shifted: the same op
  kinds, constants, types and module paths, reading the previous layer's values where that
  one read its own predecessor's (or the embeddings), and otherwise the same values from
  before the layers (``attention_mask``-derived masks, rotary tables, shape symbols);
* a layer's ``forward`` depends on which layer it is only through those attributes (it may
  read ``layer_idx`` for a KV cache, which lowering never builds).
"""

from __future__ import annotations

import contextlib
import re
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorashear.ir.core import Graph, Op, Param, Value, map_arg

#: Layers traced by ``torch.export``: the last is the template for the others, and it must be
#: the one before it shifted by one layer (so a model whose first layer creates values the
#: others reuse is traced whole).
TRACED_LAYERS = 2

#: Module attributes that may differ between otherwise alike layers.
_IGNORED_ATTRS = frozenset({"_parameters", "_buffers", "_modules", "layer_idx"})


@dataclass
class LayerStack:
    """The decoder layers of a model: ``owner.<attr>`` is the ``nn.ModuleList`` at ``path``."""

    owner: nn.Module
    attr: str
    path: str
    layers: nn.ModuleList


def find_layer_stack(model: nn.Module) -> LayerStack | None:
    """The model's decoder layers if the lowering may trace only the first few, else None."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(count, int) or count <= TRACED_LAYERS:
        return None
    stacks = [(path, m) for path, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and len(m) == count and path]
    if len(stacks) != 1:
        return None
    path, layers = stacks[0]
    template = layers[TRACED_LAYERS - 1]
    if not all(_alike(template, layer) for layer in list(layers)[TRACED_LAYERS:]):
        return None
    if not _layer_tensors_unshared(model, layers):
        return None
    owner_path, _, attr = path.rpartition(".")
    return LayerStack(model.get_submodule(owner_path), attr, path, layers)


@contextlib.contextmanager
def traced_layers_only(stack: LayerStack) -> Iterator[None]:
    """Cut the model's layer stack to its first :data:`TRACED_LAYERS` layers for the block."""
    setattr(stack.owner, stack.attr, nn.ModuleList(list(stack.layers)[:TRACED_LAYERS]))
    try:
        yield
    finally:
        setattr(stack.owner, stack.attr, stack.layers)


def export_input_specs(model: nn.Module) -> list[tuple[str, str]]:
    """(kind, target) of the parameter and buffer inputs ``torch.export`` gives ``model``, in
    its order; the caller checks this against a real export of the cut model."""
    return ([("PARAMETER", name) for name, _ in model.named_parameters(remove_duplicate=False)]
            + [("BUFFER", name) for name, _ in model.named_buffers(remove_duplicate=False)])


# --- are two layers alike -------------------------------------------------------------------
def _alike(a: nn.Module, b: nn.Module) -> bool:
    mods_a, mods_b = list(a.named_modules()), list(b.named_modules())
    if [n for n, _ in mods_a] != [n for n, _ in mods_b]:
        return False
    for (_, x), (_, y) in zip(mods_a, mods_b):
        if type(x) is not type(y):
            return False
        attrs_x = {k: v for k, v in vars(x).items() if k not in _IGNORED_ATTRS}
        attrs_y = {k: v for k, v in vars(y).items() if k not in _IGNORED_ATTRS}
        if not _same(attrs_x, attrs_y, 0):
            return False
        for tx, ty in ((x._parameters, y._parameters), (x._buffers, y._buffers)):
            if list(tx) != list(ty) or not all(_same_tensor(tx[k], ty[k]) for k in tx):
                return False
    return True


def _same_tensor(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    return (type(a) is type(b) and a.shape == b.shape and a.dtype == b.dtype
            and a.device.type == b.device.type and a.requires_grad == b.requires_grad)


def _without_layer_index(s: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "#", s)


def _same(a: Any, b: Any, depth: int) -> bool:
    if a is b:
        return True
    if type(a) is not type(b) or depth > 4:
        return False
    if isinstance(a, torch.Tensor):
        return _same_tensor(a, b)
    if isinstance(a, str):
        return _without_layer_index(a) == _without_layer_index(b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k], depth + 1) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, depth + 1) for x, y in zip(a, b))
    if isinstance(a, nn.Module):  # held outside ``_modules`` (e.g. a dict of kernel functions)
        return _alike(a, b)
    if isinstance(a, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        return a == b
    if type(a).__eq__ is object.__eq__:  # no equality of its own: compare what it holds
        return hasattr(a, "__dict__") and _same(vars(a), vars(b), depth + 1)
    try:
        return bool(a == b)
    except Exception:  # e.g. an array's elementwise ==
        return False


def _layer_tensors_unshared(model: nn.Module, layers: nn.ModuleList) -> bool:
    seen: dict[int, int] = {}
    for _, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        seen[id(t)] = seen.get(id(t), 0) + 1
    return all(seen.get(id(t)) == 1 for t in [*layers.parameters(), *layers.buffers()])


# --- copying layers in the IR ----------------------------------------------------------------
def stamp_layers(graph: Graph, params: dict[str, Param], path: str, count: int) -> bool:
    """Extend ``graph``, lowered from the cut model, to all ``count`` layers; False (graph
    untouched) if it does not show the pattern the copy relies on. ``params`` holds every
    parameter of the whole model by IR name."""
    ops = graph.ops
    index_re = re.compile(rf"^{re.escape(path)}\.(\d+)(?:\.|$)")

    def layer_of(loc: str) -> int | None:
        m = index_re.match(loc)
        return int(m.group(1)) if m else None

    def relayer(name: str, src: int, dst: int) -> str:
        head = f"{path}.{src}"
        if name == head or name.startswith(head + "."):
            return f"{path}.{dst}" + name[len(head):]
        return name

    where = [layer_of(op.loc) for op in ops]
    spans = []
    for k in range(TRACED_LAYERS):
        at = [i for i, w in enumerate(where) if w == k]
        if not at:
            return False
        spans.append((at[0], at[-1] + 1))
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if end != start:  # ops between two layers: not the plain loop this copy expects
            return False
    if any(w is not None and w != k for k, (s, e) in enumerate(spans) for w in where[s:e]):
        return False
    segments = [ops[:spans[0][0]], *(ops[s:e] for s, e in spans), ops[spans[-1][1]:]]
    segment_of: dict[Value, int] = {}  # 0 = before the layers, 1 + k = layer k, -1 = after
    for seg, seg_ops in enumerate(segments):
        for op in seg_ops:
            for r in op.results:
                segment_of[r] = seg if seg < len(segments) - 1 else -1
    for v in graph.inputs:
        segment_of[v] = 0
    last, before_last = TRACED_LAYERS, TRACED_LAYERS - 1  # segment numbers of the last two layers
    template, previous = segments[last], segments[before_last]

    # the last traced layer must be the one before it, shifted by one layer
    shift: dict[Value, Value] = {}  # value of the layer before -> value of the template
    shared: set[Value] = set()  # values of earlier layers the template reads as they are

    def match(a: Any, b: Any) -> bool:
        if isinstance(a, Value):
            seg = segment_of.get(a)
            if seg == before_last:
                return shift.get(a) is b
            if seg is None or not 0 <= seg < before_last:
                return False
            if b is a:
                shared.add(a)
                return True
            return segment_of.get(b) == before_last  # the predecessor's value
        if isinstance(a, Param):
            return b is params.get(relayer(a.name, before_last - 1, last - 1))
        if isinstance(a, list):
            return isinstance(b, list) and len(a) == len(b) and all(match(x, y) for x, y in zip(a, b))
        return type(a) is type(b) and a == b

    if len(template) != len(previous):
        return False
    for p, t in zip(previous, template):
        if (p.kind != t.kind or relayer(p.loc, before_last - 1, last - 1) != t.loc
                or len(p.results) != len(t.results) or any(x.type != y.type for x, y in zip(p.results, t.results))
                or len(p.args) != len(t.args) or list(p.kwargs) != list(t.kwargs)
                or not all(match(x, y) for x, y in zip(p.args, t.args))
                or not all(match(p.kwargs[k], t.kwargs[k]) for k in p.kwargs)):
            return False
        shift.update(zip(p.results, t.results))

    # copy the template to layers TRACED_LAYERS .. count - 1
    src = last - 1
    predecessor = dict(shift)  # value of the layer before the template -> same value one layer on
    copies: list[Op] = []
    copy: dict[Value, Value] = {v: v for op in template for v in op.results}
    for k in range(TRACED_LAYERS, count):
        new: dict[Value, Value] = {}

        def ref(r: Value | Param, k: int = k, new: dict = new, predecessor: dict = predecessor) -> Value | Param:
            if isinstance(r, Param):
                return _param(params, relayer(r.name, src, k))
            seg = segment_of.get(r)
            if seg == last:
                return new[r]
            if seg == before_last:
                return predecessor[r]
            return r  # from before the layers, or shared from an earlier layer

        for op in template:
            try:
                args = [map_arg(a, ref) for a in op.args]
                kwargs = {key: map_arg(v, ref) for key, v in op.kwargs.items()}
            except _Mismatch:  # a parameter the whole model does not have
                return False
            results = [Value(r.name, r.type) for r in op.results]
            new.update(zip(op.results, results))
            copies.append(Op(op.kind, args, kwargs, results, relayer(op.loc, src, k)))
        predecessor = {v: new[shift[v]] for v in predecessor}
        copy = new

    # ops after the layers read the last layer's values where they read the template's
    def after(r: Value | Param) -> Value | Param:
        if isinstance(r, Param):
            if layer_of(r.name) is not None:
                raise _Mismatch
            return r
        seg = segment_of.get(r)
        if seg == last:
            return copy[r]
        if seg is not None and 0 < seg < last and r not in shared:
            raise _Mismatch
        return r

    tail = segments[-1]
    try:
        mapped_tail = [([map_arg(a, after) for a in op.args], {k: map_arg(v, after) for k, v in op.kwargs.items()})
                       for op in tail]
        outputs = [after(v) for v in graph.outputs]
    except _Mismatch:
        return False
    for op, (args, kwargs) in zip(tail, mapped_tail):
        op.args, op.kwargs = args, kwargs
    graph.outputs = outputs
    graph.ops = [*ops[:spans[-1][1]], *copies, *tail]
    return True


class _Mismatch(Exception):
    pass


def _param(params: dict[str, Param], name: str) -> Param:
    param = params.get(name)
    if param is None:
        raise _Mismatch
    return param
