"""Kinds whose axes are made with fixed sizes, symbolic sizes, and the kinds the analysis
does not model (Mixture-of-Experts routing among them): pinned, each with its reason."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorashear.analysis.coupling_rules.registry import coupling_rule, pins
from lorashear.ir.core import Op

if TYPE_CHECKING:
    from lorashear.analysis.coupling import CouplingBuilder


# --- made from scratch, and symbolic sizes -------------------------------------------------------
pins("arange", "arange.start", "arange.start_step", "scalar_tensor",
     reason="made with a fixed size by {op}", operands=False)  # constant fills: products.py


@coupling_rule("dim", "sym.add", "sym.sub", "sym.mul", "sym.floordiv", "sym.mod", "sym.neg", "sym.max",
               "sym.min")
def _symbolic(b: CouplingBuilder, op: Op) -> None:
    """Symbolic integers carry no channel axes; ``dim`` reads a size at run time, so it
    follows whatever compress makes of the axis it reads."""


# --- kinds the analysis does not model: pinned, with the reason ----------------------------------
pins("mm", reason="a matrix product the models we lower do not use (they use "
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
pins("scatter", "scatter.value", "scatter_add", reason="written at data-dependent positions (the "
     "router's chosen experts or expert groups) by {op}")

