"""Coupling rules of reductions and normalisation (softmax, sums and means, RMSNorm,
LayerNorm): what a shrunk axis does to a statistic over it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorashear.analysis.coupling_rules.registry import PIN_REASONS, coupling_rule
from lorashear.ir.core import Op, Param, Value
from lorashear.ir.ops import OP_DEFS

if TYPE_CHECKING:
    from lorashear.analysis.coupling import CouplingBuilder


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


