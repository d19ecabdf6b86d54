"""Coupling rules of shape ops (reshape, transpose, slice, concat, split, ...): how an axis
maps through a view or a rearrangement, and which axes an op makes by position."""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING

from lorashear.analysis.coupling_rules.registry import coupling_rule
from lorashear.ir.core import Op, Param, Value
from lorashear.ir.types import TensorType

if TYPE_CHECKING:
    from lorashear.analysis.coupling import CouplingBuilder, Ref


_PRODUCT = re.compile(r"^\s*\w+(\s*\*\s*\w+)*\s*$")


def dim_product(dim: int | str) -> tuple[tuple[str, ...], int]:
    """A size as (symbols, integer) when it is a product of them (``"16*B"`` -> ``(("B",), 16)``,
    ``8`` -> ``((), 8)``); any other symbolic expression is one opaque symbol."""
    if isinstance(dim, int):
        return (), dim
    if not _PRODUCT.match(dim):
        return (dim,), 1
    syms, k = [], 1
    for term in dim.split("*"):
        term = term.strip()
        if term.isdigit():
            k *= int(term)
        else:
            syms.append(term)
    return tuple(syms), k


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
    the positions where matching stopped. A product counts its symbols and its integer
    (``[B, 16]`` is ``"16*B"``: heads merged into the batch, as BART-family attention does
    for its ``bmm``), so a run of static and symbolic axes matches a compound symbolic size.
    ``direction`` -1: the lists are reversed, so a run's factors are reversed back into
    row-major order before unifying."""
    while i < in_end or j < out_end:
        if i < in_end and in_shape[i] == 1:
            i += 1
            continue
        if j < out_end and out_shape[j] == 1:
            j += 1
            continue
        if i >= in_end or j >= out_end:
            break
        left, right = [i], [j]
        (sa, pa), (sb, pb) = dim_product(in_shape[i]), dim_product(out_shape[j])
        sa, sb = Counter(sa), Counter(sb)
        while (sa, pa) != (sb, pb):
            grow_left = sa <= sb and (sa != sb or (0 < pa < pb and pb % pa == 0))
            grow_right = sb <= sa and (sa != sb or (0 < pb < pa and pa % pb == 0))
            if grow_left and i + len(left) < in_end:
                more_s, more_p = dim_product(in_shape[i + len(left)])
                sa, pa = sa + Counter(more_s), pa * more_p
                left.append(i + len(left))
            elif grow_right and j + len(right) < out_end:
                more_s, more_p = dim_product(out_shape[j + len(right)])
                sb, pb = sb + Counter(more_s), pb * more_p
                right.append(j + len(right))
            else:
                break
        if (sa, pa) != (sb, pb):
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
    input's; a stretched axis holds copies, not channels (``builder.copy_factors``). Copies
    that become one part of a larger axis are pinned once the coupling is known (GQA's query
    heads per KV head: ``[kv, copies]`` merged into the query heads, so the KV head is the
    unit); copies that are a whole axis take the units they meet (multi-query attention's one
    key for all query heads, latent attention's shared rotary key expanded to every head):
    removing copy h of a broadcast changes no other copy, and ``compress`` rewrites the size."""
    x, out = op.bound_args()["self"], op.results[0]
    src, dst = b.desc(x), b.desc(out)
    offset = len(dst) - len(src)
    for k in range(len(dst)):
        j = k - offset
        if j >= 0 and not (x.type.shape[j] == 1 and out.type.shape[k] != 1):
            b.fs.unify(src[j], dst[k], b.where(op))
        else:
            b.copy_factors.extend((f, f"axis made by {b.where(op)} (a broadcast copy)") for f in dst[k])


@coupling_rule("slice")
def _slice(b: CouplingBuilder, op: Op) -> None:
    """Takes a range of one axis: the other axes pass through. A static range of a static
    axis that is one index space (Phi-3's fused ``qkv_proj`` output sliced into q, k and v of
    unequal widths) cuts that space at the range's ends, and the output axis is the segment
    between them: each segment's channels are their own units (:func:`cut_range`). Any other
    sliced axis (a stepped slice, a symbolic length, an axis made of several factors) is
    pinned on both sides (which channels survive depends on positions)."""
    a = op.bound_args()
    x, out = a["self"], op.results[0]
    dim = a["dim"] % len(x.type.shape)
    start, step = a["start"], a["step"]
    src, dst = b.desc(x), b.desc(out)
    full = x.type.shape[dim] == out.type.shape[dim] and start in (0, None) and step == 1
    for k in range(len(src)):
        if k != dim or full:
            b.fs.unify(src[k], dst[k], b.where(op))
            continue
        bounds = _static_range(x.type.shape[dim], start, a["end"]) if step == 1 else None
        if bounds is None or not cut_range(b, src[k], [bounds], [dst[k]], b.where(op)):
            reason = f"sliced by {b.where(op)}"
            b.pin_axis(src[k], reason)
            b.pin_axis(dst[k], reason)


def _static_range(length, start, end) -> tuple[int, int] | None:
    """``[start, end)`` of a slice of an axis of ``length``, as Python clamps it; None where a
    bound or the length is symbolic."""
    if not isinstance(length, int) or not isinstance(start, (int, type(None))) \
            or not isinstance(end, (int, type(None))):
        return None
    lo, hi, _ = slice(start, end).indices(length)
    return (lo, hi) if lo < hi else None


def cut_range(b: CouplingBuilder, axis: list[int], ranges: list[tuple[int, int]],
              outs: list[list[int]], why: str) -> bool:
    """The output axes ``outs`` are the ranges ``ranges`` of the static ``axis``: the axis' one
    index space is cut at the ranges' ends (``_Factors.cut``), and each output axis is
    identified with the segments its range covers. Exact: removing channel c of a segment
    from the input and from the output that holds it leaves every other element where the
    range maps it (``compress`` rewrites the bounds from the segments' new sizes, see its
    ``slice`` rule). False where the axis is not one index space that can be cut there (the
    caller then pins the axes)."""
    fs = b.fs
    leaves = [fs.find(x) for f in axis for x in fs.leaves(f) if fs.size[fs.find(x)] != 1]
    if len(leaves) != 1 or fs.size[leaves[0]] is None or fs.leaves(leaves[0]) != [leaves[0]]:
        return False
    leaf = leaves[0]
    if not fs.cut(leaf, [p for r in ranges for p in r]):
        return False
    for (lo, hi), out in zip(ranges, outs, strict=True):
        pieces = fs.pieces(leaf, lo, hi)
        targets = [fs.find(x) for f in out for x in fs.leaves(f) if fs.size[fs.find(x)] != 1]
        if pieces is None or (hi - lo > 1 and len(targets) != 1):
            return False
        if targets and not fs.join_sum(targets[0], pieces, why):  # a one-wide range: one index
            return False
    return True


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
    piece size). Unequal pieces of a static axis: the axis is cut into one segment per piece
    (:func:`cut_range`), each piece's channels their own units; where it cannot be cut (a
    symbolic length, an axis of several factors), the cut axis is pinned."""
    a = op.bound_args()
    x, results = a["self"], [r for r in op.results if isinstance(r.type, TensorType)]
    dim = a["dim"] % len(x.type.shape)
    length = x.type.shape[dim]
    sizes = {r.type.shape[dim] for r in results}
    if len(results) < 2 or len(sizes) != 1 or not isinstance(length, int) \
            or not isinstance(size := sizes.pop(), int) or size * len(results) != length:
        _split_unequal(b, op, x, results, dim)
        return
    why = b.where(op)
    src, first = b.desc(x), b.desc(results[0])
    piece = b.fs.new(len(results), f"which piece of the cut made by {why}")
    b.fs.unify(src[dim], [piece] + first[dim], why)
    for out in results:
        for k, (p, q) in enumerate(zip(src, b.desc(out))):
            b.fs.unify(first[dim] if k == dim else p, q, why)


def _split_unequal(b: CouplingBuilder, op: Op, x: Value, results: list[Value], dim: int) -> None:
    """Unequal pieces: cut the axis at the pieces' boundaries (or pin it), other axes shared."""
    sizes = [r.type.shape[dim] for r in results]
    why = b.where(op)
    ranges, at = [], 0
    for size in sizes:
        if not isinstance(size, int):
            break
        ranges.append((at, at + size))
        at += size
    cuttable = len(ranges) == len(results) and at == x.type.shape[dim] and all(lo < hi for lo, hi in ranges)
    if not (cuttable and cut_range(b, b.desc(x)[dim], ranges, [b.desc(r)[dim] for r in results], why)):
        _along_axis_pinned(b, op, [x], list(op.results), dim)
        return
    for out in results:
        for k, (p, q) in enumerate(zip(b.desc(x), b.desc(out))):
            if k != dim:
                b.fs.unify(p, q, why)


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


