"""Zero rules: for each op kind, which channels are exactly zero in the masked model.

The masked model zeroes the pruned groups' parameter slices. After coupling, the zero
analysis walks the graph forward and asks each op's rule which factor classes (channel
spaces) of its first result are zero whenever the channels of that class are pruned. A
parameter is zero on every class of its axes; a kind without a rule here makes no claim
(nothing is known to be zero), which is always safe.

The answer decides two things where an op mixes channels rather than carrying them: a
reduction (``sum``, ``mean``, ``rms_norm``) over a pruned axis is exact only when the
pruned channels it adds up are zero (it is then recorded for ``compress``, which keeps a
mean's divisor or rescales the norm), and a matrix product contracting a pruned axis is
exact only when one side is zero there. Otherwise the axis is pinned with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from lorashear.analysis.coupling_rules import conv1d_kind
from lorashear.ir.core import Op, Param, Value
from lorashear.ir.lora import lora_parts
from lorashear.ir.ops import OP_DEFS, RuleTable, parameter_names

if TYPE_CHECKING:
    from lorashear.analysis.coupling import ZeroContext

ZeroRule = Callable[["ZeroContext", Op], set[int]]

#: IR op kind -> its zero rule: ``rule(ctx, op)`` returns the classes of the op's first result
#: that are zero in the masked model when pruned (kinds without one: nothing known to be zero).
ZERO_RULES: RuleTable[ZeroRule] = RuleTable("a zero rule")
zero_rule = ZERO_RULES.register


def _first_input(op: Op):
    """The op's first argument by name (``self`` for ATen kinds, ``x`` for our own)."""
    return op.bound_args()[parameter_names(op.kind)[0]]


# --- linear algebra -------------------------------------------------------------------------
def _linear_zeros(ctx: ZeroContext, op: Op, x: Value, weight: Param) -> set[int]:
    rows = ctx.axis_classes(ctx.desc(weight)[0])
    return ctx.classes(op.results[0]) & (rows | ctx.zeros(x))


@zero_rule("linear")
def _linear(ctx: ZeroContext, op: Op) -> set[int]:
    """An output channel is zero when its weight row is (a pruned row zeroes the channel,
    the bias with it, since the bias follows the rows) and wherever the input is zero on a
    batch axis."""
    a = op.bound_args()
    return _linear_zeros(ctx, op, a["input"], a["weight"])


@zero_rule("lora_linear")
def _lora_linear(ctx: ZeroContext, op: Op) -> set[int]:
    """As ``linear``: B's rows follow W's rows and are zeroed with them, so the LoRA update
    is zero on a pruned output channel too."""
    parts = lora_parts(op)
    return _linear_zeros(ctx, op, parts.x, parts.weight)


@zero_rule("embedding")
def _embedding(ctx: ZeroContext, op: Op) -> set[int]:
    """The looked-up rows are zero on the table's pruned columns: the last output axis."""
    return ctx.axis_classes(ctx.desc(op.results[0])[-1])


@zero_rule("matmul", "bmm")
def _matmul(ctx: ZeroContext, op: Op) -> set[int]:
    """Makes no claim about its output, but checks its contracted axis: dropping channel j
    from ``sum_j a_ij b_jk`` is exact only when ``a_ij`` or ``b_jk`` is zero for a pruned j,
    so a contracted factor zero on neither side is pinned."""
    axis = ctx.contracted_axis(op)
    if axis is not None:
        a = op.bound_args()
        left, right = a["self"], a["other"] if "other" in a else a["mat2"]
        zero = ctx.zeros(left) | ctx.zeros(right)
        for f in axis:
            for leaf in ctx.fs.leaves(f):
                if ctx.fs.find(leaf) not in zero:
                    ctx.fs.pin(leaf, f"contracted by {ctx.where(op)} between non-zero activations")
    return set()


@zero_rule("baddbmm")
def _baddbmm(ctx: ZeroContext, op: Op) -> set[int]:
    """No claim about the result (``self`` is added); the contracted axis is checked as
    ``matmul`` checks its own."""
    axis = ctx.contracted_axis(op)
    if axis is not None:
        a = op.bound_args()
        zero = ctx.zeros(a["batch1"]) | ctx.zeros(a["batch2"])
        for f in axis:
            for leaf in ctx.fs.leaves(f):
                if ctx.fs.find(leaf) not in zero:
                    ctx.fs.pin(leaf, f"contracted by {ctx.where(op)} between non-zero activations")
    return set()


@zero_rule("addmm")
def _addmm(ctx: ZeroContext, op: Op) -> set[int]:
    """As ``linear`` with the weight ``[in, out]``: an output column is zero where mat2's
    column and the bias are (a pruned Conv1D output channel); the contracted axis is checked
    as ``matmul`` checks its own."""
    a = op.bound_args()
    bias, left, right = a["self"], a["mat1"], a["mat2"]
    axis = ctx.contracted_axis(op)
    if axis is not None:
        zero = ctx.zeros(left) | ctx.zeros(right)
        for f in axis:
            for leaf in ctx.fs.leaves(f):
                if ctx.fs.find(leaf) not in zero:
                    ctx.fs.pin(leaf, f"contracted by {ctx.where(op)} between non-zero activations")
    out = op.results[0]
    got = ctx.axis_classes(ctx.desc(out)[1]) & ctx.zeros(right)
    if isinstance(bias, (Value, Param)):
        got &= ctx.zeros(bias)
    elif bias not in (0, None) and a["beta"] != 0:
        got = set()
    return got


@zero_rule("sdpa")
def _sdpa(ctx: ZeroContext, op: Op) -> set[int]:
    """The output is a weighted sum of value rows: zero wherever ``value`` is zero (a
    pruned KV head's values, or pruned channels of head_dim)."""
    return ctx.zeros(op.bound_args()["value"])


# --- elementwise ------------------------------------------------------------------------------
@zero_rule("mul", "mul.scalar")
def _mul(ctx: ZeroContext, op: Op) -> set[int]:
    """A product is zero where any factor is zero."""
    tensors = ctx.tensors(op)
    return set().union(*(ctx.zeros(t) for t in tensors)) if tensors else set()


@zero_rule("add", "sub")
def _add(ctx: ZeroContext, op: Op) -> set[int]:
    """A sum of two tensors is zero where both are (a residual add of two pruned streams);
    a class an operand does not have (it is broadcast there) is not zero. With a scalar
    operand nothing is known."""
    a = op.bound_args()
    if not all(isinstance(a[name], (Value, Param)) for name in ("self", "other")):
        return set()
    tensors = ctx.tensors(op)
    got = set.intersection(*(ctx.zeros(t) for t in tensors))
    for t in tensors:
        got -= ctx.classes(op.results[0]) - ctx.classes(t)
    return got


@zero_rule("div")
def _div(ctx: ZeroContext, op: Op) -> set[int]:
    """``0 / y == 0``: zero where the dividend is (the divisor is never a pruned channel in
    the models we lower; a zero divisor would give nan, not zero)."""
    return ctx.zeros(op.bound_args()["self"])


@zero_rule("pow")
def _pow(ctx: ZeroContext, op: Op) -> set[int]:
    """``0 ** p == 0`` for a positive scalar exponent."""
    a = op.bound_args()
    exponent = a["exponent"]
    return ctx.zeros(a["self"]) if isinstance(exponent, (int, float)) and exponent > 0 else set()


@zero_rule(*(kind for kind, definition in OP_DEFS.items() if definition.zero_preserving),
           "reshape", "transpose", "permute", "t", "unsqueeze", "squeeze", "squeeze.dims", "expand",
           "slice", "repeat_interleave", "flatten", "select", "repeat")
def _carried(ctx: ZeroContext, op: Op) -> set[int]:
    """Ops with ``f(0) == 0`` (the ``zero_preserving`` trait) and ops that only move, copy
    or select data keep their input's zero channels."""
    return ctx.zeros(_first_input(op))


@zero_rule("stack")
def _stack(ctx: ZeroContext, op: Op) -> set[int]:
    """Stacked tensors are zero where every one of them is."""
    tensors = ctx.tensors(op)
    return set.intersection(*(ctx.zeros(t) for t in tensors)) if tensors else set()


# --- reductions and normalisation ---------------------------------------------------------------
def _check_reduced(ctx: ZeroContext, op: Op, zero: set[int]) -> None:
    """Accept each channel factor the op reduces over where it is zero in the input (recorded
    for compress), pin it where it is not."""
    fs = ctx.fs
    for axis in ctx.reduced_axes(op):
        for leaf in ctx.axis_classes(axis):
            if fs.size[leaf] in (None, 1) or leaf in fs.pinned:
                continue
            if leaf in zero:
                ctx.record_reduction(op, leaf)
            else:
                fs.pin(leaf, f"reduced by {ctx.where(op)} where it is not zero when pruned")


@zero_rule(*(kind for kind, definition in OP_DEFS.items() if definition.reduction), "linalg_vector_norm")
def _reduce(ctx: ZeroContext, op: Op) -> set[int]:
    """A sum or mean keeps the input's zero channels on its kept axes. Over a reduced axis,
    pruned channels that are zero add nothing to the sum, so a sum is exact after slicing
    and a mean is exact with its original divisor; a reduced factor that is not zero when
    pruned is pinned. So for a vector norm of positive order (its coupling rule pins the
    others)."""
    got = ctx.zeros(op.bound_args()["self"])
    _check_reduced(ctx, op, got)
    return got


@zero_rule("rms_norm")
def _rms_norm(ctx: ZeroContext, op: Op) -> set[int]:
    """``weight * x * rsqrt(mean(x^2) + eps)`` is zero where x or the weight is. Pruned
    channels of the normalised axes that are zero in x add nothing to the sum of squares, so
    the norm is exact after compress rescales it; others are pinned."""
    a = op.bound_args()
    zero = ctx.zeros(a["input"])
    _check_reduced(ctx, op, zero)
    return zero | ctx.zeros(a["weight"])


# --- ops of the conformance sweep's decoders (issue #22) ------------------------------------------
@zero_rule("pad", "pad.constant")
def _pad(ctx: ZeroContext, op: Op) -> set[int]:
    """Padding with zeros keeps the input's zero channels (on the unpadded axes, the only ones
    that carry channels); with any other fill or mode nothing is known."""
    a = op.bound_args()
    value = a["value"]
    if a.get("mode", "constant") != "constant" or value not in (None, 0, 0.0):
        return set()
    return ctx.zeros(a["self"])


@zero_rule("einsum")
def _einsum(ctx: ZeroContext, op: Op) -> set[int]:
    """Each output element sums products that take one element of every operand: it is zero
    where any operand is zero on an output letter's channel. A contracted letter is checked as
    ``matmul`` checks its contracted axis: pinned unless some operand is zero on its pruned
    channels."""
    tensors = ctx.tensors(op)
    zero = set().union(*(ctx.zeros(t) for t in tensors)) if tensors else set()
    for axis in ctx.contracted_axes(op):
        for f in axis:
            for leaf in ctx.fs.leaves(f):
                if ctx.fs.find(leaf) not in zero:
                    ctx.fs.pin(leaf, f"contracted by {ctx.where(op)} between non-zero activations")
    return zero


@zero_rule("conv1d")
def _conv1d(ctx: ZeroContext, op: Op) -> set[int]:
    """An output channel is zero where its filter (weight row, with its bias entry) is pruned,
    and, depthwise, where its input channel is zero."""
    a = op.bound_args()
    kind = conv1d_kind(op)
    if kind is None:
        return set()
    rows = ctx.axis_classes(ctx.desc(a["weight"])[0])
    return rows | (ctx.zeros(a["input"]) if kind == "depthwise" else set())
