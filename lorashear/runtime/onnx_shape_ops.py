"""ONNX translations of the IR's shape, slicing and indexing ops.

Sizes may be symbolic (the batch and sequence axes): a size list mixes literal ints and
``dim``/``sym.*`` values, and :meth:`~lorashear.runtime.onnx_builder.OnnxGraphBuilder.shape_vector`
turns it into one ``int64`` tensor, so ``reshape``/``expand`` stay dynamic in ONNX. Where torch
and ONNX disagree on a corner (``expand``'s ``-1``, ``squeeze`` of a non-unit axis, ``reshape``
with a literal 0) the translation follows torch.
"""

from __future__ import annotations

import math
from typing import Any

import onnx_ir as ir

from lorashear.errors import EmissionError
from lorashear.ir.core import Op, Value
from lorashear.runtime.onnx_builder import INT64_MAX, OnnxGraphBuilder, normalize_axis, rank_of
from lorashear.runtime.onnx_ops import result_dtype, result_rank, translates


@translates("reshape")
def _reshape(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    # allowzero=1: a literal 0 is a zero-sized axis, as in torch, not "copy the input's size"
    return b.op("Reshape", b.tensor(a["self"]), b.shape_vector(list(a["shape"])), allowzero=1)


@translates("flatten")
def _flatten(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    rank = rank_of(a["self"])
    start, end = normalize_axis(a["start_dim"], rank), normalize_axis(a["end_dim"], rank)
    x = b.tensor(a["self"])
    parts = []
    if start > 0:
        parts.append(b.op("Shape", x, start=0, end=start))
    parts.append(b.ints([-1]))
    if end < rank - 1:
        parts.append(b.op("Shape", x, start=end + 1))
    shape = parts[0] if len(parts) == 1 else b.op("Concat", *parts, axis=0)
    return b.op("Reshape", x, shape)


@translates("expand")
def _expand(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    # torch's -1 keeps the input's size; ONNX Expand broadcasts, so 1 does the same
    sizes = [1 if isinstance(s, int) and s == -1 else s for s in a["size"]]
    return b.op("Expand", b.tensor(a["self"]), b.shape_vector(sizes))


@translates("repeat")
def _repeat(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    repeats = list(a["repeats"])
    x = b.tensor(a["self"])
    extra = len(repeats) - rank_of(a["self"])
    if extra > 0:  # torch prepends unit axes when there are more repeats than axes
        x = b.op("Unsqueeze", x, b.ints(list(range(extra))))
    return b.op("Tile", x, b.shape_vector(repeats))


@translates("repeat_interleave")
def _repeat_interleave(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    """Each element ``repeats`` times along ``dim``: a new axis after ``dim``, broadcast to
    ``repeats``, merged back into ``dim`` (row-major, so the copies sit side by side)."""
    repeats, dim = a["repeats"], a["dim"]
    if dim is None or not isinstance(repeats, int):
        raise EmissionError("only repeat_interleave along one axis by a fixed count is translated")
    rank = rank_of(a["self"])
    axis = normalize_axis(dim, rank)
    x = b.tensor(a["self"])
    widened = b.op("Unsqueeze", x, b.ints([axis + 1]))
    copies = b.op("Expand", widened, b.ints([1] * (axis + 1) + [repeats] + [1] * (rank - axis - 1)))
    parts = [b.ints([-1])]
    if axis > 0:
        parts.insert(0, b.op("Shape", x, start=0, end=axis))
    if axis < rank - 1:
        parts.append(b.op("Shape", x, start=axis + 1))
    shape = parts[0] if len(parts) == 1 else b.op("Concat", *parts, axis=0)
    return b.op("Reshape", copies, shape)


@translates("transpose")
def _transpose(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    rank = rank_of(a["self"])
    perm = list(range(rank))
    d0, d1 = normalize_axis(a["dim0"], rank), normalize_axis(a["dim1"], rank)
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return b.op("Transpose", b.tensor(a["self"]), perm=perm)


@translates("permute")
def _permute(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    rank = rank_of(a["self"])
    return b.op("Transpose", b.tensor(a["self"]), perm=[normalize_axis(d, rank) for d in a["dims"]])


@translates("t")
def _t(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    x = b.tensor(a["self"])
    return x if rank_of(a["self"]) < 2 else b.op("Transpose", x, perm=[1, 0])


@translates("unsqueeze")
def _unsqueeze(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    axis = normalize_axis(a["dim"], rank_of(a["self"]) + 1)
    return b.op("Unsqueeze", b.tensor(a["self"]), b.ints([axis]))


@translates("squeeze", "squeeze.dims")
def _squeeze(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    # torch squeezes only axes of size 1 and ignores the rest; the IR types say which went
    x, shape = a["self"], a["self"].type.shape
    dims = [a["dim"]] if isinstance(a["dim"], int) else list(a["dim"])
    axes = [d for d in (normalize_axis(d, len(shape)) for d in dims) if shape[d] == 1
            or not isinstance(shape[d], int)]
    removed = len(shape) - result_rank(op)
    if removed == 0:
        return b.tensor(x)
    if len(axes) != removed:
        raise EmissionError(f"cannot tell which of axes {dims} of {x.type} squeeze removes")
    return b.op("Squeeze", b.tensor(x), b.ints(axes))


# --- slicing ----------------------------------------------------------------------------------
def _slice(b: OnnxGraphBuilder, x: ir.Value, axis: int, start: Any, end: Any, step: Any = 1) -> ir.Value:
    starts = b.sym_vector(0 if start is None else start)
    ends = b.sym_vector(INT64_MAX if end is None else end)
    return b.op("Slice", x, starts, ends, b.ints([axis]), b.sym_vector(step))


@translates("slice")
def _slice_op(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    axis = normalize_axis(a["dim"], rank_of(a["self"]))
    return _slice(b, b.tensor(a["self"]), axis, a["start"], a["end"], a["step"])


@translates("narrow")
def _narrow(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    axis = normalize_axis(a["dim"], rank_of(a["self"]))
    start, length = a["start"], a["length"]
    if isinstance(start, int) and isinstance(length, int):
        end: Any = start + length
    else:
        end_vector = b.op("Add", b.sym_vector(start), b.sym_vector(length))
        return b.op("Slice", b.tensor(a["self"]), b.sym_vector(start), end_vector, b.ints([axis]))
    return _slice(b, b.tensor(a["self"]), axis, start, end)


@translates("select")
def _select(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    axis = normalize_axis(a["dim"], rank_of(a["self"]))
    return b.op("Gather", b.tensor(a["self"]), b.sym_scalar(a["index"]), axis=axis)


@translates("flip")
def _flip(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    rank = rank_of(a["self"])
    axes = [normalize_axis(d, rank) for d in a["dims"]]
    n = len(axes)
    return b.op("Slice", b.tensor(a["self"]), b.ints([-1] * n), b.ints([-INT64_MAX - 1] * n),
                b.ints(axes), b.ints([-1] * n))


def _roll_axis(b: OnnxGraphBuilder, x: ir.Value, shift: Any, axis: int) -> ir.Value:
    """``x`` rolled by ``shift`` along ``axis``: the last ``shift mod n`` elements move to the
    front (dynamic: ``n`` is read from the shape, ``shift`` may be symbolic)."""
    n = b.op("Shape", x, start=axis, end=axis + 1)
    cut = b.op("Sub", n, b.op("Mod", b.sym_vector(shift), n, fmod=0))
    tail = b.op("Slice", x, cut, b.ints([INT64_MAX]), b.ints([axis]))
    head = b.op("Slice", x, b.ints([0]), cut, b.ints([axis]))
    return b.op("Concat", tail, head, axis=axis)


@translates("roll")
def _roll(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    x, rank = b.tensor(a["self"]), rank_of(a["self"])
    shifts = [a["shifts"]] if not isinstance(a["shifts"], list) else list(a["shifts"])
    dims = [a["dims"]] if isinstance(a["dims"], int) else list(a["dims"])
    if not dims:  # torch rolls the flattened tensor and restores the shape
        flat = b.op("Reshape", x, b.ints([-1]))
        return b.op("Reshape", _roll_axis(b, flat, shifts[0], 0), b.op("Shape", x))
    for shift, dim in zip(shifts, dims, strict=True):
        x = _roll_axis(b, x, shift, normalize_axis(dim, rank))
    return x


@translates("diff")
def _diff(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    """n-th forward difference along ``dim`` after joining ``prepend``/``append`` (``!=``
    of neighbours for bool, as torch)."""
    dtype = result_dtype(op)
    axis = normalize_axis(a["dim"], rank_of(a["self"]))
    parts = [b.tensor(a[k], dtype) for k in ("prepend", "self", "append") if a[k] is not None]
    x = parts[0] if len(parts) == 1 else b.op("Concat", *parts, axis=axis)
    for _ in range(a["n"]):
        later = b.op("Slice", x, b.ints([1]), b.ints([INT64_MAX]), b.ints([axis]))
        earlier = b.op("Slice", x, b.ints([0]), b.ints([-1]), b.ints([axis]))
        x = b.op("Xor", later, earlier) if dtype == "bool" else b.op("Sub", later, earlier)
    return x


@translates("concat")
def _concat(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype = result_dtype(op)
    parts = [b.tensor(t, dtype) for t in a["tensors"]]
    return b.op("Concat", *parts, axis=normalize_axis(a["dim"], result_rank(op)))


@translates("stack")
def _stack(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype, axis = result_dtype(op), normalize_axis(a["dim"], result_rank(op))
    parts = [b.op("Unsqueeze", b.tensor(t, dtype), b.ints([axis])) for t in a["tensors"]]
    return b.op("Concat", *parts, axis=axis)


def _split_sizes(op: Op, axis: int) -> list[int] | None:
    """The pieces' sizes along ``axis`` when the IR result types give them all statically."""
    sizes = [r.type.shape[axis] for r in op.results]
    return sizes if all(isinstance(s, int) for s in sizes) else None


@translates("split", "split_with_sizes", "chunk", "unbind")
def _split(b: OnnxGraphBuilder, op: Op, a: dict) -> list[ir.Value]:
    x_ir = a["self"]
    axis = normalize_axis(a["dim"], rank_of(x_ir))
    x, count = b.tensor(x_ir), len(op.results)
    if op.kind == "unbind":
        pieces = b.op_multi("Split", x, b.ints([1] * count), num_outputs=count, axis=axis)
        return [b.op("Squeeze", p, b.ints([axis])) for p in pieces]
    sizes = _split_sizes(op, axis)
    if sizes is not None:
        return b.op_multi("Split", x, b.ints(sizes), num_outputs=count, axis=axis)
    if op.kind == "chunk":
        # Split's num_outputs makes equal pieces with a smaller last one, as torch.chunk does
        return b.op_multi("Split", x, num_outputs=count, axis=axis)
    if op.kind == "split":
        size = a["split_size"]
        starts: list[Any] = [i * size if isinstance(size, int) else None for i in range(count)]
        if any(s is None for s in starts):
            raise EmissionError("split with a symbolic split size is not supported")
        ends = starts[1:] + [None]
        return [_slice(b, x, axis, s, e) for s, e in zip(starts, ends, strict=True)]
    # split_with_sizes with symbolic sizes: running offsets
    pieces, offset = [], b.ints([0])
    for size in a["split_sizes"]:
        end = b.op("Add", offset, b.sym_vector(size))
        pieces.append(b.op("Slice", x, offset, end, b.ints([axis])))
        offset = end
    return pieces


# --- gathering --------------------------------------------------------------------------------
@translates("gather")
def _gather(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    axis = normalize_axis(a["dim"], rank_of(a["self"]))
    return b.op("GatherElements", b.tensor(a["self"]), b.tensor(a["index"], "i64"), axis=axis)


@translates("index_select")
def _index_select(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    axis = normalize_axis(a["dim"], rank_of(a["self"]))
    return b.op("Gather", b.tensor(a["self"]), b.tensor(a["index"], "i64"), axis=axis)


@translates("index")
def _index(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    """``x[i0, i1, ...]`` with integer index tensors broadcast against each other.

    The indexed axes move to the front, one ``GatherND`` reads the broadcast index tuples,
    and, as in torch, the broadcast axes go back where the indexed axes were when those
    were adjacent (and stay in front otherwise).
    """
    x_ir, indices = a["self"], list(a["indices"])
    rank = rank_of(x_ir)
    positions = [i for i, t in enumerate(indices) if t is not None]
    for p in positions:
        if not isinstance(indices[p], Value) or indices[p].type.dtype not in ("i64", "i32"):
            raise EmissionError("only integer index tensors are supported by index "
                                "(boolean-mask indexing has a data-dependent shape)")
    rest = [d for d in range(rank) if d not in positions]
    x = b.tensor(x_ir)
    if positions != list(range(len(positions))):
        x = b.op("Transpose", x, perm=positions + rest)
    index_values = [b.tensor(indices[p], "i64") for p in positions]
    if len(index_values) == 1:
        out = b.op("Gather", x, index_values[0], axis=0)
    else:
        shape = b.op("Shape", index_values[0])
        for other in index_values[1:]:  # Expand broadcasts both ways: the common shape
            shape = b.op("Shape", b.op("Expand", other, shape))
        stacked = [b.op("Unsqueeze", b.op("Expand", v, shape), b.ints([-1])) for v in index_values]
        out = b.op("GatherND", x, b.op("Concat", *stacked, axis=-1))
    adjacent = positions == list(range(positions[0], positions[0] + len(positions)))
    if adjacent and positions[0] > 0:
        broadcast_rank = result_rank(op) - len(rest)
        before = positions[0]
        perm = ([broadcast_rank + i for i in range(before)] + list(range(broadcast_rank))
                + [broadcast_rank + i for i in range(before, len(rest))])
        out = b.op("Transpose", out, perm=perm)
    return out


@translates("tril", "triu")
def _trilu(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    return b.op("Trilu", b.tensor(a["self"]), b.sym_scalar(a["diagonal"]), upper=int(op.kind == "triu"))



@translates("index_put")
def _index_put(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    """``x[mask] = value`` with one boolean mask shaped like ``x`` and one value (Gemma 3
    replaces its image tokens so): ``Where(mask, value, x)``. Other index forms are refused."""
    x, indices, values = a["self"], a["indices"], a["values"]
    masks = [i for i in indices if i is not None]
    if a["accumulate"] or len(indices) != 1 or len(masks) != 1 or masks[0].type.dtype != "bool" \
            or masks[0].type.shape != x.type.shape or math.prod(
                d if isinstance(d, int) else 2 for d in getattr(values.type, "shape", (2,))) != 1:
        raise EmissionError("only x[mask] = value (one boolean mask shaped like x, one value) is "
                            "translated")
    dtype = result_dtype(op)
    value = b.op("Reshape", b.tensor(values, dtype), b.ints([]))
    return b.op("Where", b.tensor(masks[0], "bool"), value, b.tensor(x, dtype))


# --- writes into part of a tensor (frontend/view_writes.py) ---------------------------------------
def _positions_along(b: OnnxGraphBuilder, x: ir.Value, axis: int, rank: int, src: ir.Value,
                     positions: ir.Value) -> ir.Value:
    """``positions`` (1-D) laid along ``axis`` and broadcast to ``src``'s shape: the index of a
    ``ScatterElements`` that writes ``src`` at those positions."""
    shape = [1] * rank
    shape[axis] = -1
    return b.op("Expand", b.op("Reshape", positions, b.ints(shape)), b.op("Shape", src))


@translates("slice_scatter")
def _slice_scatter(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    """``self`` with ``self[.., start:end:step, ..] = src``: the positions are a ``Slice`` of
    ``Range(0, size)`` (which clamps as Python's slicing does), written by ``ScatterElements``."""
    dtype, rank = result_dtype(op), result_rank(op)
    axis = normalize_axis(a["dim"], rank)
    x, src = b.tensor(a["self"], dtype), b.tensor(a["src"], dtype)
    size = b.op("Squeeze", b.op("Shape", x, start=axis, end=axis + 1), b.ints([0]))
    every = b.op("Range", b.const(0, "i64"), size, b.const(1, "i64"))
    start = 0 if a["start"] is None else a["start"]
    end = INT64_MAX if a["end"] is None else a["end"]
    positions = b.op("Slice", every, b.sym_vector(start), b.sym_vector(end), b.ints([0]), b.sym_vector(a["step"]))
    return b.op("ScatterElements", x, _positions_along(b, x, axis, rank, src, positions), src, axis=axis)


@translates("select_scatter")
def _select_scatter(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    """``self`` with ``self[.., index, ..] = src`` along ``dim`` (a negative index counts from
    the end), as ``ScatterElements`` of ``src`` with that axis restored."""
    dtype, rank = result_dtype(op), result_rank(op)
    axis = normalize_axis(a["dim"], rank)
    x = b.tensor(a["self"], dtype)
    src = b.op("Unsqueeze", b.tensor(a["src"], dtype), b.ints([axis]))
    size = b.op("Shape", x, start=axis, end=axis + 1)
    index = b.op("Mod", b.sym_vector(a["index"]), size, fmod=0)
    return b.op("ScatterElements", x, _positions_along(b, x, axis, rank, src, index), src, axis=axis)
