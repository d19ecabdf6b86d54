"""Coupling rules: for each op kind, which axes of its tensors are one channel space.

A rule receives the :class:`~lorashear.analysis.coupling.CouplingBuilder` and one op, and
identifies (``builder.fs.unify``) the factors of the axes the op carries through unchanged,
or pins (``builder.pin_all``/``builder.pin_axis``) those an op uses as a whole, with the
reason. Every kind in :data:`~lorashear.ir.ops.OP_DEFS` has a rule here: either a rule that
models it, or an explicit :func:`pins` entry that says why its axes cannot be pruned, so
``discover`` reports the reason rather than pinning silently
(``tests/analysis/test_op_coverage.py`` checks it).

A rule is exact when removing the same channels from every axis it identifies, in the
masked or the compressed model, gives the same values on the channels that stay; axes where
that needs more than slicing (a mean over a pruned axis) are recorded for the zero analysis
(:mod:`lorashear.analysis.zero_rules`) and for ``compress``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from lorashear.ir.core import Op, Param, Value
from lorashear.ir.lora import lora_parts
from lorashear.ir.ops import OP_DEFS, RuleTable
from lorashear.ir.types import TensorType

if TYPE_CHECKING:
    from lorashear.analysis.coupling import CouplingBuilder, Ref

CouplingRule = Callable[["CouplingBuilder", Op], None]

#: IR op kind -> its coupling rule.
COUPLING_RULES: RuleTable[CouplingRule] = RuleTable("a coupling rule")
coupling_rule = COUPLING_RULES.register
#: Kinds whose rule only pins, with the reason it gives (a template with ``{op}``).
PIN_REASONS: dict[str, str] = {}


def kinds_without_coupling_rule(kinds: Iterable[str]) -> list[str]:
    """The ``kinds`` with neither a coupling rule nor an explicit :func:`pins` entry: a new IR
    kind must get one or the other (the coverage test walks every kind in ``OP_DEFS``)."""
    return [kind for kind in kinds if kind not in COUPLING_RULES]


def pins(*kinds: str, reason: str, operands: bool = True) -> None:
    """Register for ``kinds`` a rule that pins every axis of the op's results (and of its
    tensor operands unless ``operands=False``) with ``reason``, a template whose ``{op}``
    becomes the op and its module path: the explicit form of "not modelled"."""
    def pin(builder: CouplingBuilder, op: Op) -> None:
        why = reason.format(op=builder.where(op))
        refs = builder.tensors(op) if operands else []
        for ref in refs + builder.tensor_results(op):
            builder.pin_all(ref, why)

    pin.__doc__ = f"Pins {'operands and results' if operands else 'the results'}: {reason}"
    coupling_rule(*kinds)(pin)
    for kind in kinds:
        PIN_REASONS[kind] = reason


# --- elementwise ------------------------------------------------------------------------------
@coupling_rule(*(kind for kind, definition in OP_DEFS.items() if definition.elementwise))
def broadcast(b: CouplingBuilder, op: Op) -> None:
    """Elementwise ops: each operand axis is the output axis it broadcasts to (aligned from
    the right), except a size-1 axis stretched over a larger one. Exact because the op reads
    channel i of every operand to make channel i of the output, so removing channel i
    everywhere removes exactly output channel i."""
    out = op.results[0]
    out_desc = b.desc(out)
    rank = len(out_desc)
    for ref in b.tensors(op):
        d = b.desc(ref)
        for j, axis in enumerate(d):
            k = j + rank - len(d)
            if k < 0:
                continue
            size = ref.type.shape[j]
            if size == 1 and out.type.shape[k] != 1:
                continue
            b.fs.unify(axis, out_desc[k], f"{b.where(op)} broadcasts mismatched axes")


# --- linear algebra -------------------------------------------------------------------------
def _couple_linear(b: CouplingBuilder, op: Op, x: Ref, w: Ref, bias: Ref | None) -> None:
    out = b.desc(op.results[0])
    xd, wd = b.desc(x), b.desc(w)
    for a, c in zip(xd[:-1], out[:-1]):
        b.fs.unify(a, c, b.where(op))
    b.fs.unify(xd[-1], wd[1], b.where(op))
    b.fs.unify(out[-1], wd[0], b.where(op))
    if bias is not None:
        b.fs.unify(b.desc(bias)[0], wd[0], b.where(op))


@coupling_rule("linear")
def _linear(b: CouplingBuilder, op: Op) -> None:
    """``x @ W^T + bias``: x's last axis is W's columns, the output's last axis is W's rows
    and the bias; leading axes pass through. Exact: an input channel meets only its own
    weight column, an output channel comes only from its own row and bias entry."""
    a = op.bound_args()
    _couple_linear(b, op, a["input"], a["weight"], a["bias"])


@coupling_rule("lora_linear")
def _lora_linear(b: CouplingBuilder, op: Op) -> None:
    """A linear plus ``scaling * B(A x)``: as ``linear`` for the base weight; A's columns
    follow W's columns and B's rows follow W's rows (the update is added row for row), and
    the rank (A's rows, B's columns) is pinned: it is the adapter's, not a model channel."""
    parts = lora_parts(op)
    _couple_linear(b, op, parts.x, parts.weight, parts.bias)
    wd, ad, bd = b.desc(parts.weight), b.desc(parts.lora_a), b.desc(parts.lora_b)
    b.fs.unify(ad[1], wd[1], b.where(op))  # A's columns follow W's input columns
    b.fs.unify(bd[0], wd[0], b.where(op))  # B's rows follow W's output rows
    b.fs.unify(ad[0], bd[1], b.where(op))
    b.fs.pin(ad[0][0], "the LoRA rank")


@coupling_rule("embedding")
def _embedding(b: CouplingBuilder, op: Op) -> None:
    """A row lookup: the output's last axis is the table's columns (the hidden channels),
    the other output axes are the indices' axes; the table's rows (the vocabulary) are
    pinned. Exact: output channel j is column j of the looked-up row."""
    a = op.bound_args()
    w, ids = a["weight"], a["indices"]
    out, wd = b.desc(op.results[0]), b.desc(w)
    for x, y in zip(b.desc(ids), out[:-1]):
        b.fs.unify(x, y, b.where(op))
    b.fs.unify(out[-1], wd[1], b.where(op))
    b.fs.pin(wd[0][0], "the vocabulary")
    b.embedding_factors.extend(wd[1])


@coupling_rule("matmul", "bmm")
def _matmul(b: CouplingBuilder, op: Op) -> None:
    """``A @ B`` on matrices (batched): A's columns are B's rows (the contracted axis), the
    output's rows are A's and its columns B's; batch axes broadcast. The contracted axis is
    kept for the zero analysis, which pins it unless one side is zero on pruned channels
    (only then does dropping them leave every product unchanged). On vectors: pinned."""
    a = op.bound_args()
    left, right = a["self"], a["other"] if "other" in a else a["mat2"]
    ad, bd, out = b.desc(left), b.desc(right), b.desc(op.results[0])
    if len(ad) < 2 or len(bd) < 2:
        for r in (left, right, op.results[0]):
            b.pin_all(r, f"{b.where(op)} on vectors")
        return
    b.fs.unify(ad[-1], bd[-2], b.where(op))
    b.fs.unify(out[-2], ad[-2], b.where(op))
    b.fs.unify(out[-1], bd[-1], b.where(op))
    b.contractions.append((op, ad[-1]))
    for src in (ad, bd):
        for j in range(len(src) - 2):
            k = j + len(out) - len(src)
            if k >= 0:
                b.fs.unify(src[j], out[k], b.where(op))


@coupling_rule("addmm")
def _addmm(b: CouplingBuilder, op: Op) -> None:
    """``beta * bias + alpha * (mat1 @ mat2)`` on matrices: GPT-2's ``Conv1D``, a linear
    layer with its weight stored as ``[in, out]``. mat1's columns are mat2's rows (contracted:
    the zero analysis keeps it only where one side is zero on pruned channels, as for
    ``matmul``), the output's rows are mat1's, its columns mat2's and the bias's (where the
    bias is not broadcast along them). Exact as ``linear``, with the weight transposed."""
    a = op.bound_args()
    bias, left, right = a["self"], a["mat1"], a["mat2"]
    ld, rd, out = b.desc(left), b.desc(right), b.desc(op.results[0])
    why = b.where(op)
    b.fs.unify(ld[1], rd[0], why)
    b.fs.unify(out[0], ld[0], why)
    b.fs.unify(out[1], rd[1], why)
    b.contractions.append((op, ld[1]))
    if isinstance(bias, (Value, Param)):
        shape = op.results[0].type.shape
        bd = b.desc(bias)
        for j, axis in enumerate(bd):
            k = j + 2 - len(bd)
            if k >= 0 and not (bias.type.shape[j] == 1 and shape[k] != 1):
                b.fs.unify(axis, out[k], why)


@coupling_rule("sdpa")
def _sdpa(b: CouplingBuilder, op: Op) -> None:
    """Attention ``softmax(q k^T) v`` on ``[.., heads, seq, head_dim]``: batch axes and
    heads are shared by q, k, v and the output (with grouped-query attention a query head
    axis is (KV heads, query heads per KV head), the second factor pinned); k and v share
    their sequence, q and k their head_dim, v and the output theirs. head_dim is pinned (the
    dot product and RoPE use it whole), so the unit is a KV head with its query heads:
    removing one removes whole, independent attention computations."""
    a = op.bound_args()
    q, k, v = a["query"], a["key"], a["value"]
    qd, kd, vd, out = b.desc(q), b.desc(k), b.desc(v), b.desc(op.results[0])
    why = b.where(op)
    for j in range(len(qd) - 3):  # batch axes
        for src in (kd, vd, out):
            b.fs.unify(qd[j], src[j], why)
    h = len(qd) - 3
    b.fs.unify(kd[h], vd[h], why)
    if q.type.shape[h] == k.type.shape[h]:
        b.fs.unify(qd[h], kd[h], why)
    else:  # grouped-query attention inside sdpa: query heads = (kv heads, heads per group)
        rep = b.fs.new(q.type.shape[h] // k.type.shape[h], f"query heads per KV head in {why}")
        b.fs.unify(qd[h], kd[h] + [rep], why)
    b.fs.unify(qd[h], out[h], why)
    b.fs.unify(qd[h + 1], out[h + 1], why)
    b.fs.unify(kd[h + 1], vd[h + 1], why)
    b.fs.unify(qd[h + 2], kd[h + 2], why)
    b.fs.unify(vd[h + 2], out[h + 2], why)
    reason = f"head_dim: {why} (and RoPE) use it whole"
    for axis in (qd[h + 2], vd[h + 2]):
        b.pin_axis(axis, reason)
    b.head_factors.extend(kd[h])


# --- shape ops --------------------------------------------------------------------------------
@coupling_rule("reshape")
def _reshape(b: CouplingBuilder, op: Op) -> None:
    """Regroups axes without moving data: walking both shapes left to right (size-1 axes
    skipped), each run of input axes whose sizes multiply to the same product as a run of
    output axes is one index space, mixed-radix in both. ``unify`` refines factors where
    the runs split differently (``[.., 576]`` into ``[.., 9, 64]`` splits the 576 factor
    into 9 x 64 everywhere it is used). Exact because a row-major reshape maps index
    ``(i, j)`` of the split axes to ``i * 64 + j``, so removing a unit of one factor removes
    the same elements on both sides. Symbolic sizes match only themselves. Where the walk
    stops (``[B, S, 64]`` into ``[B*S, 64]``, as GPT-2's Conv1D flattens its input), the
    same walk runs from the right; the axes in between, which neither walk matched, are
    pinned (their products agree, so the matched runs on either side stay exact)."""
    x, out = op.bound_args()["self"], op.results[0]
    src, dst = b.desc(x), b.desc(out)
    in_shape, out_shape = list(x.type.shape), list(out.type.shape)
    why = f"{b.where(op)} mixes symbolic and channel sizes"
    i, j = _match_runs(b, src, dst, in_shape, out_shape, 0, 0, len(in_shape), len(out_shape), why, 1)
    if i == len(in_shape) and j == len(out_shape):
        return
    # from the right, down to where the left walk stopped (indices mirrored)
    ri, rj = _match_runs(b, src[::-1], dst[::-1], in_shape[::-1], out_shape[::-1], 0, 0,
                         len(in_shape) - i, len(out_shape) - j, why, -1)
    for axis in src[i:len(in_shape) - ri] + dst[j:len(out_shape) - rj]:
        b.pin_axis(axis, why)


def _match_runs(b: CouplingBuilder, src: list, dst: list, in_shape: list, out_shape: list, i: int,
                j: int, in_end: int, out_end: int, why: str, direction: int) -> tuple[int, int]:
    """Unify the runs of equal size product from ``(i, j)`` on, up to ``(in_end, out_end)``;
    the positions where matching stopped. ``direction`` -1: the lists are reversed, so a run's
    factors are reversed back into row-major order before unifying."""
    while i < in_end or j < out_end:
        if i < in_end and in_shape[i] == 1:
            i += 1
            continue
        if j < out_end and out_shape[j] == 1:
            j += 1
            continue
        if i >= in_end or j >= out_end:
            break
        p, q = in_shape[i], out_shape[j]
        if isinstance(p, str) or isinstance(q, str):
            if p == q:
                b.fs.unify(src[i], dst[j], why)
                i, j = i + 1, j + 1
                continue
            break
        left, right = [i], [j]
        pa, pb = p, q
        while pa != pb:
            if pa < pb and i + len(left) < in_end and isinstance(in_shape[i + len(left)], int):
                pa *= in_shape[i + len(left)]
                left.append(i + len(left))
            elif pb < pa and j + len(right) < out_end and isinstance(out_shape[j + len(right)], int):
                pb *= out_shape[j + len(right)]
                right.append(j + len(right))
            else:
                break
        if pa != pb:
            break
        axes_in, axes_out = left[::direction], right[::direction]
        b.fs.unify([f for k in axes_in for f in src[k]], [f for k in axes_out for f in dst[k]], why)
        i, j = left[-1] + 1, right[-1] + 1
    return i, j


@coupling_rule("flatten")
def _flatten(b: CouplingBuilder, op: Op) -> None:
    """Merges axes ``start_dim..end_dim`` into one (GPT-J's interleaved rotary flattens its
    stacked pairs): the merged axis is the merged axes' factors in order, mixed-radix with the
    last innermost, the other axes pass through. Exact for the same reason as ``reshape``: a
    row-major merge maps index ``(i, j)`` to ``i * n + j``."""
    a = op.bound_args()
    src, dst = b.desc(a["self"]), b.desc(op.results[0])
    if not src:  # a scalar flattens to one element
        return
    start, end = a["start_dim"] % len(src), a["end_dim"] % len(src)
    why = b.where(op)
    for k in range(start):
        b.fs.unify(src[k], dst[k], why)
    b.fs.unify([f for axis in src[start:end + 1] for f in axis], dst[start], why)
    for k in range(end + 1, len(src)):
        b.fs.unify(src[k], dst[k - (end - start)], why)


def _permute_like(b: CouplingBuilder, op: Op, x: Value, order: list[int]) -> None:
    src, dst = b.desc(x), b.desc(op.results[0])
    for k, j in enumerate(order):
        b.fs.unify(src[j], dst[k], b.where(op))


@coupling_rule("transpose")
def _transpose(b: CouplingBuilder, op: Op) -> None:
    """Swaps two axes: output axis k is input axis order[k]. Exact: data only moves."""
    a = op.bound_args()
    rank = len(a["self"].type.shape)
    order = list(range(rank))
    d0, d1 = a["dim0"] % rank, a["dim1"] % rank
    order[d0], order[d1] = order[d1], order[d0]
    _permute_like(b, op, a["self"], order)


@coupling_rule("t")
def _t(b: CouplingBuilder, op: Op) -> None:
    """Reverses the (at most two) axes. Exact: data only moves."""
    x = op.bound_args()["self"]
    _permute_like(b, op, x, list(range(len(x.type.shape)))[::-1])


@coupling_rule("permute")
def _permute(b: CouplingBuilder, op: Op) -> None:
    """Output axis k is input axis ``dims[k]``. Exact: data only moves."""
    a = op.bound_args()
    rank = len(a["self"].type.shape)
    _permute_like(b, op, a["self"], [d % rank for d in a["dims"]])


@coupling_rule("unsqueeze")
def _unsqueeze(b: CouplingBuilder, op: Op) -> None:
    """Inserts a size-1 axis at ``dim``: the other output axes are the input's, in order."""
    a = op.bound_args()
    src, dst = b.desc(a["self"]), b.desc(op.results[0])
    d = a["dim"] % len(dst)
    kept = [k for k in range(len(dst)) if k != d]
    for j, k in enumerate(kept):
        b.fs.unify(src[j], dst[k], b.where(op))


@coupling_rule("squeeze", "squeeze.dims")
def _squeeze(b: CouplingBuilder, op: Op) -> None:
    """Removes size-1 axes only: the input's other axes are the output's, in order."""
    x = op.bound_args()["self"]
    src = [a for a, s in zip(b.desc(x), x.type.shape) if s != 1]
    dst = [a for a, s in zip(b.desc(op.results[0]), op.results[0].type.shape) if s != 1]
    for p, q in zip(src, dst):
        b.fs.unify(p, q, b.where(op))


@coupling_rule("expand")
def _expand(b: CouplingBuilder, op: Op) -> None:
    """Broadcasts size-1 (or missing leading) axes to a larger size: kept axes are the
    input's; a stretched axis holds copies, not channels, and is pinned (GQA's query heads
    per KV head are such copies, so the KV head is the unit)."""
    x, out = op.bound_args()["self"], op.results[0]
    src, dst = b.desc(x), b.desc(out)
    offset = len(dst) - len(src)
    for k in range(len(dst)):
        j = k - offset
        if j >= 0 and not (x.type.shape[j] == 1 and out.type.shape[k] != 1):
            b.fs.unify(src[j], dst[k], b.where(op))
        else:
            b.pin_axis(dst[k], f"axis made by {b.where(op)} (a broadcast copy)")


@coupling_rule("slice")
def _slice(b: CouplingBuilder, op: Op) -> None:
    """Takes a range of one axis: the other axes pass through; the sliced axis is pinned on
    both sides (which channels survive depends on positions, as RoPE's halves of head_dim)
    unless the slice is the whole axis."""
    a = op.bound_args()
    x, out = a["self"], op.results[0]
    dim = a["dim"] % len(x.type.shape)
    start, step = a["start"], a["step"]
    src, dst = b.desc(x), b.desc(out)
    full = x.type.shape[dim] == out.type.shape[dim] and start in (0, None) and step == 1
    for k in range(len(src)):
        if k == dim and not full:
            reason = f"sliced by {b.where(op)}"
            b.pin_axis(src[k], reason)
            b.pin_axis(dst[k], reason)
        else:
            b.fs.unify(src[k], dst[k], b.where(op))


@coupling_rule("select")
def _select(b: CouplingBuilder, op: Op) -> None:
    """Takes index ``index`` of axis ``dim``, which disappears: the input's other axes are the
    output's, in order; the indexed axis is pinned (which entry is read is a position, as
    BLOOM's and Persimmon's fused ``query_key_value`` viewed as ``[.., heads, 3, head_dim]``
    pick q, k and v). Exact: output element ``(.., j, ..)`` is input element
    ``(.., index, j, ..)``, so removing a channel of a kept axis on both sides leaves the
    other elements where they were."""
    a = op.bound_args()
    x = a["self"]
    src, dst = b.desc(x), b.desc(op.results[0])
    dim = a["dim"] % len(src)
    b.pin_axis(src[dim], f"indexed by position by {b.where(op)}")
    for j, k in zip([j for j in range(len(src)) if j != dim], range(len(dst)), strict=True):
        b.fs.unify(src[j], dst[k], b.where(op))


@coupling_rule("repeat_interleave")
def _repeat_interleave(b: CouplingBuilder, op: Op) -> None:
    """Repeats each element ``repeats`` times in place along ``dim`` (``[a, b]`` ->
    ``[a, a, b, b]``, as interleaved RoPE's cos/sin and some grouped-query attentions do): the
    output axis is (the input axis, the copies), the copies innermost, and the copies factor is
    pinned (a copy, not a channel), so a unit is an input channel with its copies; the other
    axes pass through. Exact: output index ``i * repeats + c`` reads input index ``i``, so
    removing input channel i removes exactly its copies. Without a ``dim`` (a flattened
    result) or with per-element repeat counts: pinned."""
    a = op.bound_args()
    x, out = a["self"], op.results[0]
    repeats, dim = a["repeats"], a["dim"]
    if dim is None or not isinstance(repeats, int):
        for ref in (x, out):
            b.pin_all(ref, f"repeated without an axis or by counts in {b.where(op)}")
        return
    src, dst = b.desc(x), b.desc(out)
    dim %= len(src)
    why = b.where(op)
    for k in range(len(src)):
        if k != dim:
            b.fs.unify(src[k], dst[k], why)
            continue
        copies = b.fs.new(repeats, f"copies made by {why}")
        b.fs.unify(dst[k], src[k] + [copies], why)


@coupling_rule("repeat")
def _repeat(b: CouplingBuilder, op: Op) -> None:
    """Tiles the input ``repeats[k]`` times along each axis (``[a, b]`` -> ``[a, b, a, b]``, as
    DiffLlama's grouped-query attention copies its KV heads), the counts aligned with the
    input's axes from the right, extra leading counts making new axes: a tiled output axis is
    (the copies, the input axis), the copies outermost and pinned (a copy, not a channel), so
    a unit is an input channel with all its copies; an axis repeated once passes through, a
    new axis is pinned. Exact: output index ``c * n + i`` reads input index ``i``, so removing
    input channel i removes exactly its copies (``compress`` leaves the counts alone)."""
    a = op.bound_args()
    x, out = a["self"], op.results[0]
    repeats = a["repeats"]
    src, dst = b.desc(x), b.desc(out)
    why = b.where(op)
    if not isinstance(repeats, list) or not all(isinstance(r, int) for r in repeats):
        for ref in (x, out):
            b.pin_all(ref, f"tiled by counts known only at run time in {why}")
        return
    offset = len(dst) - len(src)
    for k, count in enumerate(repeats):
        j = k - offset
        if j < 0:
            b.pin_axis(dst[k], f"axis made by {why} (copies)")
        elif count == 1:
            b.fs.unify(src[j], dst[k], why)
        else:
            copies = b.fs.new(count, f"copies made by {why}")
            b.fs.unify(dst[k], [copies] + src[j], why)


@coupling_rule("max.dim", "logsumexp")
def _max_dim(b: CouplingBuilder, op: Op) -> None:
    """The maximum (and where it is) or the log-sum-exp over ``dim`` (attention sinks): the
    kept axes of the input are the results' axes (``keepdim`` keeps a size-1 axis in place);
    ``dim`` is pinned, since a pruned channel's zero can be the maximum and adds ``exp(0)``
    to the sum. Exact on the kept axes: each result element reads only its own slice along
    ``dim``."""
    a = op.bound_args()
    x = a["self"]
    rank = len(x.type.shape)
    dims = a["dim"] if isinstance(a["dim"], list) else [a["dim"]]
    if len(dims) != 1:
        for ref in [x, *b.tensor_results(op)]:
            b.pin_all(ref, f"reduced over several axes by {b.where(op)}")
        return
    dim = dims[0] % rank
    src = b.desc(x)
    b.pin_axis(src[dim], f"reduced over by {b.where(op)}")
    for out in b.tensor_results(op):
        dst = b.desc(out)
        k = 0
        for j in range(rank):
            if j == dim:
                k += 1 if a["keepdim"] else 0
                continue
            b.fs.unify(src[j], dst[k], b.where(op))
            k += 1


def _along_axis_pinned(b: CouplingBuilder, op: Op, tensors: list[Ref], outs: list[Ref], dim: int) -> None:
    reason = f"split or joined along an axis by {b.where(op)}"
    for ref in tensors + outs:
        d = b.desc(ref)
        b.pin_axis(d[dim % len(d)], reason)
    for ref in tensors:
        for out in outs:
            for k, (p, q) in enumerate(zip(b.desc(ref), b.desc(out))):
                if k != dim % len(b.desc(ref)):
                    b.fs.unify(p, q, b.where(op))


@coupling_rule("concat")
def _concat(b: CouplingBuilder, op: Op) -> None:
    """Joins tensors along ``dim``: the other axes are shared by every piece and the output;
    the joined axis is pinned (a channel's position depends on the pieces' sizes)."""
    a = op.bound_args()
    _along_axis_pinned(b, op, [v for v in a["tensors"] if isinstance(v, (Value, Param))],
                       [op.results[0]], a["dim"])


@coupling_rule("split", "split_with_sizes", "chunk")
def _split(b: CouplingBuilder, op: Op) -> None:
    """Cuts along ``dim``: the other axes are shared by the input and every piece. Into n
    equal pieces of a static axis (a fused projection: GPT-2's ``c_attn`` into q, k and v,
    Phi-3's ``gate_up_proj`` into gate and up), the cut axis is (which piece, the piece's
    channel), the piece outermost and pinned, and every piece's axis is that one channel
    factor: a unit is channel c of every piece together. Exact: input position
    ``p * size + c`` is channel c of piece p, so removing c from the channel factor removes
    it from every piece and from each block of the input alike (``compress`` rewrites the
    piece size). Unequal pieces: the cut axis is pinned (a channel's piece depends on
    positions)."""
    a = op.bound_args()
    x, results = a["self"], [r for r in op.results if isinstance(r.type, TensorType)]
    dim = a["dim"] % len(x.type.shape)
    length = x.type.shape[dim]
    sizes = {r.type.shape[dim] for r in results}
    if len(results) < 2 or len(sizes) != 1 or not isinstance(length, int) \
            or not isinstance(size := sizes.pop(), int) or size * len(results) != length:
        _along_axis_pinned(b, op, [x], list(op.results), a["dim"])
        return
    why = b.where(op)
    src, first = b.desc(x), b.desc(results[0])
    piece = b.fs.new(len(results), f"which piece of the cut made by {why}")
    b.fs.unify(src[dim], [piece] + first[dim], why)
    for out in results:
        for k, (p, q) in enumerate(zip(src, b.desc(out))):
            b.fs.unify(first[dim] if k == dim else p, q, why)


@coupling_rule("stack")
def _stack(b: CouplingBuilder, op: Op) -> None:
    """Stacks same-shaped tensors along a new axis ``dim`` (GPT-J's rotary stacks its rotated
    pairs): every input axis is the output axis it lands on, shared by all inputs; the new
    axis (which tensor) is pinned. Exact: output element ``(.., t, ..)`` is input t's
    element, so removing a channel from every input removes it from the output."""
    a = op.bound_args()
    out = op.results[0]
    dst = b.desc(out)
    dim = a["dim"] % len(dst)
    b.pin_axis(dst[dim], f"axis made by {b.where(op)} (which tensor)")
    for ref in (v for v in a["tensors"] if isinstance(v, (Value, Param))):
        for j, axis in enumerate(b.desc(ref)):
            b.fs.unify(axis, dst[j + (j >= dim)], b.where(op))


# --- reductions and normalisation ---------------------------------------------------------------
@coupling_rule("softmax", "softmax.internal", "log_softmax", "log_softmax.int")
def _softmax(b: CouplingBuilder, op: Op) -> None:
    """Normalises over ``dim``: every axis passes through, and ``dim`` is pinned (removing
    a channel changes every other channel's share). Over the keys of attention scores
    ``[batch, heads, queries, keys]`` (the last two axes the sequence), the static axes in
    between are recorded as attention heads, as ``sdpa`` records its own."""
    a = op.bound_args()
    x, out = a["self"], op.results[0]
    dim = a["dim"] % len(x.type.shape)
    src, dst = b.desc(x), b.desc(out)
    for k in range(len(src)):
        if k == dim:
            b.pin_axis(src[k], f"normalised over by {b.where(op)}")
        b.fs.unify(src[k], dst[k], b.where(op))
    shape = x.type.shape
    if len(shape) >= 3 and dim == len(shape) - 1 and all(isinstance(d, str) for d in shape[-2:]):
        # attention probabilities [.., heads, queries, keys] spelled out (eager attention, as
        # sdpa computes them inside): the static axes before (query, key) are the heads
        for k in range(1, len(shape) - 2):
            if isinstance(shape[k], int):
                b.head_factors.extend(src[k])


@coupling_rule(*(kind for kind, definition in OP_DEFS.items() if definition.reduction))
def _reduce(b: CouplingBuilder, op: Op) -> None:
    """``sum``/``mean`` over ``dim`` (all axes when ``None``): kept axes pass through
    (``keepdim`` keeps a size-1 axis in place). A reduced axis carrying channels is recorded:
    the zero analysis accepts it only where pruned channels are zero in the input (they then
    add nothing to a sum; ``compress`` keeps a mean's original divisor) and pins it otherwise."""
    a = op.bound_args()
    x, out = a["self"], op.results[0]
    rank = len(x.type.shape)
    dims = a["dim"] if a["dim"] is not None else list(range(rank))
    dims = {d % rank for d in (dims if isinstance(dims, list) else [dims])}
    keepdim = bool(a["keepdim"])
    src, dst = b.desc(x), b.desc(out)
    k = 0
    for j in range(rank):
        if j in dims:
            b.pending_reductions.append((op, src[j]))
            if keepdim:
                k += 1
            continue
        b.fs.unify(src[j], dst[k], b.where(op))
        k += 1


@coupling_rule("rms_norm")
def _rms_norm(b: CouplingBuilder, op: Op) -> None:
    """``weight * x / sqrt(mean(x^2 over the normalised axes) + eps)``: every axis of x is
    the output's, and the weight's axes are x's trailing (normalised) axes, as in the RMSNorm
    that the decomposed export spells out (``pow``, ``mean``, ``rsqrt``, ``mul``). The
    normalised axes are recorded as a reduction: zero pruned channels add nothing to the sum
    of squares, and ``compress`` makes the shrunk norm exact by scaling ``eps`` by d/d' and the
    weight by sqrt(d/d'). That needs a weight of this op alone; without one (absent, computed
    or shared) the normalised axes are pinned."""
    a = op.bound_args()
    x, weight = a["input"], a["weight"]
    src, dst = b.desc(x), b.desc(op.results[0])
    rank = len(src)
    normalised = range(rank - len(a["normalized_shape"]), rank)
    for k in range(rank):
        b.fs.unify(src[k], dst[k], b.where(op))
    if weight is not None:
        for j, axis in enumerate(b.desc(weight)):
            b.fs.unify(axis, src[normalised[j]], b.where(op))
    own_weight = isinstance(weight, Param) and sum(weight in o.params() for o in b.module.graph.ops) == 1
    for k in normalised:
        if own_weight:
            b.pending_reductions.append((op, src[k]))
        else:
            b.pin_axis(src[k], f"normalised over by {b.where(op)}, which has no weight of its own "
                                "for compress to rescale")


@coupling_rule("layer_norm")
def _layer_norm(b: CouplingBuilder, op: Op) -> None:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the trailing ``normalized_shape``
    axes: the other axes of x pass through to the output (each vector is normalised on its
    own, so a head axis in front of a query/key norm over head_dim stays a channel space);
    the normalised axes are pinned on x, the output, the weight and the bias: a pruned
    channel is zero, not absent, in that mean and variance, so no rescaling makes the shrunk
    norm exact."""
    a = op.bound_args()
    x = a["input"]
    src, dst = b.desc(x), b.desc(op.results[0])
    rank = len(src)
    normalised = rank - len(a["normalized_shape"])
    why = LAYER_NORM_PIN.format(op=b.where(op))
    for k in range(rank):
        if k >= normalised:
            b.pin_axis(src[k], why)
            b.pin_axis(dst[k], why)
        else:
            b.fs.unify(src[k], dst[k], b.where(op))
    for ref in (a["weight"], a["bias"]):
        if isinstance(ref, (Value, Param)):
            b.pin_all(ref, why)


LAYER_NORM_PIN = ("mean-centred and normalised over (a pruned channel is zero, not absent, in that "
                  "mean and variance, so no rescaling makes the shrunk norm exact) by {op}")
PIN_REASONS["layer_norm"] = LAYER_NORM_PIN


# --- made from scratch, and symbolic sizes -------------------------------------------------------
pins("arange", "arange.start", "arange.start_step", "full", "ones", "zeros", "scalar_tensor", "empty",
     "new_ones", "new_zeros", "new_full", reason="made with a fixed size by {op}", operands=False)


@coupling_rule("dim", "sym.add", "sym.sub", "sym.mul", "sym.floordiv", "sym.mod", "sym.neg", "sym.max",
               "sym.min")
def _symbolic(b: CouplingBuilder, op: Op) -> None:
    """Symbolic integers carry no channel axes; ``dim`` reads a size at run time, so it
    follows whatever compress makes of the axis it reads."""


# --- kinds the analysis does not model: pinned, with the reason ----------------------------------
pins("mm", "baddbmm", reason="a matrix product the models we lower do not use (they use "
     "linear and matmul), not modelled: {op}")
pins("max", "min", reason="a maximum or minimum of a whole tensor, not modelled: {op}")
pins("index_put", reason="written at data-dependent positions, not modelled: {op}")
pins("amax", "any", "all", reason="a max/any/all reduction (a pruned channel's zero can change "
     "its result), not modelled: {op}")
pins("cumsum", reason="a running sum along an axis, not modelled: {op}")
pins("diff", reason="differences of neighbours along an axis, not modelled: {op}")
pins("roll", "flip", reason="elements moved along an axis by position, not modelled: {op}")
pins("gather", "index", "index_select", reason="indexed by data-dependent positions, not modelled: {op}")
pins("narrow", reason="part of an axis taken by position, not modelled: {op}")
pins("unbind", reason="unstacked along an axis, not modelled: {op}")
pins("tril", "triu", reason="masked by position along its last two axes, not modelled: {op}")
pins("ones_like", "zeros_like", "full_like", reason="a constant shaped like its input, not "
     "modelled: {op}")


# --- Mixture-of-Experts routing (lorashear/frontend/moe.py) --------------------------------------
pins("topk", reason="the experts (or channels) ranked by {op}: which ones it picks depends on "
     "every entry along its axis, and its indices name positions")
pins("scatter", reason="written at data-dependent positions (the router's chosen experts) by {op}")


# --- ops of the conformance sweep's decoders (issue #22) ------------------------------------------
pins("eye", reason="made with a fixed size by {op}", operands=False)


def padded_axes(op: Op) -> dict[int, tuple[int, int]]:
    """The axes a ``pad``/``pad.constant`` op pads, with (before, after): torch spells the
    amounts as pairs from the last axis backwards."""
    a = op.bound_args()
    rank = len(a["self"].type.shape)
    amounts = list(a["pad"])
    return {rank - 1 - i: (amounts[2 * i], amounts[2 * i + 1]) for i in range(len(amounts) // 2)
            if (amounts[2 * i], amounts[2 * i + 1]) != (0, 0)}


@coupling_rule("pad", "pad.constant")
def _pad(b: CouplingBuilder, op: Op) -> None:
    """Pads axes at their ends (Zaya's causal convolution pads the sequence): an axis not
    padded passes through; a padded axis is pinned on both sides (its elements move by the
    padding). Exact: the output is the input with elements added at the ends of the padded
    axes, so a channel of an unpadded axis stays the same channel."""
    x, out = op.bound_args()["self"], op.results[0]
    padded = padded_axes(op)
    why = f"padded by {b.where(op)}"
    for k, (src, dst) in enumerate(zip(b.desc(x), b.desc(out), strict=True)):
        if k in padded:
            b.pin_axis(src, why)
            b.pin_axis(dst, why)
        else:
            b.fs.unify(src, dst, b.where(op))


def einsum_subscripts(op: Op) -> tuple[list[str], str] | None:
    """An ``einsum``'s subscripts, one string of letters per operand and the output's, with an
    ellipsis spelled out as upper-case letters (the axes it stands for); None where an operand
    repeats a letter (a diagonal) or the equation has no explicit output."""
    a = op.bound_args()
    equation = a["equation"].replace(" ", "")
    if "->" not in equation:
        return None
    inputs, output = equation.split("->")
    terms = inputs.split(",")
    tensors = a["tensors"]
    if len(terms) != len(tensors):
        return None
    ellipsis = max((len(t.type.shape) - len(term.replace("...", "")) for term, t in zip(terms, tensors)
                    if "..." in term), default=0)

    def spelled(term: str, rank: int) -> str:
        if "..." not in term:
            return term
        extra = rank - len(term.replace("...", ""))
        return term.replace("...", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[ellipsis - extra:ellipsis])

    terms = [spelled(term, len(t.type.shape)) for term, t in zip(terms, tensors)]
    output = output.replace("...", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:ellipsis])
    if any(len(set(term)) != len(term) for term in (*terms, output)):
        return None
    return terms, output


@coupling_rule("einsum")
def _einsum(b: CouplingBuilder, op: Op) -> None:
    """An Einstein sum (ProphetNet's attention): every axis that one subscript letter names,
    in any operand or the output, is one index space, except a size-1 axis broadcast over a
    larger one; a letter missing from the output is contracted, and kept for the zero
    analysis as ``matmul``'s contracted axis is (exact only where an operand is zero on the
    pruned channels). Exact for the reason ``matmul`` is: each output element sums products
    of the operand elements its letters select. Diagonals and implicit outputs: pinned."""
    a = op.bound_args()
    tensors = [t for t in a["tensors"] if isinstance(t, (Value, Param))]
    subscripts = einsum_subscripts(op)
    out = op.results[0]
    if subscripts is None or len(tensors) != len(a["tensors"]):
        for ref in [*tensors, out]:
            b.pin_all(ref, f"an einsum with a diagonal or an implicit output in {b.where(op)}")
        return
    terms, output = subscripts
    why = b.where(op)
    axes: dict[str, list[int]] = dict(zip(output, b.desc(out)))
    sizes: dict[str, int | str] = dict(zip(output, out.type.shape))
    for term, ref in zip(terms, tensors):
        for letter, axis, size in zip(term, b.desc(ref), ref.type.shape):
            if size == 1 and sizes.get(letter, 1) != 1:
                continue
            if letter in axes:
                b.fs.unify(axes[letter], axis, why)
            else:
                axes[letter], sizes[letter] = axis, size
    for letter in sorted(set("".join(terms)) - set(output)):
        b.contractions.append((op, axes[letter]))


def conv1d_kind(op: Op) -> str | None:
    """``"dense"`` for a ``conv1d`` with one group, ``"depthwise"`` for one group per channel
    (one filter per input channel), None for anything else (grouped, or a computed weight)."""
    a = op.bound_args()
    weight, groups = a["weight"], a["groups"]
    if not isinstance(weight, Param) or len(weight.type.shape) != 3:
        return None
    out_channels, per_group, _ = weight.type.shape
    if groups == 1:
        return "dense"
    if per_group == 1 and groups == out_channels:
        return "depthwise"
    return None


@coupling_rule("conv1d")
def _conv1d(b: CouplingBuilder, op: Op) -> None:
    """A 1-D convolution ``[batch, channels, length]`` (LFM's and Inkling's short convolutions
    over the sequence): the batch axis passes through; the length axis and the kernel taps are
    pinned (positions). With one group, the input channels are the weight's columns and the
    output channels its rows and the bias, as for ``linear``; depthwise (one filter per
    channel), input channel, output channel, weight row and bias entry are one channel space
    (``compress`` sets ``groups`` to the kept count). Exact as ``linear``: an output channel
    comes only from its own filter and bias entry, which reads only its own input channels.
    Other group counts, or a weight that is not a parameter: pinned."""
    a = op.bound_args()
    x, weight, bias, out = a["input"], a["weight"], a["bias"], op.results[0]
    kind = conv1d_kind(op)
    why = b.where(op)
    refs = [r for r in (x, weight, bias, out) if isinstance(r, (Value, Param))]
    if kind is None:
        for ref in refs:
            b.pin_all(ref, f"a grouped convolution, not modelled: {why}")
        return
    xd, wd, od = b.desc(x), b.desc(weight), b.desc(out)
    for axis in (xd[-1], od[-1], wd[2]):
        b.pin_axis(axis, f"convolved along by {why}")
    if len(xd) == 3:
        b.fs.unify(xd[0], od[0], why)
    b.fs.unify(od[-2], wd[0], why)
    if isinstance(bias, (Value, Param)):
        b.fs.unify(b.desc(bias)[0], wd[0], why)
    if kind == "dense":
        b.fs.unify(xd[-2], wd[1], why)
    else:
        b.fs.unify(xd[-2], od[-2], why)
