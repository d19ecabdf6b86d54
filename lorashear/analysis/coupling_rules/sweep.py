"""Coupling rules of ops that the conformance sweep's decoders use (issue #22): padding,
``einsum``, the 1-D convolutions of GPT-2-family ``Conv1D`` layers, vector norms, and the
writes into a slice or a selected row that in-place writes through views lower to."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorashear.analysis.coupling_rules.norms import _reduce as reduction_rule
from lorashear.analysis.coupling_rules.registry import coupling_rule, pins
from lorashear.ir.core import Op, Param, Value

if TYPE_CHECKING:
    from lorashear.analysis.coupling import CouplingBuilder


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


@coupling_rule("linalg_vector_norm")
def _vector_norm(b: CouplingBuilder, op: Op) -> None:
    """``(sum |x|^ord)^(1/ord)`` over ``dim`` (Zaya's q/k norm over head_dim): for a positive
    ``ord`` (the infinity norm included) a pruned channel that is zero adds nothing, so it is a
    reduction as ``sum`` is (kept axes pass through, a reduced channel axis is accepted only
    where pruned channels are zero); for ``ord <= 0`` a zero changes the result, and every
    axis it reduces over is pinned."""
    a = op.bound_args()
    if a["ord"] > 0:
        reduction_rule(b, op)
        return
    _pinned_reduction(b, op, f"a norm of order {a['ord']} (a zero changes it) by {b.where(op)}")


@coupling_rule("std")
def _std(b: CouplingBuilder, op: Op) -> None:
    """The standard deviation over ``dim`` (Gemma 3n's Gaussian top-k of its MLP activations):
    kept axes pass through; a zero in place of a pruned channel changes the mean and the
    spread, so the reduced axes are pinned."""
    _pinned_reduction(b, op, f"a standard deviation over it (a zero changes it) by {b.where(op)}")


def _pinned_reduction(b: CouplingBuilder, op: Op, why: str) -> None:
    """A reduction over ``dim`` (all axes when None) that no pruned channel may enter: the
    reduced axes are pinned with ``why``, the others pass through (``keepdim`` keeps a pinned
    size-1 axis in place)."""
    a = op.bound_args()
    x, out = a["self"], op.results[0]
    rank = len(x.type.shape)
    dims = a["dim"] if a["dim"] is not None else list(range(rank))
    dims = {d % rank for d in (dims if isinstance(dims, list) else [dims])}
    k = 0
    for j, axis in enumerate(b.desc(x)):
        if j in dims:
            b.pin_axis(axis, why)
            if a["keepdim"]:
                b.pin_axis(b.desc(out)[k], why)
                k += 1
            continue
        b.fs.unify(axis, b.desc(out)[k], b.where(op))
        k += 1


@coupling_rule("slice_scatter", "select_scatter")
def _scatter_into_part(b: CouplingBuilder, op: Op) -> None:
    """``self`` with a slice (or one index) along ``dim`` replaced by ``src``: every axis of
    ``self`` is the result's; ``src``'s axes are the result's other than ``dim`` (a selected
    row has no ``dim`` axis); the ``dim`` axis is pinned on all of them (its elements are
    positions). Exact: every element off ``dim`` stays in its own channel."""
    a = op.bound_args()
    x, src, out = a["self"], a["src"], op.results[0]
    rank = len(out.type.shape)
    dim = a["dim"] % rank
    why = f"written at positions along an axis by {b.where(op)}"
    xd, od = b.desc(x), b.desc(out)
    for k in range(rank):
        if k == dim:
            b.pin_axis(xd[k], why)
            b.pin_axis(od[k], why)
        else:
            b.fs.unify(xd[k], od[k], b.where(op))
    if not isinstance(src, (Value, Param)):
        return
    sd = b.desc(src)
    axes = list(range(rank)) if op.kind == "slice_scatter" else [k for k in range(rank) if k != dim]
    for axis, k in zip(sd, axes):
        if k == dim:
            b.pin_axis(axis, why)
        else:
            b.fs.unify(axis, od[k], b.where(op))
