"""Coupling rules of batched products with a bias (``baddbmm``: GPT-NeoX-Japanese's and
BLOOM's eager attention scores) and of constant fills (``zeros``, ``full``, ...), which such
a bias is often made of."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorashear.analysis.coupling_rules.linear import broadcast_into, matmul_axes
from lorashear.analysis.coupling_rules.registry import coupling_rule
from lorashear.ir.core import Op, Param, Value

if TYPE_CHECKING:
    from lorashear.analysis.coupling import CouplingBuilder


@coupling_rule("baddbmm")
def _baddbmm(b: CouplingBuilder, op: Op) -> None:
    """``beta * self + alpha * (batch1 @ batch2)``: the product's axes as ``bmm`` (batch axes
    shared, a static one being heads; the contracted axis checked by the zero analysis), and
    ``self`` broadcast into the result as an elementwise operand. Exact as ``bmm`` and ``add``
    are: each result element reads its own entry of ``self`` and its own row and column."""
    a = op.bound_args()
    matmul_axes(b, op, a["batch1"], a["batch2"])
    if isinstance(a["self"], (Value, Param)):
        broadcast_into(b, op, a["self"], op.results[0])


@coupling_rule("zeros", "ones", "full", "empty", "new_ones", "new_zeros", "new_full")
def _fill(b: CouplingBuilder, op: Op) -> None:
    """A tensor of one value (or uninitialised) of the sizes given: its axes are whatever
    they meet (GPT-NeoX-Japanese adds its attention scores to ``zeros([heads*B, S, S])``).
    Exact: every entry is the same, so any channels removed leave the same tensor, and
    ``compress`` rewrites the size literals (and a ``sym.mul`` size) from the new shape."""
