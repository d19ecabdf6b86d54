"""The KV-cache rewrite: a causal LM's graph becomes one decoding step over a key/value cache.

The lowered graph computes logits for ``S`` tokens from nothing. The rewritten graph takes the
keys and values of ``P`` earlier tokens (``past_key_values.{i}.key`` / ``.value``, shaped
``[B, kv_heads, P, head_dim]``), the ``S`` new tokens and an ``attention_mask`` over all
``P + S`` of them, and returns the logits of the new tokens and the keys and values of all
``P + S`` (``present.{i}.key`` / ``.value``), the names ONNX Runtime's decoders and Optimum use.

Nothing here knows a model family. The rewrite reads the graph:

- **Cache points.** Each ``sdpa`` op's key and value operands are traced back through the
  grouped-query repeat (``unsqueeze -> expand -> reshape``) to the per-KV-head tensor
  ``[B, kv_heads, S, head_dim]``; that value, rotary embedding already applied, is what is
  cached. Right after the op that makes it, the past is concatenated in front of it, and every
  reader sees all ``P + S`` positions. The attention then reads the cache itself with
  ``enable_gqa=True`` instead of a copy of it per query head (the same heads in the same
  order, so the same result: exactly so on torch's CPU kernel).
- **Two sequence lengths.** The lowered graph has one sequence length; the step has two: the
  new tokens ``S`` and the whole sequence ``T = P + S``. Every op is replayed on meta tensors
  with distinct sizes for ``B``, ``S`` and ``P``, so each axis says which length it has. A size
  argument that spelled the sequence length takes ``T`` where the op's tensor operands have
  ``T`` axes (the repeated keys) or where the op creates a tensor from nothing (position ranges,
  the mask's index ranges), and ``S`` where they have ``S`` axes (the token stream).
- **Positions follow the offset.** Everything computed from positions alone (rotary tables,
  the causal and padding mask) is computed for all ``T`` positions; where it meets the token
  stream (an elementwise op, the attention's mask operand) it is sliced to its last ``S``
  rows, the positions of the new tokens. So ``q`` at position ``P + j`` gets the rotary angle
  of ``P + j`` and attends to keys ``0 .. P + j``, whatever the model's mask construction is
  (causal, sliding window, padding).

With ``P = 0`` the step is the original graph's computation (same ops, a concatenation with
empty tensors and full-range slices), so prefill and decoding share one graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lorashear.errors import EmissionError, first_line
from lorashear.ir.core import Graph, Module, Op, Param, Value, clone_module, map_arg
from lorashear.ir.interpret import run_op
from lorashear.ir.ops import op_def, parameter_names
from lorashear.ir.types import SYM, SymIntType, TensorType, dtype_name, torch_dtype

PAST_KEY = "past_key_values.{}.key"
PAST_VALUE = "past_key_values.{}.value"
PRESENT_KEY = "present.{}.key"
PRESENT_VALUE = "present.{}.value"
_PAST_PREFIX = "past_key_values."

#: The past length's symbol in the rewritten graph's types, and the whole sequence's size.
PAST = "P"
TOTAL = "P+S"


@dataclass(frozen=True)
class CacheLayout:
    """One cache entry (one attention's keys and values) as the rewritten graph declares it."""

    index: int
    kv_heads: int
    key_dim: int
    value_dim: int
    dtype: str

    def empty(self, batch: int, *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of no tokens: the past of a prefill."""
        dtype = dtype or torch_dtype(self.dtype)
        return (torch.empty(batch, self.kv_heads, 0, self.key_dim, dtype=dtype, device=device),
                torch.empty(batch, self.kv_heads, 0, self.value_dim, dtype=dtype, device=device))


def cached_pairs(cache: Cache, empty: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Each entry's past keys and values as ``cache`` holds them (layer ``i`` holds entry
    ``i``), or the entry's ``empty`` pair where the layer holds nothing yet."""
    layers = cache.layers
    return [(layers[i].keys, layers[i].values)
            if i < len(layers) and layers[i].is_initialized and layers[i].keys.numel() else pair
            for i, pair in enumerate(empty)]


def store_present(cache: Cache, index: int, key: torch.Tensor, value: torch.Tensor, start: int) -> None:
    """Cache layer ``index`` holds ``key``/``value`` (the graph's ``present``: all ``P + S``
    positions, past ones from ``start`` on new) from now on. A ``DynamicLayer`` takes them as
    they are, since the graph concatenated past and new already; any other layer kind appends
    the new positions through its own ``update`` (which would copy the whole past again)."""
    while len(cache.layers) <= index and cache.layer_class_to_replicate is not None:
        cache.layers.append(cache.layer_class_to_replicate())
    layer = cache.layers[index] if index < len(cache.layers) else None
    if type(layer) is DynamicLayer:
        if not layer.is_initialized:
            layer.lazy_initialization(key, value)
        layer.keys, layer.values = key, value
    else:
        cache.update(key[:, :, start:], value[:, :, start:], index)


def has_kv_cache(module: Module) -> bool:
    """Whether ``module``'s graph is a decoding step (takes ``past_key_values.*`` inputs)."""
    return any(v.name.startswith(_PAST_PREFIX) for v in module.graph.inputs)


def cache_layout(module: Module) -> list[CacheLayout]:
    """The cache entries of a rewritten graph, in input order (empty when it has none)."""
    by_name = {v.name: v for v in module.graph.inputs}
    layout = []
    index = 0
    while PAST_KEY.format(index) in by_name:
        key = by_name[PAST_KEY.format(index)].type
        value = by_name[PAST_VALUE.format(index)].type
        assert isinstance(key, TensorType) and isinstance(value, TensorType)
        layout.append(CacheLayout(index, int(key.shape[1]), int(key.shape[3]), int(value.shape[3]),
                                  key.dtype))
        index += 1
    return layout


class KVCacheError(EmissionError):
    """The graph has a construct the KV-cache rewrite cannot carry over."""


def add_kv_cache(module: Module) -> Module:
    """A copy of ``module`` whose graph is one decoding step over a KV cache (module docstring).

    Raises :class:`KVCacheError` naming the op when the graph has no ``sdpa`` attention, or an
    attention the rewrite cannot cache (``is_causal=True`` without a mask, a key that is not
    ``[B, heads, S, head_dim]``), or mixes the two sequence lengths in an op it cannot align.
    """
    if has_kv_cache(module):
        raise KVCacheError("the graph already has a KV cache (inputs past_key_values.*)")
    return _Rewrite(clone_module(module)).run()


def _where(op: Op) -> str:
    what = f"%{op.results[0].name}" if op.results else "a value"
    return f"op {op.kind} defining {what} (module {op.loc or 'top level'})"


def _fresh_sizes(module: Module) -> tuple[int, int, int]:
    """Batch, new-token and past sizes for the meta replay: distinct from each other, from
    every sum of two of them and from every parameter's dimensions, so an axis's size says
    which length it has."""
    taken = {int(d) for p in module.params.values() for d in p.type.shape}
    candidates = (1009, 1013, 1019, 1021, 1031, 1033, 1039, 1049, 1051, 1061, 1063, 1069)
    picked: list[int] = []
    for c in candidates:
        sums = {a + b for a in [*picked, c] for b in [*picked, c]}
        if c not in taken and not (sums & taken) and len(picked) < 3:
            picked.append(c)
    if len(picked) < 3:
        raise KVCacheError("cannot pick meta sizes distinct from the parameters' dimensions")
    return picked[0], picked[1], picked[2]


class _Rewrite:
    def __init__(self, module: Module) -> None:
        self.module = module
        graph = module.graph
        inputs = {v.name: v for v in graph.inputs}
        ids = inputs.get("input_ids")
        if ids is None or not isinstance(ids.type, TensorType) or ids.type.rank != 2 \
                or not all(isinstance(d, str) for d in ids.type.shape):
            raise KVCacheError("the KV-cache rewrite needs a graph input input_ids of type "
                               "[batch, sequence] with symbolic sizes")
        self.batch_sym, self.seq_sym = ids.type.shape
        self.B, self.S, self.P = _fresh_sizes(module)
        self.T = self.P + self.S
        self.names = {v.name for v in graph.inputs} | {r.name for op in graph.ops for r in op.results}
        #: sdpa ops (by id) whose keys and values are grouped-query repeats of these cache points:
        #: the step reads the cache directly with ``enable_gqa=True``
        self.grouped: dict[int, tuple[Value, Value]] = {}
        self.counter = 0

    # -- naming and types -------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        while True:
            self.counter += 1
            name = f"kv.{hint}{self.counter}"
            if name not in self.names:
                self.names.add(name)
                return name

    def dim(self, size: int, declared: Any, op: Op | None) -> Any:
        if size == self.B:
            return self.batch_sym
        if size == self.S:
            return self.seq_sym
        if size == self.T:
            return TOTAL
        if size == self.P:
            return PAST
        if isinstance(declared, str) and declared not in (self.batch_sym, self.seq_sym):
            where = _where(op) if op else "an input"
            raise KVCacheError(f"{where} has the symbolic size {declared!r}, which the KV-cache "
                               "rewrite cannot carry over")
        return size

    def tensor_type(self, meta: torch.Tensor, declared: TensorType | None, op: Op | None) -> TensorType:
        shape = declared.shape if declared is not None and declared.rank == meta.dim() else (None,) * meta.dim()
        return TensorType(dtype_name(meta.dtype),
                          tuple(self.dim(int(s), d, op) for s, d in zip(meta.shape, shape, strict=True)))

    # -- the original graph's sequence-length symbols and cache points ------------------------
    def original_syms(self) -> set[int]:
        """ids of the original graph's symbolic integers equal to its sequence length.

        Only the integer ops are evaluated: ``dim`` reads its operand's declared type,
        ``sym.*`` ops compute on the sizes bound so far."""
        sizes: dict[Any, int] = {self.batch_sym: self.B, self.seq_sym: self.S}
        for v in self.module.graph.inputs:
            if not isinstance(v.type, TensorType):
                raise KVCacheError(f"graph input %{v.name} is not a tensor")
            for d in v.type.shape:
                if isinstance(d, str) and d not in sizes:
                    raise KVCacheError(f"graph input %{v.name} has the symbolic size {d!r}; the "
                                       "KV-cache rewrite knows only batch and sequence")
        known: dict[int, int] = {}
        seq: set[int] = set()
        for op in self.module.graph.ops:
            if len(op.results) != 1 or not isinstance(op.results[0].type, SymIntType):
                continue
            args = op.bound_args()
            if op.kind == "dim":
                ty = args["x"].type
                size = ty.shape[args["axis"]] if isinstance(ty, TensorType) else None
                value = sizes.get(size) if isinstance(size, str) else size
            else:
                operands = [known.get(id(a)) if isinstance(a, Value) else a for a in op.args]
                value = None if None in operands else op_def(op.kind).fn(*operands)
            if value is not None:
                known[id(op.results[0])] = value
                if value == self.S:
                    seq.add(id(op.results[0]))
        return seq

    def cache_points(self) -> tuple[dict[int, tuple[int, str]], list[tuple[Value, Value]]]:
        """The sdpa ops; for each cached value, its entry index and ``"key"``/``"value"``."""
        attention = [op for op in self.module.graph.ops if op.kind == "sdpa"]
        if not attention:
            raise KVCacheError("the graph has no attention op (sdpa); the KV-cache rewrite "
                               "caches the keys and values of scaled-dot-product attention",
                               hint="lower the model with attn_implementation='sdpa' (the default)")
        points: dict[int, tuple[int, str]] = {}
        entries: list[tuple[Value, Value]] = []
        for op in attention:
            args = op.bound_args()
            if args.get("is_causal") and args.get("attn_mask") is None:
                raise KVCacheError(f"{_where(op)} is causal by flag, not by a mask: with a cache "
                                   "its queries and keys have different lengths")
            key, value = (self.unrepeat(args[name], op) for name in ("key", "value"))
            if key is not args["key"] and value is not args["value"] and not args.get("enable_gqa") \
                    and self.repeats_heads(args["key"], key) and self.repeats_heads(args["value"], value):
                self.grouped[id(op)] = (key, value)
            known = points.get(id(key))
            if known is not None and points.get(id(value)) == (known[0], "value"):
                continue  # an attention that shares an earlier one's cache
            if known is not None or id(value) in points:
                raise KVCacheError(f"{_where(op)} shares half of another attention's cache")
            points[id(key)] = (len(entries), "key")
            points[id(value)] = (len(entries), "value")
            entries.append((key, value))
        return points, entries

    @staticmethod
    def repeats_heads(repeated: Value, point: Value) -> bool:
        """Whether ``repeated`` is ``point``'s heads each repeated ``n`` times in a row, as
        ``sdpa(enable_gqa=True)`` repeats them (``[B, H, S, D] -> [B, H, n, S, D] -> [B, H*n, S, D]``)."""
        expanded = repeated.producer.bound_args()["self"].type
        heads, n = point.type.shape[1], expanded.shape[2] if expanded.rank == 5 else None
        return (isinstance(n, int) and expanded.shape[1] == heads
                and repeated.type.shape[1] == heads * n and repeated.type.shape[2:] == point.type.shape[2:])

    def unrepeat(self, v: Any, attention: Op) -> Value:
        """The per-KV-head value a key/value operand repeats (``repeat_kv``), or itself."""
        if not isinstance(v, Value):
            raise KVCacheError(f"{_where(attention)} reads a parameter as its key or value")
        point = v
        reshape = v.producer
        if reshape is not None and reshape.kind == "reshape":
            expand = reshape.bound_args()["self"].producer
            if expand is not None and expand.kind == "expand":
                unsqueeze = expand.bound_args()["self"].producer
                if unsqueeze is not None and unsqueeze.kind == "unsqueeze" and \
                        unsqueeze.bound_args()["dim"] == 2:
                    point = unsqueeze.bound_args()["self"]
        ty = point.type
        if not (isinstance(ty, TensorType) and ty.rank == 4 and ty.shape[2] == self.seq_sym
                and isinstance(ty.shape[1], int) and isinstance(ty.shape[3], int)):
            raise KVCacheError(f"{_where(attention)}: its key/value %{point.name} is {ty}, not "
                               f"[batch, heads, {self.seq_sym}, head_dim]")
        return point

    # -- the replay ---------------------------------------------------------------------------
    @staticmethod
    def meta_run(op: Op, env: dict[int, Any], module: Module) -> None:
        def param(p: Param) -> torch.Tensor:
            return torch.empty(p.type.shape, dtype=torch_dtype(p.type.dtype), device="meta")
        try:
            run_op(op, env, param, device=torch.device("meta"))
        except Exception as exc:  # torch's shape functions say why
            raise KVCacheError(f"{_where(op)} cannot run on the cached shapes: {first_line(exc)}") from exc

    def run(self) -> Module:
        module = self.module
        old = module.graph
        seq_syms = self.original_syms()
        points, entries = self.cache_points()

        graph = Graph()
        meta: dict[int, Any] = {}  # new value id -> meta tensor / int
        token: set[int] = set()  # new value ids that depend on the new tokens
        mapped: dict[int, Value] = {}

        def add_input(name: str, ty: TensorType, data: torch.Tensor, *, is_token: bool) -> Value:
            v = Value(name, ty)
            graph.inputs.append(v)
            meta[id(v)] = data
            if is_token:
                token.add(id(v))
            self.names.add(name)
            return v

        sizes = {self.batch_sym: self.B, self.seq_sym: self.S}
        for v in old.inputs:
            assert isinstance(v.type, TensorType)
            is_ids = v.name == "input_ids"
            shape = tuple(TOTAL if (d == self.seq_sym and not is_ids) else d for d in v.type.shape)
            data_shape = [self.T if d == TOTAL else sizes.get(d, d) for d in shape]
            data = torch.zeros(data_shape, dtype=torch_dtype(v.type.dtype), device="meta")
            mapped[id(v)] = add_input(v.name, TensorType(v.type.dtype, shape), data, is_token=is_ids)
        past: list[tuple[Value, Value]] = []
        for i, (key, value) in enumerate(entries):
            pair = []
            for name, point in ((PAST_KEY.format(i), key), (PAST_VALUE.format(i), value)):
                ty = point.type
                shape = (ty.shape[0], ty.shape[1], PAST, ty.shape[3])
                data = torch.empty(self.B, ty.shape[1], self.P, ty.shape[3],
                                   dtype=torch_dtype(ty.dtype), device="meta")
                pair.append(add_input(name, TensorType(ty.dtype, shape), data, is_token=True))
            past.append((pair[0], pair[1]))

        def emit(kind: str, args: list[Any], loc: str, hint: str, declared: Any = None,
                 original: Op | None = None, kwargs: dict[str, Any] | None = None) -> Value:
            op = Op(kind, args, kwargs or {}, [Value("", SYM)], loc)
            self.meta_run(op, meta, module)
            out = meta[id(op.results[0])]
            result = op.results[0]
            result.name = self.fresh(hint)
            result.type = SYM if isinstance(out, int) else self.tensor_type(out, declared, original)
            if not isinstance(out, int) and any(id(v) in token for v in op.operands()):
                token.add(id(result))  # sizes are not data: a length read off the tokens is not
            graph.ops.append(op)
            return result

        ids = mapped[id(next(v for v in old.inputs if v.name == "input_ids"))]
        seq_len = emit("dim", [ids, 1], "", "seq")
        past_len = emit("dim", [past[0][0], 2], "", "past")
        total_len = emit("sym.add", [past_len, seq_len], "", "total")
        sliced: dict[tuple[int, int], Value] = {}

        def last_tokens(v: Value, axis: int, loc: str) -> Value:
            """``v`` (positions-only, ``T`` long on ``axis``) at the new tokens' positions.

            The slice is pushed up through the ops that made ``v`` (elementwise ops, casts,
            unsqueeze, expand, concatenation along another axis) to where it is cheapest, so a
            decoding step builds the mask's ``S x T`` rows and the rotary tables' ``S`` rows,
            not ``T x T`` and ``T``. Slicing commutes with those ops exactly."""
            if id(v) in token:
                raise KVCacheError(f"value %{v.name} at {loc or 'top level'} has the whole "
                                   "sequence on an axis where the new tokens meet it")
            key = (id(v), axis)
            if key not in sliced:
                hoisted = self.hoist(v, axis, meta, last_tokens, emit, seq_len)
                sliced[key] = hoisted if hoisted is not None else \
                    emit("slice", [v, axis, past_len, total_len], loc, "new")
            return sliced[key]

        presents: list[tuple[Value, Value] | None] = [None] * len(entries)
        for op in old.ops:
            if op.results and all(id(r) in seq_syms for r in op.results):
                continue
            tensors = [mapped[id(v)] for v in op.operands() if id(v) not in seq_syms
                       and isinstance(v.type, TensorType)]
            axes = {int(s) for v in tensors for s in meta[id(v)].shape}
            is_token = any(id(v) in token for v in tensors)
            definition = op_def(op.kind)
            if not tensors or (definition is not None and definition.creates_tensor):
                length = total_len
            elif self.T in axes and self.S not in axes:
                length = total_len
            elif self.S in axes and self.T not in axes:
                length = seq_len
            elif self.S in axes:
                length = None  # both: an error if a size argument needs choosing
            else:
                length = seq_len if is_token else total_len

            def ref(r: Value | Param, op: Op = op, length: Value | None = length) -> Value | Param:
                if isinstance(r, Param):
                    return r
                if id(r) in seq_syms:
                    if length is None:
                        raise KVCacheError(f"{_where(op)} reads the sequence length, and its "
                                           "operands have both the new tokens' and the whole "
                                           "sequence's length")
                    return length
                return mapped[id(r)]

            args = [map_arg(a, ref) for a in op.args]
            kwargs = {k: map_arg(v, ref) for k, v in op.kwargs.items()}
            args, kwargs = self.align(op, args, kwargs, meta, last_tokens)
            if id(op) in self.grouped:  # attend over the cached KV heads, not a copy per query head
                key, value = self.grouped[id(op)]
                args = [args[0], mapped[id(key)], mapped[id(value)], *args[3:]]
                kwargs = {**kwargs, "enable_gqa": True}
            new = Op(op.kind, args, kwargs, [Value(r.name, r.type) for r in op.results], op.loc)
            self.meta_run(new, meta, module)
            for r_old, r_new in zip(op.results, new.results, strict=True):
                out = meta[id(r_new)]
                if isinstance(r_old.type, SymIntType):
                    r_new.type = SYM
                else:
                    r_new.type = self.tensor_type(out, r_old.type, op)
                if not isinstance(out, int) and any(id(v) in token for v in new.operands()):
                    token.add(id(r_new))
                mapped[id(r_old)] = r_new
            graph.ops.append(new)
            for r_old in op.results:
                if id(r_old) not in points:
                    continue
                index, which = points[id(r_old)]
                cached = past[index][0 if which == "key" else 1]
                full = emit("concat", [[cached, mapped[id(r_old)]], 2], op.loc, which,
                            declared=None, original=op)
                mapped[id(r_old)] = full
                pair = presents[index] or (None, None)
                presents[index] = (full, pair[1]) if which == "key" else (pair[0], full)

        graph.outputs = [mapped[id(v)] for v in old.outputs]
        graph.output_names = list(old.output_names) or [f"output_{i}" for i in range(len(old.outputs))]
        for i, pair in enumerate(presents):
            assert pair is not None and pair[0] is not None and pair[1] is not None
            graph.outputs += [pair[0], pair[1]]
            graph.output_names += [PRESENT_KEY.format(i), PRESENT_VALUE.format(i)]
        graph.remove_dead_ops()  # what the hoisted slices replaced
        module.graph = graph
        return module

    def hoist(self, v: Value, axis: int, meta: dict[int, Any], last_tokens, emit,
              seq_len: Value) -> Value | None:
        """``v``'s new-token rows computed from its operands' new-token rows, or None where
        the op that makes ``v`` does not commute with the slice (see ``last_tokens``)."""
        op = v.producer
        if op is None or len(op.results) != 1:
            return None
        definition = op_def(op.kind)
        rank = meta[id(v)].dim()
        args = op.bound_args()

        def rows(a: Any) -> Any:
            """Operand ``a`` (broadcast against ``v``) at the new rows, or itself when its
            size there is 1 or it lacks the axis."""
            if not (isinstance(a, Value) and isinstance(meta[id(a)], torch.Tensor)):
                return a
            t = meta[id(a)]
            at = axis - (rank - t.dim())
            if at < 0 or t.shape[at] == 1:
                return a
            if t.shape[at] != self.T:
                raise _NoHoist
            return last_tokens(a, at, op.loc)

        try:
            if definition is not None and definition.elementwise:
                return emit(op.kind, [map_arg(a, rows) for a in op.args], op.loc, "new",
                            kwargs={k: map_arg(a, rows) for k, a in op.kwargs.items()})
            if op.kind == "unsqueeze":
                dim = args["dim"] % rank
                if dim == axis:
                    return None
                return emit(op.kind, [last_tokens(args["self"], axis if axis < dim else axis - 1,
                                                  op.loc), args["dim"]], op.loc, "new")
            if op.kind == "expand":
                size = list(args["size"])
                if size[axis] != -1:
                    size[axis] = seq_len
                return emit(op.kind, [rows(args["self"]), size], op.loc, "new")
            if op.kind == "concat" and args["dim"] % rank != axis:
                return emit(op.kind, [[rows(t) for t in args["tensors"]], args["dim"]], op.loc, "new")
        except _NoHoist:
            return None
        return None


    def align(self, op: Op, args: list[Any], kwargs: dict[str, Any], meta: dict[int, Any],
              last_tokens) -> tuple[list[Any], dict[str, Any]]:
        """Slice positions-only operands to the new tokens where they meet the token stream."""
        definition = op_def(op.kind)
        if op.kind == "sdpa":
            position = {name: i for i, name in enumerate(parameter_names(op.kind))}
            mask_at = ("args", position["attn_mask"]) if position["attn_mask"] < len(args) \
                else ("kwargs", "attn_mask")
            mask = args[mask_at[1]] if mask_at[0] == "args" else kwargs.get("attn_mask")
            query = args[0] if args else kwargs["query"]
            if isinstance(mask, Value) and isinstance(meta[id(mask)], torch.Tensor):
                m, q = meta[id(mask)], meta[id(query)]
                if m.dim() >= 2 and m.shape[-2] == self.T and q.shape[-2] == self.S:
                    mask = last_tokens(mask, m.dim() - 2, op.loc)
                    if mask_at[0] == "args":
                        args = [*args]
                        args[mask_at[1]] = mask
                    else:
                        kwargs = {**kwargs, "attn_mask": mask}
            return args, kwargs
        if definition is None or not definition.elementwise:
            return args, kwargs
        operands = [(k, a) for k, a in [*enumerate(args), *kwargs.items()]
                    if isinstance(a, Value) and isinstance(meta[id(a)], torch.Tensor)]
        if len(operands) < 2:
            return args, kwargs
        rank = max(meta[id(a)].dim() for _, a in operands)
        for axis_from_end in range(1, rank + 1):
            sizes = {int(meta[id(a)].shape[-axis_from_end]) for _, a in operands
                     if meta[id(a)].dim() >= axis_from_end}
            if not {self.S, self.T} <= sizes:
                continue
            new_operands = []
            for where, a in operands:
                t = meta[id(a)]
                if t.dim() >= axis_from_end and t.shape[-axis_from_end] == self.T:
                    a = last_tokens(a, t.dim() - axis_from_end, op.loc)
                    if isinstance(where, int):
                        args = [*args]
                        args[where] = a
                    else:
                        kwargs = {**kwargs, where: a}
                new_operands.append((where, a))
            operands = new_operands
        return args, kwargs


class _NoHoist(Exception):
    """An operand of the op being hoisted through has neither the whole length nor size 1."""


__all__ = ["CacheLayout", "KVCacheError", "PAST_KEY", "PAST_VALUE", "PRESENT_KEY", "PRESENT_VALUE",
           "add_kv_cache", "cache_layout", "cached_pairs", "has_kv_cache", "store_present"]
