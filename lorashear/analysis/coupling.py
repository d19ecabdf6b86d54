"""Dimension coupling: which channels of which tensors must be removed together.

Every tensor axis is described by a mixed-radix list of *factors* (major first); a factor is
an index space shared, through union-find, by every axis it flows through. Ops couple
factors: a linear joins its input's last axis with the weight's columns; a residual add joins
its operands' axes; a reshape from ``[.., 576]`` to ``[.., 9, 64]`` splits the factor into
``9 x 64`` (refining it everywhere it is used). A factor that cannot be removed safely is
*pinned* with the reason: graph inputs and outputs (the vocabulary), axes an op uses as a
whole (RoPE's slices of head_dim, softmax), factors made by ``expand`` (GQA's query heads per
KV head), reductions over channels that are not zero when pruned, ops the analysis does not
model. Every unpinned factor left is a family of minimally removable groups.

A second, forward pass computes which channels are exactly zero in the masked model, so a
reduction over a pruned axis (RMSNorm's mean) is accepted only where it sees zeros, and is
recorded for ``compress`` to keep the original divisor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lorashear.analysis.manager import Analysis
from lorashear.ir.core import Module, Op, Param, Value
from lorashear.ir.types import TensorType

Ref = Value | Param

ELEMENTWISE = frozenset({
    "add", "add.scalar", "sub", "rsub", "mul", "mul.scalar", "div", "div.mode", "neg", "pow",
    "pow.tensor", "rsqrt", "sqrt", "exp", "log", "abs", "reciprocal", "cos", "sin", "tanh",
    "sigmoid", "silu", "gelu", "relu", "erf", "clamp", "minimum", "maximum", "where",
    "where.scalar_other", "masked_fill", "masked_fill.tensor", "eq", "eq.scalar", "ne",
    "ne.scalar", "lt", "lt.scalar", "le", "le.scalar", "gt", "gt.scalar", "ge", "ge.scalar",
    "and", "or", "not", "logical_not", "logical_and", "logical_or", "cast", "dropout",
})
#: f(0) == 0: a zero channel stays zero through these.
ZERO_PRESERVING = frozenset({"neg", "sqrt", "abs", "tanh", "silu", "gelu", "relu", "erf", "cast",
                             "dropout", "sin"})
REDUCTIONS = frozenset({"sum", "mean"})
CREATION = frozenset({"arange", "arange.start", "arange.start_step", "full", "ones", "zeros",
                      "scalar_tensor", "empty", "new_ones", "new_zeros", "new_full"})


class _Factors:
    """Union-find over factors with refinement (a factor can be split into sub-factors)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int | None] = []  # None: a symbolic size (batch, sequence)
        self.children: dict[int, list[int]] = {}
        self.pinned: dict[int, str] = {}

    def new(self, size: int | None, pinned: str | None = None) -> int:
        fid = len(self.parent)
        self.parent.append(fid)
        self.size.append(size)
        if pinned:
            self.pinned[fid] = pinned
        return fid

    def find(self, f: int) -> int:
        while self.parent[f] != f:
            self.parent[f] = self.parent[self.parent[f]]
            f = self.parent[f]
        return f

    def leaves(self, f: int) -> list[int]:
        root = self.find(f)
        kids = self.children.get(root)
        if kids is None:
            return [root]
        return [leaf for k in kids for leaf in self.leaves(k)]

    def pin(self, f: int, reason: str) -> None:
        for leaf in self.leaves(f):
            self.pinned.setdefault(leaf, reason)

    def is_pinned(self, f: int) -> bool:
        return self.find(f) in self.pinned

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        if rb in self.pinned:
            self.pinned.setdefault(ra, self.pinned[rb])

    def split(self, f: int, outer: int) -> tuple[int, int]:
        """Refine leaf ``f`` of size n into (outer, n // outer), everywhere it is used."""
        root = self.find(f)
        n = self.size[root]
        assert n is not None and n % outer == 0 and root not in self.children
        reason = self.pinned.get(root)
        a, b = self.new(outer, reason), self.new(n // outer, reason)
        self.children[root] = [a, b]
        return a, b

    def unify(self, left: list[int], right: list[int], why: str) -> bool:
        """Identify two axes given as factor lists; pins everything when they do not align."""
        ls = [x for f in left for x in self.leaves(f) if self.size[self.find(x)] != 1]
        rs = [x for f in right for x in self.leaves(f) if self.size[self.find(x)] != 1]
        i = j = 0
        pairs = []
        while i < len(ls) and j < len(rs):
            a, b = self.find(ls[i]), self.find(rs[j])
            sa, sb = self.size[a], self.size[b]
            if sa == sb:
                pairs.append((a, b))
                i, j = i + 1, j + 1
            elif sa is not None and sb is not None and sa > sb and sa % sb == 0:
                first, rest = self.split(a, sb)
                ls[i:i + 1] = [first, rest]
            elif sa is not None and sb is not None and sb > sa and sb % sa == 0:
                first, rest = self.split(b, sa)
                rs[j:j + 1] = [first, rest]
            else:
                break
        if i != len(ls) or j != len(rs):
            for f in ls + rs:
                self.pin(f, why)
            return False
        for a, b in pairs:
            self.union(a, b)
        return True


@dataclass
class ReductionRecord:
    """A sum/mean whose reduced axes carry prunable factors (compress keeps the divisor)."""

    op: Op
    factors: list[int]


@dataclass
class CouplingResult:
    """Axis descriptors of every tensor and the families of removable groups they imply."""

    factors: _Factors
    axes: dict[int, list[list[int]]]  # id(value or param) -> factor list per axis
    refs: dict[int, Ref]
    families: list[tuple[int, str, int | None, int, list[tuple[str, int, int]]]] = field(default_factory=list)
    family_of_leaf: dict[int, int] = field(default_factory=dict)
    reductions: list[ReductionRecord] = field(default_factory=list)
    unprunable: list[tuple[str, int, str]] = field(default_factory=list)

    def leaves(self, ref: Ref, axis: int) -> list[int]:
        fs = self.factors
        return [x for f in self.axes[id(ref)][axis] for x in fs.leaves(f)]


class DimensionCoupling(Analysis):
    """The dimension-coupling analysis (see the module docstring)."""

    name = "dimension-coupling"

    @classmethod
    def compute(cls, module: Module, analyses) -> CouplingResult:
        return _Builder(module).run()


def _layer_of(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", f".{name}")
    return int(m.group(1)) if m else None


class _Builder:
    def __init__(self, module: Module) -> None:
        self.module = module
        self.fs = _Factors()
        self.axes: dict[int, list[list[int]]] = {}
        self.refs: dict[int, Ref] = {}
        self.head_factors: list[int] = []  # factors on an attention head axis
        self.embedding_factors: list[int] = []
        self.contractions: list[tuple[Op, list[int]]] = []  # matmul: (op, contracted axis)
        self.pending_reductions: list[tuple[Op, list[int]]] = []  # sum/mean: (op, reduced axis)

    # --- descriptors --------------------------------------------------------------------------
    def desc(self, ref: Ref) -> list[list[int]]:
        key = id(ref)
        if key not in self.axes:
            ty = ref.type
            assert isinstance(ty, TensorType)
            self.axes[key] = [[self.fs.new(d if isinstance(d, int) else None)] for d in ty.shape]
            self.refs[key] = ref
        return self.axes[key]

    def pin_all(self, ref: Ref, reason: str) -> None:
        for axis in self.desc(ref):
            for f in axis:
                self.fs.pin(f, reason)

    def where(self, op: Op) -> str:
        return f"op {op.kind}" + (f" at {op.loc}" if op.loc else "")

    # --- pass 1: coupling ---------------------------------------------------------------------
    def run(self) -> CouplingResult:
        for v in self.module.graph.inputs:
            if isinstance(v.type, TensorType):
                self.pin_all(v, "graph input")
        for op in self.module.graph.ops:
            self.couple(op)
        for v in self.module.graph.outputs:
            self.pin_all(v, "model output (e.g. the vocabulary)")
        result = CouplingResult(self.fs, self.axes, self.refs)
        self.check_zeros(result)
        self.collect_families(result)
        return result

    def tensors(self, op: Op) -> list[Ref]:
        return [r for r in (*op.operands(), *op.params()) if isinstance(r.type, TensorType)]

    def couple(self, op: Op) -> None:
        kind = op.kind
        results = [r for r in op.results if isinstance(r.type, TensorType)]
        for r in results:
            self.desc(r)
        handler = getattr(self, "_" + kind.replace(".", "_"), None)
        if kind in ELEMENTWISE:
            self.broadcast(op)
        elif handler is not None:
            handler(op)
        elif kind in CREATION:
            for r in results:
                self.pin_all(r, f"made with a fixed size by {self.where(op)}")
        elif kind in ("dim", "sym.add", "sym.sub", "sym.mul", "sym.floordiv", "sym.mod", "sym.neg"):
            pass
        else:
            for r in self.tensors(op) + results:
                self.pin_all(r, f"{self.where(op)} is not modelled by the coupling analysis")

    def broadcast(self, op: Op) -> None:
        out = op.results[0]
        out_desc = self.desc(out)
        rank = len(out_desc)
        for ref in self.tensors(op):
            d = self.desc(ref)
            for j, axis in enumerate(d):
                k = j + rank - len(d)
                if k < 0:
                    continue
                size = ref.type.shape[j]
                if size == 1 and out.type.shape[k] != 1:
                    continue
                self.fs.unify(axis, out_desc[k], f"{self.where(op)} broadcasts mismatched axes")

    def _linear(self, op: Op) -> None:
        x, w = op.args[0], op.args[1]
        bias = op.args[2] if len(op.args) > 2 else None
        out = self.desc(op.results[0])
        xd, wd = self.desc(x), self.desc(w)
        for a, b in zip(xd[:-1], out[:-1]):
            self.fs.unify(a, b, self.where(op))
        self.fs.unify(xd[-1], wd[1], self.where(op))
        self.fs.unify(out[-1], wd[0], self.where(op))
        if bias is not None:
            self.fs.unify(self.desc(bias)[0], wd[0], self.where(op))

    def _lora_linear(self, op: Op) -> None:
        self._linear(op)
        w, lora_a, lora_b = op.args[1], op.args[3], op.args[4]
        wd, ad, bd = self.desc(w), self.desc(lora_a), self.desc(lora_b)
        self.fs.unify(ad[1], wd[1], self.where(op))  # A's columns follow W's input columns
        self.fs.unify(bd[0], wd[0], self.where(op))  # B's rows follow W's output rows
        self.fs.unify(ad[0], bd[1], self.where(op))
        self.fs.pin(ad[0][0], "the LoRA rank")

    def _embedding(self, op: Op) -> None:
        w, ids = op.args[0], op.args[1]
        out, wd = self.desc(op.results[0]), self.desc(w)
        for a, b in zip(self.desc(ids), out[:-1]):
            self.fs.unify(a, b, self.where(op))
        self.fs.unify(out[-1], wd[1], self.where(op))
        self.fs.pin(wd[0][0], "the vocabulary")
        self.embedding_factors.extend(wd[1])

    def _matmul(self, op: Op) -> None:
        a, b = op.args[0], op.args[1]
        ad, bd, out = self.desc(a), self.desc(b), self.desc(op.results[0])
        if len(ad) < 2 or len(bd) < 2:
            for r in (a, b, op.results[0]):
                self.pin_all(r, f"{self.where(op)} on vectors")
            return
        self.fs.unify(ad[-1], bd[-2], self.where(op))
        self.fs.unify(out[-2], ad[-2], self.where(op))
        self.fs.unify(out[-1], bd[-1], self.where(op))
        self.contractions.append((op, ad[-1]))
        for src in (ad, bd):
            for j in range(len(src) - 2):
                k = j + len(out) - len(src)
                if k >= 0:
                    self.fs.unify(src[j], out[k], self.where(op))

    _bmm = _matmul

    def _reshape(self, op: Op) -> None:
        x, out = op.args[0], op.results[0]
        src, dst = self.desc(x), self.desc(out)
        in_shape, out_shape = list(x.type.shape), list(out.type.shape)
        i = j = 0
        why = f"{self.where(op)} mixes symbolic and channel sizes"
        while i < len(in_shape) or j < len(out_shape):
            if i < len(in_shape) and in_shape[i] == 1:
                i += 1
                continue
            if j < len(out_shape) and out_shape[j] == 1:
                j += 1
                continue
            if i >= len(in_shape) or j >= len(out_shape):
                break
            a, b = in_shape[i], out_shape[j]
            if isinstance(a, str) or isinstance(b, str):
                if a == b:
                    self.fs.unify(src[i], dst[j], why)
                    i, j = i + 1, j + 1
                    continue
                break
            left, right = [i], [j]
            pa, pb = a, b
            while pa != pb:
                if pa < pb and i + len(left) < len(in_shape) and isinstance(in_shape[i + len(left)], int):
                    pa *= in_shape[i + len(left)]
                    left.append(i + len(left))
                elif pb < pa and j + len(right) < len(out_shape) and isinstance(out_shape[j + len(right)], int):
                    pb *= out_shape[j + len(right)]
                    right.append(j + len(right))
                else:
                    break
            if pa != pb:
                break
            self.fs.unify([f for k in left for f in src[k]], [f for k in right for f in dst[k]], why)
            i, j = left[-1] + 1, right[-1] + 1
        else:
            return
        self.pin_all(x, why)
        self.pin_all(out, why)

    def _permute_like(self, op: Op, order: list[int]) -> None:
        src, dst = self.desc(op.args[0]), self.desc(op.results[0])
        for k, j in enumerate(order):
            self.fs.unify(src[j], dst[k], self.where(op))

    def _transpose(self, op: Op) -> None:
        rank = len(op.args[0].type.shape)
        order = list(range(rank))
        a, b = op.args[1] % rank, op.args[2] % rank
        order[a], order[b] = order[b], order[a]
        self._permute_like(op, order)

    def _t(self, op: Op) -> None:
        self._permute_like(op, list(range(len(op.args[0].type.shape)))[::-1])

    def _permute(self, op: Op) -> None:
        rank = len(op.args[0].type.shape)
        self._permute_like(op, [d % rank for d in op.args[1]])

    def _unsqueeze(self, op: Op) -> None:
        src, dst = self.desc(op.args[0]), self.desc(op.results[0])
        d = op.args[1] % len(dst)
        kept = [k for k in range(len(dst)) if k != d]
        for j, k in enumerate(kept):
            self.fs.unify(src[j], dst[k], self.where(op))

    def _squeeze(self, op: Op) -> None:
        self.broadcast_like_reduction(op)

    _squeeze_dims = _squeeze

    def broadcast_like_reduction(self, op: Op) -> None:
        # squeeze removes size-1 axes only: unify the remaining axes in order
        x = op.args[0]
        src = [a for a, s in zip(self.desc(x), x.type.shape) if s != 1]
        dst = [a for a, s in zip(self.desc(op.results[0]), op.results[0].type.shape) if s != 1]
        for a, b in zip(src, dst):
            self.fs.unify(a, b, self.where(op))

    def _expand(self, op: Op) -> None:
        x, out = op.args[0], op.results[0]
        src, dst = self.desc(x), self.desc(out)
        offset = len(dst) - len(src)
        for k in range(len(dst)):
            j = k - offset
            if j >= 0 and not (x.type.shape[j] == 1 and out.type.shape[k] != 1):
                self.fs.unify(src[j], dst[k], self.where(op))
            else:
                self.pin_all_axis(dst[k], f"axis made by {self.where(op)} (a broadcast copy)")

    def pin_all_axis(self, axis: list[int], reason: str) -> None:
        for f in axis:
            self.fs.pin(f, reason)

    def _slice(self, op: Op) -> None:
        x, out = op.args[0], op.results[0]
        dim = op.args[1] % len(x.type.shape) if len(op.args) > 1 else 0
        start = op.args[2] if len(op.args) > 2 else 0
        end = op.args[3] if len(op.args) > 3 else None
        step = op.args[4] if len(op.args) > 4 else 1
        src, dst = self.desc(x), self.desc(out)
        full = x.type.shape[dim] == out.type.shape[dim] and start in (0, None) and step == 1
        for k in range(len(src)):
            if k == dim and not full:
                reason = f"sliced by {self.where(op)}"
                self.pin_all_axis(src[k], reason)
                self.pin_all_axis(dst[k], reason)
            else:
                self.fs.unify(src[k], dst[k], self.where(op))
        del end

    def _along_axis_pinned(self, op: Op, tensors: list[Ref], outs: list[Ref], dim: int) -> None:
        reason = f"split or joined along an axis by {self.where(op)}"
        for ref in tensors + outs:
            d = self.desc(ref)
            self.pin_all_axis(d[dim % len(d)], reason)
        for ref in tensors:
            for out in outs:
                for k, (a, b) in enumerate(zip(self.desc(ref), self.desc(out))):
                    if k != dim % len(self.desc(ref)):
                        self.fs.unify(a, b, self.where(op))

    def _concat(self, op: Op) -> None:
        dim = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim", 0)
        self._along_axis_pinned(op, [v for v in op.args[0] if isinstance(v, (Value, Param))],
                                [op.results[0]], dim)

    def _split(self, op: Op) -> None:
        dim = op.args[2] if len(op.args) > 2 else op.kwargs.get("dim", 0)
        self._along_axis_pinned(op, [op.args[0]], list(op.results), dim)

    _split_with_sizes = _split
    _chunk = _split

    def _softmax(self, op: Op) -> None:
        x, out = op.args[0], op.results[0]
        dim = op.args[1] % len(x.type.shape)
        src, dst = self.desc(x), self.desc(out)
        for k in range(len(src)):
            if k == dim:
                self.pin_all_axis(src[k], f"normalised over by {self.where(op)}")
            self.fs.unify(src[k], dst[k], self.where(op))

    _softmax_internal = _softmax
    _log_softmax = _softmax
    _log_softmax_int = _softmax

    def _sum(self, op: Op) -> None:
        x, out = op.args[0], op.results[0]
        rank = len(x.type.shape)
        dims = op.args[1] if len(op.args) > 1 and op.args[1] is not None else list(range(rank))
        dims = {d % rank for d in (dims if isinstance(dims, list) else [dims])}
        keepdim = bool(op.args[2]) if len(op.args) > 2 else bool(op.kwargs.get("keepdim", False))
        src, dst = self.desc(x), self.desc(out)
        k = 0
        for j in range(rank):
            if j in dims:
                self.pending_reductions.append((op, src[j]))
                if keepdim:
                    k += 1
                continue
            self.fs.unify(src[j], dst[k], self.where(op))
            k += 1

    _mean = _sum

    def _sdpa(self, op: Op) -> None:
        q, k, v = op.args[0], op.args[1], op.args[2]
        qd, kd, vd, out = self.desc(q), self.desc(k), self.desc(v), self.desc(op.results[0])
        why = self.where(op)
        for j in range(len(qd) - 3):  # batch axes
            for src in (kd, vd, out):
                self.fs.unify(qd[j], src[j], why)
        h = len(qd) - 3
        self.fs.unify(kd[h], vd[h], why)
        if q.type.shape[h] == k.type.shape[h]:
            self.fs.unify(qd[h], kd[h], why)
        else:  # grouped-query attention inside sdpa: query heads = (kv heads, heads per group)
            rep = self.fs.new(q.type.shape[h] // k.type.shape[h], f"query heads per KV head in {why}")
            self.fs.unify(qd[h], kd[h] + [rep], why)
        self.fs.unify(qd[h], out[h], why)
        self.fs.unify(qd[h + 1], out[h + 1], why)
        self.fs.unify(kd[h + 1], vd[h + 1], why)
        self.fs.unify(qd[h + 2], kd[h + 2], why)
        self.fs.unify(vd[h + 2], out[h + 2], why)
        reason = f"head_dim: {why} (and RoPE) use it whole"
        for axis in (qd[h + 2], vd[h + 2]):
            self.pin_all_axis(axis, reason)
        self.head_factors.extend(kd[h])

    # --- pass 2: zeros in the masked model ------------------------------------------------------
    def check_zeros(self, result: CouplingResult) -> None:
        fs = self.fs

        def classes(ref: Ref) -> set[int]:
            return {fs.find(x) for axis in self.desc(ref) for f in axis for x in fs.leaves(f)}

        zero: dict[int, set[int]] = {}
        for p in self.module.params.values():
            if id(p) in self.axes:
                zero[id(p)] = classes(p)

        def z(ref) -> set[int]:
            return zero.get(id(ref), set()) if isinstance(ref, (Value, Param)) else set()

        reduced: dict[int, list] = {}
        for op, axis in self.pending_reductions:
            reduced.setdefault(id(op), []).append(axis)
        contracted = {id(op): axis for op, axis in self.contractions}
        for op in self.module.graph.ops:
            if not op.results or not isinstance(op.results[0].type, TensorType):
                continue
            out = op.results[0]
            kind = op.kind
            tensors = self.tensors(op)
            if kind in ("linear", "lora_linear"):
                got = classes(out) & ({fs.find(x) for f in self.desc(op.args[1])[0] for x in fs.leaves(f)}
                                      | z(op.args[0]))
            elif kind == "embedding":
                got = {fs.find(x) for f in self.desc(out)[-1] for x in fs.leaves(f)}
            elif kind in ("mul", "mul.scalar"):
                got = set().union(*(z(t) for t in tensors)) if tensors else set()
            elif kind in ("add", "sub"):
                if any(not isinstance(a, (Value, Param)) for a in op.args[:2]):
                    got = set()
                else:
                    got = set.intersection(*(z(t) for t in tensors))
                    for t in tensors:
                        got -= classes(out) - classes(t)
            elif kind in ("div",):
                got = z(op.args[0])
            elif kind == "pow":
                got = z(op.args[0]) if isinstance(op.args[1], (int, float)) and op.args[1] > 0 else set()
            elif kind in ZERO_PRESERVING or kind in ("reshape", "transpose", "permute", "t", "unsqueeze",
                                                      "squeeze", "squeeze.dims", "expand", "slice"):
                got = z(op.args[0])
            elif kind == "sdpa":
                got = z(op.args[2])
            elif kind in REDUCTIONS:
                got = z(op.args[0])
                for axis in reduced.get(id(op), []):
                    leaves = {fs.find(x) for f in axis for x in fs.leaves(f)}
                    for leaf in leaves:
                        if fs.size[leaf] in (None, 1) or leaf in fs.pinned:
                            continue
                        if leaf in got:
                            result.reductions.append(ReductionRecord(op, [leaf]))
                        else:
                            fs.pin(leaf, f"reduced by {self.where(op)} where it is not zero when pruned")
            else:
                got = set()
            if id(op) in contracted:
                a_zero, b_zero = z(op.args[0]), z(op.args[1])
                for f in contracted[id(op)]:
                    for leaf in fs.leaves(f):
                        if fs.find(leaf) not in a_zero | b_zero:
                            fs.pin(leaf, f"contracted by {self.where(op)} between non-zero activations")
            zero[id(out)] = got & classes(out)

    # --- families -------------------------------------------------------------------------------
    def collect_families(self, result: CouplingResult) -> None:
        fs = self.fs
        members: dict[int, list[tuple[str, int, int]]] = {}
        order: list[int] = []
        for p in self.module.params.values():
            if id(p) not in self.axes:
                continue
            for axis, desc in enumerate(self.axes[id(p)]):
                leaves = [fs.find(x) for f in desc for x in fs.leaves(f)]
                stride = 1
                strides = []
                for leaf in reversed(leaves):
                    strides.append(stride)
                    stride *= fs.size[leaf] or 1
                strides.reverse()
                for leaf, st in zip(leaves, strides):
                    if fs.size[leaf] in (None, 1):
                        continue
                    if leaf in fs.pinned:
                        result.unprunable.append((p.name, axis, fs.pinned[leaf]))
                        continue
                    if leaf not in members:
                        members[leaf] = []
                        order.append(leaf)
                    members[leaf].append((p.name, axis, st))
        heads = {fs.find(x) for f in self.head_factors for x in fs.leaves(f)}
        hidden = {fs.find(x) for f in self.embedding_factors for x in fs.leaves(f)}
        for leaf in order:
            kind = "attn" if leaf in heads else "hidden" if leaf in hidden else "mlp"
            layers = {_layer_of(name) for name, _, _ in members[leaf]}
            layer = layers.pop() if len(layers) == 1 else None
            if kind == "mlp" and layer is None:
                kind = "other"
            result.family_of_leaf[leaf] = len(result.families)
            result.families.append((leaf, kind, layer, fs.size[leaf], members[leaf]))
        # dedupe unprunable reasons per (param, axis)
        seen = set()
        unique = []
        for name, axis, reason in result.unprunable:
            if (name, axis) not in seen:
                seen.add((name, axis))
                unique.append((name, axis, reason))
        result.unprunable = unique
