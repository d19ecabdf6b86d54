"""Dimension coupling: which channels of which tensors must be removed together.

Every tensor axis is described by a mixed-radix list of *factors* (major first); a factor is
an index space shared, through union-find, by every axis it flows through. Ops couple
factors: a linear joins its input's last axis with the weight's columns; a residual add joins
its operands' axes; a reshape from ``[.., 576]`` to ``[.., 9, 64]`` splits the factor into
``9 x 64`` (refining it everywhere it is used). A factor that cannot be removed safely is
*pinned* with the reason: graph inputs and outputs (the vocabulary), axes an op uses as a
whole (RoPE's slices of head_dim, softmax), factors made by ``expand`` (GQA's query heads per
KV head), reductions over channels that are not zero when pruned, ops the analysis does not
model (each such kind says why, see :func:`~lorashear.analysis.coupling_rules.pins`). Every
unpinned factor left is a family of minimally removable groups.

A second, forward pass computes which channels are exactly zero in the masked model, so a
reduction over a pruned axis (RMSNorm's mean) is accepted only where it sees zeros, and is
recorded for ``compress`` to keep the original divisor (or rescale an ``rms_norm``).

This module holds the machinery (factors, the builder, families); what each op kind couples
is a rule in :mod:`lorashear.analysis.coupling_rules`, what it leaves zero a rule in
:mod:`lorashear.analysis.zero_rules`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

from lorashear.analysis.coupling_rules import COUPLING_RULES
from lorashear.analysis.manager import Analysis
from lorashear.analysis.moe import couple_experts, expert_families
from lorashear.analysis.zero_rules import ZERO_RULES
from lorashear.ir.core import Module, Op, Param, Value
from lorashear.ir.types import TensorType

Ref = Value | Param


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
    """A reduction (sum, mean, rms_norm) whose reduced axes carry prunable factors that are
    zero when pruned: compress keeps a mean's divisor or rescales the norm."""

    op: Op
    factors: list[int]


class CouplingMember(NamedTuple):
    """One parameter axis a family runs along: index r is in unit ``(r // stride) % size``."""

    param: str
    axis: int
    stride: int


class CouplingFamily(NamedTuple):
    """One unpinned factor that parameters run along: ``size`` minimally removable groups."""

    leaf: int
    """The factor (a union-find root) the family is."""
    kind: str
    """``attn`` (a KV-head factor), ``hidden`` (the embedding's columns), ``mlp`` or ``other``."""
    layer: int | None
    """The one layer every member belongs to, or None."""
    size: int
    members: list[CouplingMember]


@dataclass
class CouplingResult:
    """Axis descriptors of every tensor and the families of removable groups they imply."""

    factors: _Factors
    axes: dict[int, list[list[int]]]  # id(value or param) -> factor list per axis
    refs: dict[int, Ref]
    families: list[CouplingFamily] = field(default_factory=list)
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
        return CouplingBuilder(module).run()


def _layer_of(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", f".{name}")
    return int(m.group(1)) if m else None


class CouplingBuilder:
    """Builds a :class:`CouplingResult`: coupling rules per op, then zeros, then families.

    Rules (:mod:`~lorashear.analysis.coupling_rules`) read and extend its state: ``fs``, the
    factors; ``desc(ref)``, a tensor's factor list per axis; and the facts later steps need
    (``head_factors``, ``embedding_factors`` name families; ``contractions`` and
    ``pending_reductions`` are checked by the zero rules).
    """

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
        """The factor list of each axis of ``ref`` (fresh factors on first sight)."""
        key = id(ref)
        if key not in self.axes:
            ty = ref.type
            assert isinstance(ty, TensorType)
            self.axes[key] = [[self.fs.new(d if isinstance(d, int) else None)] for d in ty.shape]
            self.refs[key] = ref
        return self.axes[key]

    def pin_all(self, ref: Ref, reason: str) -> None:
        """Pin every axis of ``ref``."""
        for axis in self.desc(ref):
            for f in axis:
                self.fs.pin(f, reason)

    def pin_axis(self, axis: list[int], reason: str) -> None:
        """Pin one axis (its factor list)."""
        for f in axis:
            self.fs.pin(f, reason)

    def where(self, op: Op) -> str:
        return f"op {op.kind}" + (f" at {op.loc}" if op.loc else "")

    def tensors(self, op: Op) -> list[Ref]:
        """The op's tensor operands and parameters."""
        return [r for r in (*op.operands(), *op.params()) if isinstance(r.type, TensorType)]

    def tensor_results(self, op: Op) -> list[Value]:
        return [r for r in op.results if isinstance(r.type, TensorType)]

    # --- pass 1: coupling ---------------------------------------------------------------------
    def run(self) -> CouplingResult:
        for v in self.module.graph.inputs:
            if isinstance(v.type, TensorType):
                self.pin_all(v, "graph input")
        for op in self.module.graph.ops:
            self.couple(op)
        couple_experts(self)  # MoE: the routing matrix's expert axis is the router's
        for v in self.module.graph.outputs:
            self.pin_all(v, "model output (e.g. the vocabulary)")
        result = CouplingResult(self.fs, self.axes, self.refs)
        self.check_zeros(result)
        self.collect_families(result)
        expert_families(self, result)  # MoE: whole experts (analysis/moe.py)
        return result

    def couple(self, op: Op) -> None:
        """Apply the op kind's coupling rule; a kind with none (not an IR kind) is pinned."""
        results = self.tensor_results(op)
        for r in results:
            self.desc(r)
        rule = COUPLING_RULES.get(op.kind)
        if rule is not None:
            rule(self, op)
            return
        for r in self.tensors(op) + results:
            self.pin_all(r, f"{self.where(op)} is not modelled by the coupling analysis")

    # --- pass 2: zeros in the masked model ------------------------------------------------------
    def check_zeros(self, result: CouplingResult) -> None:
        """Walk the ops forward with the zero rules (see :mod:`~lorashear.analysis.zero_rules`)."""
        ctx = ZeroContext(self, result)
        for p in self.module.params.values():
            if id(p) in self.axes:
                ctx.zero[id(p)] = ctx.classes(p)
        for op in self.module.graph.ops:
            if not op.results or not isinstance(op.results[0].type, TensorType):
                continue
            out = op.results[0]
            rule = ZERO_RULES.get(op.kind)
            got = rule(ctx, op) if rule is not None else set()
            ctx.zero[id(out)] = got & ctx.classes(out)

    # --- families -------------------------------------------------------------------------------
    def collect_families(self, result: CouplingResult) -> None:
        fs = self.fs
        members: dict[int, list[CouplingMember]] = {}
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
                    members[leaf].append(CouplingMember(p.name, axis, st))
        heads = {fs.find(x) for f in self.head_factors for x in fs.leaves(f)}
        hidden = {fs.find(x) for f in self.embedding_factors for x in fs.leaves(f)}
        for leaf in order:
            kind = "attn" if leaf in heads else "hidden" if leaf in hidden else "mlp"
            layers = {_layer_of(m.param) for m in members[leaf]}
            layer = layers.pop() if len(layers) == 1 else None
            if kind == "mlp" and layer is None:
                kind = "other"
            result.family_of_leaf[leaf] = len(result.families)
            result.families.append(CouplingFamily(leaf, kind, layer, fs.size[leaf], members[leaf]))
        # dedupe unprunable reasons per (param, axis)
        seen = set()
        unique = []
        for name, axis, reason in result.unprunable:
            if (name, axis) not in seen:
                seen.add((name, axis))
                unique.append((name, axis, reason))
        result.unprunable = unique


class ZeroContext:
    """What a zero rule reads: the factors, each value's zero classes so far, and the
    reductions and contractions the coupling rules recorded for the op."""

    def __init__(self, builder: CouplingBuilder, result: CouplingResult) -> None:
        self.builder = builder
        self.result = result
        self.fs = builder.fs
        #: id(value or param) -> the factor classes that are zero in it when pruned
        self.zero: dict[int, set[int]] = {}
        self._reduced: dict[int, list[list[int]]] = {}
        for op, axis in builder.pending_reductions:
            self._reduced.setdefault(id(op), []).append(axis)
        self._contracted = {id(op): axis for op, axis in builder.contractions}
        self._all_contracted: dict[int, list[list[int]]] = {}
        for op, axis in builder.contractions:
            self._all_contracted.setdefault(id(op), []).append(axis)

    def desc(self, ref: Ref) -> list[list[int]]:
        return self.builder.desc(ref)

    def where(self, op: Op) -> str:
        return self.builder.where(op)

    def tensors(self, op: Op) -> list[Ref]:
        return self.builder.tensors(op)

    def axis_classes(self, axis: list[int]) -> set[int]:
        """The classes (leaf roots) of one axis' factor list."""
        fs = self.fs
        return {fs.find(x) for f in axis for x in fs.leaves(f)}

    def classes(self, ref: Ref) -> set[int]:
        """The classes of every axis of ``ref``."""
        return {c for axis in self.desc(ref) for c in self.axis_classes(axis)}

    def zeros(self, ref) -> set[int]:
        """The classes zero in ``ref`` when pruned (none for a literal or ``None``)."""
        return self.zero.get(id(ref), set()) if isinstance(ref, (Value, Param)) else set()

    def reduced_axes(self, op: Op) -> list[list[int]]:
        """The channel axes (factor lists) a coupling rule recorded ``op`` as reducing over."""
        return self._reduced.get(id(op), [])

    def contracted_axis(self, op: Op) -> list[int] | None:
        """The axis a matrix product contracts, when its coupling rule recorded one."""
        return self._contracted.get(id(op))

    def contracted_axes(self, op: Op) -> list[list[int]]:
        """Every axis an op contracts (an ``einsum`` may contract several), as its coupling
        rule recorded them."""
        return self._all_contracted.get(id(op), [])

    def record_reduction(self, op: Op, leaf: int) -> None:
        """``op`` reduces over ``leaf``'s pruned channels, which are zero: compress adapts it."""
        self.result.reductions.append(ReductionRecord(op, [leaf]))
