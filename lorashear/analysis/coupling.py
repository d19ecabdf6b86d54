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
from lorashear.analysis.coupling_rules.shapes import dim_product
from lorashear.analysis.manager import Analysis
from lorashear.analysis.moe import couple_experts, expert_families
from lorashear.analysis.zero_rules import ZERO_RULES
from lorashear.ir.core import Module, Op, Param, Value
from lorashear.ir.types import TensorType

Ref = Value | Param


class _Factors:
    """Union-find over factors with two refinements: a factor can be *split* into a product of
    sub-factors (mixed radix, ``children``) or *cut* into a sum of consecutive segments
    (``segments``: a fused projection's output sliced into q | k | v of unequal sizes).

    A cut factor stays one leaf for :meth:`leaves` and :meth:`unify` (its index space is still
    one range); :meth:`atoms` looks through the cuts, to the index spaces that become families.
    """

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int | None] = []  # None: a symbolic size (batch, sequence)
        self.children: dict[int, list[int]] = {}
        self.segments: dict[int, list[int]] = {}
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

    def atoms(self, f: int) -> list[int]:
        """The leaves of ``f`` with every cut factor replaced by its segments' atoms, in index
        order: the index spaces that can become families."""
        out = []
        for leaf in self.leaves(f):
            segments = self.segments.get(leaf)
            out.extend([leaf] if segments is None else [a for s in segments for a in self.atoms(s)])
        return out

    def pin(self, f: int, reason: str) -> None:
        for leaf in self.leaves(f):
            self.pinned.setdefault(leaf, reason)
            for segment in self.segments.get(leaf, ()):
                self.pin(segment, reason)

    def is_pinned(self, f: int) -> bool:
        return self.find(f) in self.pinned

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        if rb in self.pinned:
            self.pinned.setdefault(ra, self.pinned[rb])
        if rb in self.segments:  # the caller aligned the segments of both (see _join)
            self.segments.setdefault(ra, self.segments[rb])
            del self.segments[rb]
        if ra in self.pinned:  # a pinned cut factor: its segments too
            for segment in self.segments.get(ra, ()):
                self.pin(segment, self.pinned[ra])

    def split(self, f: int, outer: int) -> tuple[int, int]:
        """Refine leaf ``f`` of size n into (outer, n // outer), everywhere it is used."""
        root = self.find(f)
        n = self.size[root]
        assert n is not None and n % outer == 0 and root not in self.children and root not in self.segments
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
            elif a in self.segments or b in self.segments:
                break  # a cut range cannot also be a product (its segments would interleave)
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
            if not self._join(a, b, why):
                for f in ls + rs:
                    self.pin(f, why)
                return False
        return True

    # --- cuts (sums of segments) -------------------------------------------------------------
    def _join(self, a: int, b: int, why: str) -> bool:
        """Union two leaves of equal size; where both are cut, first cut each at the other's
        boundaries and identify the segments pairwise."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return True
        if a in self.segments and b in self.segments:
            bounds_a, bounds_b = self.boundaries(a), self.boundaries(b)
            if not (self.cut(a, bounds_b) and self.cut(b, bounds_a)):
                return False
            fine_a, fine_b = self.finest(a), self.finest(b)
            assert [self.size[self.find(x)] for x in fine_a] == [self.size[self.find(y)] for y in fine_b]
            self.union(a, b)  # a keeps its segments
            return all(self.unify([x], [y], why) for x, y in zip(fine_a, fine_b))
        self.union(a, b)
        return True

    def finest(self, f: int) -> list[int]:
        """The segments of a cut leaf ``f``, recursively (an uncut segment is itself), in order."""
        root = self.find(f)
        segments = self.segments.get(root)
        return [root] if segments is None else [x for s in segments for x in self.finest(s)]

    def boundaries(self, f: int) -> list[int]:
        """The offsets at which the cut leaf ``f``'s finest segments start (0 left out)."""
        offsets, at = [], 0
        for s in self.finest(f)[:-1]:
            at += self.size[self.find(s)]
            offsets.append(at)
        return offsets

    def cut(self, f: int, points: list[int]) -> bool:
        """Make each of ``points`` (offsets inside ``f``) a segment boundary of the leaf ``f``;
        False where ``f`` is not one static range that can be cut there (a product, or a
        segment that is itself a product)."""
        root = self.find(f)
        n = self.size[root]
        inside = sorted({p for p in points if n is not None and 0 < p < n})
        if not inside:
            return True
        if n is None or root in self.children:
            return False
        segments = self.segments.get(root)
        if segments is None:
            reason = self.pinned.get(root)
            edges = [0, *inside, n]
            self.segments[root] = [self.new(hi - lo, reason) for lo, hi in zip(edges, edges[1:])]
            return True
        at = 0
        for s in segments:
            size = self.size[self.find(s)]
            if not self.cut(s, [p - at for p in inside]):
                return False
            at += size
        return True

    def pieces(self, f: int, start: int, stop: int) -> list[int] | None:
        """The segments that make up indices ``[start, stop)`` of the cut leaf ``f`` (cut there
        first), coarsest first; None where it cannot be cut there."""
        if not self.cut(f, [start, stop]):
            return None
        root = self.find(f)
        if (start, stop) == (0, self.size[root]):
            return [root]
        out, at = [], 0
        for s in self.segments[root]:
            size = self.size[self.find(s)]
            lo, hi = max(start, at), min(stop, at + size)
            if lo < hi:
                inner = self.pieces(s, lo - at, hi - at)
                if inner is None:
                    return None
                out.extend(inner)
            at += size
        return out

    def join_sum(self, f: int, pieces: list[int], why: str) -> bool:
        """Identify the leaf ``f`` with the concatenation of ``pieces`` (their sizes add up to
        ``f``'s): ``f`` is cut at the pieces' boundaries and each segment joined with its
        piece. False where ``f`` cannot be cut there."""
        if len(pieces) == 1:
            return self.unify([f], pieces, why)
        at = 0
        for piece in pieces:
            size = self.size[self.find(piece)]
            sub = self.pieces(f, at, at + size)
            if sub is None or not (self.unify(sub, [piece], why) if len(sub) == 1
                                   else self.join_sum(piece, sub, why)):
                return False
            at += size
        return True

    def extent(self, f: int, new_size: dict[int, int]) -> int:
        """The length of ``f``'s index range once families shrink to ``new_size`` (kept units per
        family leaf; a symbolic size counts 1)."""
        total = 1
        for leaf in self.leaves(f):
            root = self.find(leaf)
            if root in self.segments:
                total *= sum(self.extent(s, new_size) for s in self.segments[root])
            else:
                known = self.size[root]
                total *= new_size.get(root, 1 if known is None else known)
        return total


@dataclass
class ReductionRecord:
    """A reduction (sum, mean, rms_norm) whose reduced axes carry prunable factors that are
    zero when pruned: compress keeps a mean's divisor or rescales the norm."""

    op: Op
    factors: list[int]


class CouplingMember(NamedTuple):
    """One parameter axis a family runs along: index r in ``[start, stop)`` (``stop`` None: the
    axis' end) is in unit ``((r - start) // stride) % size``."""

    param: str
    axis: int
    stride: int
    start: int = 0
    stop: int | None = None


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
        self.copy_factors: list[tuple[int, str]] = []  # axes made by a broadcast, with the reason

    # --- descriptors --------------------------------------------------------------------------
    def desc(self, ref: Ref) -> list[list[int]]:
        """The factor list of each axis of ``ref`` (fresh factors on first sight)."""
        key = id(ref)
        if key not in self.axes:
            ty = ref.type
            assert isinstance(ty, TensorType)
            self.axes[key] = [self._fresh_axis(d) for d in ty.shape]
            self.refs[key] = ref
        return self.axes[key]

    def _fresh_axis(self, dim: int | str) -> list[int]:
        """Fresh factors for one axis: one of a static or symbolic size; a product of symbols
        and an integer (``"16*B"``, attention heads merged into the batch by a ``reshape``)
        gets one symbolic factor per symbol and then one for the integer, major first, so the
        heads stay a factor of their own (the usual ``[B, heads] -> [B*heads]`` order)."""
        if isinstance(dim, int):
            return [self.fs.new(dim)]
        syms, k = dim_product(dim)
        if k == 1 or not syms:
            return [self.fs.new(None)]
        return [self.fs.new(None) for _ in syms] + [self.fs.new(k)]

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
        self.pin_grouped_copies()
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

    def pin_grouped_copies(self) -> None:
        """Pin the broadcast copies (``expand``) that ended up an inner part of a larger index
        space, below a channel factor (GQA's ``[kv, copies]`` merged into the query heads:
        removing a copy there would take a query head from one KV group only), or that were
        split themselves. Copies that are a whole or outermost factor stay free (multi-query
        heads, ``[heads, head_dim]``; see the ``expand`` rule)."""
        fs = self.fs
        inner = {fs.find(child) for kids in fs.children.values() for i, child in enumerate(kids)
                 if any(fs.size[fs.find(k)] not in (None, 1) for k in kids[:i])}
        split = {fs.find(root) for root in fs.children}
        for factor, reason in self.copy_factors:
            root = fs.find(factor)
            if root in inner or root in split or fs.size[root] is None:
                fs.pin(factor, reason)

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
        params = [p for p in self.module.params.values() if id(p) in self.axes]
        for p in params:  # first pin the cuts no member can express, wherever they are used
            for axis, desc in enumerate(self.axes[id(p)]):
                self._axis_units(desc, p.type.shape[axis])
        for p in params:
            for axis, desc in enumerate(self.axes[id(p)]):
                length = p.type.shape[axis]
                for leaf, stride, start, stop, reason in self._axis_units(desc, length):
                    if reason is not None:
                        result.unprunable.append((p.name, axis, reason))
                        continue
                    if leaf not in members:
                        members[leaf] = []
                        order.append(leaf)
                    whole = start == 0 and stop == length
                    members[leaf].append(CouplingMember(p.name, axis, stride, start, None if whole else stop))
        heads = {fs.find(x) for f in self.head_factors for x in fs.atoms(f)}
        hidden = {fs.find(x) for f in self.embedding_factors for x in fs.atoms(f)}
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

    def _axis_units(self, desc: list[int], length) -> list[tuple[int, int, int, int, str | None]]:
        """The index spaces along one parameter axis (factor list ``desc``, ``length`` long):
        ``(leaf, stride, start, stop, pinned reason or None)``, index r in ``[start, stop)``
        being in unit ``((r - start) // stride) % size``. A cut factor contributes its
        segments' spaces, each over its own range; that range is contiguous only where the cut
        factor is the outermost of its range, so a cut factor inside another is pinned (here,
        so that no other parameter axis makes a family of it either)."""
        fs = self.fs
        out: list[tuple[int, int, int, int, str | None]] = []

        def walk(factors: list[int], start: int, stop: int, inherited: str | None) -> None:
            leaves = [fs.find(x) for f in factors for x in fs.leaves(f)]
            stride = stop - start
            for k, leaf in enumerate(leaves):
                size = fs.size[leaf]
                if size is None:
                    stride = 1  # a symbolic axis: one unit space per index (never a family)
                    continue
                stride //= size
                reason = inherited or fs.pinned.get(leaf)
                if leaf in fs.segments:
                    outer = [fs.size[x] for x in leaves[:k]]
                    if any(s not in (1,) for s in outer):
                        reason = reason or "cut into pieces inside another axis (a fused projection's " \
                            "q, k and v within each head), which a parameter's row ranges cannot express"
                        fs.pin(leaf, reason)
                        for atom in fs.atoms(leaf):
                            if fs.size[fs.find(atom)] not in (None, 1):
                                out.append((fs.find(atom), stride, start, stop, reason))
                        continue
                    at = start
                    for segment in fs.segments[leaf]:
                        width = fs.extent(segment, {}) * stride
                        walk([segment], at, at + width, reason)
                        at += width
                    continue
                if size != 1:
                    out.append((leaf, stride, start, stop, reason))

        if isinstance(length, int):
            walk(desc, 0, length, None)
        return out


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
        """The classes (leaf roots, a cut leaf with its segments' atoms) of one axis' factor
        list."""
        fs = self.fs
        return {fs.find(x) for f in axis for x in fs.leaves(f) + fs.atoms(f)}

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
