"""The in-memory IR: a module of parameters and one graph of ops over SSA values.

Design:
- An :class:`Op` is one normalised ATen-level operation (see :mod:`lorashear.ir.ops`). Its
  ``args``/``kwargs`` mirror the torch call it stands for, so executing an op is calling its
  torch function with values substituted: arguments are :class:`Value` (an SSA tensor or
  symbolic integer), :class:`Param` (a named weight), Python literals, element-type names
  (:class:`DTypeArg`) or lists of those.
- A :class:`Param` has a name, type and a :class:`~lorashear.ir.storage.Storage`: a reference
  into a safetensors file, in-memory data, or nothing at all (``meta``). Lowering never copies
  a checkpoint: it records where each tensor lives.
- Durable facts (the HF config, LoRA links, groups, masks) are typed attributes in
  ``Module.attributes`` and print with the module; recomputable facts live in analyses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lorashear.ir.attributes import Attribute
from lorashear.ir.ops import bind_arguments
from lorashear.ir.storage import Storage
from lorashear.ir.types import TensorType, ValueType


@dataclass(frozen=True)
class DTypeArg:
    """An element-type literal passed to an op (``cast(%x, f32)``)."""

    name: str

    def __str__(self) -> str:
        return self.name


class Value:
    """An SSA value: defined once, by a graph input or by one op result."""

    __slots__ = ("name", "type", "producer")

    def __init__(self, name: str, type: ValueType, producer: Op | None = None) -> None:
        self.name = name
        self.type = type
        self.producer = producer

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Param:
    """A named parameter or buffer of the module (a weight, a bias, a LoRA factor, inv_freq)."""

    __slots__ = ("name", "type", "storage", "buffer")

    def __init__(self, name: str, type: TensorType, storage: Storage, *, buffer: bool = False):
        self.name = name
        self.type = type
        self.storage = storage
        self.buffer = buffer

    def __repr__(self) -> str:
        return f"@{self.name}: {self.type}"


Arg = Value | Param | DTypeArg | int | float | bool | str | None | list


def iter_arg_refs(arg: Any) -> Iterator[Value | Param]:
    """The values and params referenced by one (possibly nested) argument."""
    if isinstance(arg, (Value, Param)):
        yield arg
    elif isinstance(arg, list):
        for item in arg:
            yield from iter_arg_refs(item)


def map_arg(arg: Any, fn) -> Any:
    """Rebuild ``arg`` with every Value/Param replaced by ``fn(ref)``."""
    if isinstance(arg, (Value, Param)):
        return fn(arg)
    if isinstance(arg, list):
        return [map_arg(a, fn) for a in arg]
    return arg


class Op:
    """One operation: ``results = kind(*args, **kwargs)`` at module path ``loc``."""

    __slots__ = ("kind", "args", "kwargs", "results", "loc")

    def __init__(self, kind: str, args: list[Arg], kwargs: dict[str, Arg] | None = None,
                 results: list[Value] | None = None, loc: str = "") -> None:
        self.kind = kind
        self.args = list(args)
        self.kwargs = dict(kwargs or {})
        self.results = list(results or [])
        self.loc = loc
        for r in self.results:
            r.producer = self

    @property
    def result(self) -> Value:
        if len(self.results) != 1:
            raise ValueError(f"op {self.kind} has {len(self.results)} results, not one")
        return self.results[0]

    def bound_args(self) -> dict[str, Any]:
        """The arguments by parameter name, defaults filled in: ATen kinds bind against their
        overload's schema, our own kinds against their Python signature, so a reader gets
        ``bound_args()["dim"]`` whether lowering passed it by position or by keyword."""
        return bind_arguments(self.kind, self.args, self.kwargs)

    def operands(self) -> list[Value]:
        """Values this op reads, in argument order (params excluded)."""
        refs = [r for a in (*self.args, *self.kwargs.values()) for r in iter_arg_refs(a)]
        return [r for r in refs if isinstance(r, Value)]

    def params(self) -> list[Param]:
        refs = [r for a in (*self.args, *self.kwargs.values()) for r in iter_arg_refs(a)]
        return [r for r in refs if isinstance(r, Param)]

    def replace_refs(self, fn) -> None:
        """Replace each referenced Value/Param ``r`` by ``fn(r)`` in place."""
        self.args = [map_arg(a, fn) for a in self.args]
        self.kwargs = {k: map_arg(v, fn) for k, v in self.kwargs.items()}

    def __repr__(self) -> str:
        return f"<Op {self.kind} -> {[r.name for r in self.results]} at {self.loc or '?'}>"


@dataclass
class Graph:
    """Inputs, ops in topological order, and outputs."""

    inputs: list[Value] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)

    def users(self) -> dict[Value, list[Op]]:
        """Map every value to the ops that read it (recomputed on each call)."""
        result: dict[Value, list[Op]] = {v: [] for v in self.inputs}
        for op in self.ops:
            for r in op.results:
                result.setdefault(r, [])
            for v in op.operands():
                result.setdefault(v, []).append(op)
        return result

    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Make every reader of ``old`` (ops and graph outputs) read ``new`` instead."""
        for op in self.ops:
            op.replace_refs(lambda r: new if r is old else r)
        self.outputs = [new if v is old else v for v in self.outputs]

    def remove_dead_ops(self) -> int:
        """Drop ops none of whose results are used (all ops are pure). Returns how many."""
        live: set[int] = {id(v) for v in self.outputs}
        kept: list[Op] = []
        for op in reversed(self.ops):
            if any(id(r) in live for r in op.results):
                kept.append(op)
                live.update(id(v) for v in op.operands())
        removed = len(self.ops) - len(kept)
        self.ops = kept[::-1]
        return removed


class Module:
    """A lowered model: parameters by name, one graph, typed attributes, a format version."""

    def __init__(self, graph: Graph | None = None, params: Iterable[Param] = (),
                 attributes: dict[str, Attribute] | None = None) -> None:
        self.graph = graph or Graph()
        self.params: dict[str, Param] = {}
        for p in params:
            self.add_param(p)
        self.attributes: dict[str, Attribute] = dict(attributes or {})

    def add_param(self, param: Param) -> Param:
        if param.name in self.params:
            raise ValueError(f"duplicate parameter @{param.name}")
        self.params[param.name] = param
        return param

    def used_params(self) -> set[str]:
        return {p.name for op in self.graph.ops for p in op.params()}

    def remove_unused_params(self) -> list[str]:
        used = self.used_params()
        dropped = [n for n in self.params if n not in used]
        for n in dropped:
            del self.params[n]
        return dropped

    def num_parameters(self, *, include_buffers: bool = False) -> int:
        return sum(p.type.numel() for p in self.params.values() if include_buffers or not p.buffer)

    def __repr__(self) -> str:
        return (f"<Module {len(self.params)} params, {len(self.graph.ops)} ops, "
                f"attrs {sorted(self.attributes)}>")


def clone_module(module: Module) -> Module:
    """A structural copy: new params, values and ops; tensor storages are shared, not copied.

    Lets a consumer (emission, a what-if analysis) rewrite the graph without touching the
    caller's module.
    """
    params = {name: Param(p.name, p.type, p.storage, buffer=p.buffer) for name, p in module.params.items()}
    values: dict[int, Value] = {}

    def copy_value(v: Value) -> Value:
        new = Value(v.name, v.type)
        values[id(v)] = new
        return new

    def ref(r: Value | Param) -> Value | Param:
        return params[r.name] if isinstance(r, Param) else values[id(r)]

    graph = Graph(inputs=[copy_value(v) for v in module.graph.inputs])
    for op in module.graph.ops:
        new = Op(op.kind, [map_arg(a, ref) for a in op.args],
                 {k: map_arg(v, ref) for k, v in op.kwargs.items()},
                 [copy_value(r) for r in op.results], op.loc)
        graph.ops.append(new)
    graph.outputs = [values[id(v)] for v in module.graph.outputs]
    graph.output_names = list(module.graph.output_names)
    return Module(graph, params.values(), dict(module.attributes))
