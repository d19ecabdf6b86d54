"""Coupling rules of elementwise ops and linear algebra (linear, LoRA, embedding, matmul,
attention): which axes an op carries through as one channel space."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorashear.analysis.coupling_rules.registry import coupling_rule
from lorashear.ir.core import Op, Param, Value
from lorashear.ir.lora import lora_parts
from lorashear.ir.ops import OP_DEFS

if TYPE_CHECKING:
    from lorashear.analysis.coupling import CouplingBuilder, Ref


# --- elementwise ------------------------------------------------------------------------------
@coupling_rule(*(kind for kind, definition in OP_DEFS.items() if definition.elementwise))
def broadcast(b: CouplingBuilder, op: Op) -> None:
    """Elementwise ops: each operand axis is the output axis it broadcasts to (aligned from
    the right), except a size-1 axis stretched over a larger one. Exact because the op reads
    channel i of every operand to make channel i of the output, so removing channel i
    everywhere removes exactly output channel i."""
    for ref in b.tensors(op):
        broadcast_into(b, op, ref, op.results[0])


def broadcast_into(b: CouplingBuilder, op: Op, ref: Ref, out: Value) -> None:
    """Identify each axis of ``ref`` with the axis of ``out`` it broadcasts to (aligned from the
    right; a size-1 axis stretched over a larger one stays apart)."""
    out_desc = b.desc(out)
    rank = len(out_desc)
    d = b.desc(ref)
    for j, axis in enumerate(d):
        k = j + rank - len(d)
        if k < 0:
            continue
        if ref.type.shape[j] == 1 and out.type.shape[k] != 1:
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
    (only then does dropping them leave every product unchanged). On vectors: pinned.

    A batch axis of a static size (a factor of one: ``[B, heads, S, d]``, or ``"16*B"`` where
    eager attention merges its heads into the batch) indexes independent products, as the
    heads of attention do: its factors are recorded as heads (the ``attn`` kind)."""
    a = op.bound_args()
    matmul_axes(b, op, a["self"], a["other"] if "other" in a else a["mat2"])


def matmul_axes(b: CouplingBuilder, op: Op, left: Ref, right: Ref) -> None:
    """The coupling of ``left @ right`` into the op's first result (see ``matmul``)."""
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
    fs = b.fs
    for axis in out[:-2]:
        b.head_factors.extend(f for f in axis for x in fs.leaves(f) if fs.size[fs.find(x)] not in (None, 1))


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


