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

The rules are grouped by what the ops do: :mod:`.linear` (elementwise and linear algebra),
:mod:`.shapes`, :mod:`.norms` (reductions and normalisation), :mod:`.pinned` (fixed and
symbolic sizes, and the kinds not modelled) and :mod:`.sweep` (ops of the conformance
sweep's decoders); :mod:`.registry` holds the table they register into.
"""

# each rule module registers its rules into COUPLING_RULES when imported
from lorashear.analysis.coupling_rules import linear, norms, pinned, products, shapes, sweep  # noqa: F401
from lorashear.analysis.coupling_rules.registry import (
    COUPLING_RULES,
    PIN_REASONS,
    CouplingRule,
    coupling_rule,
    kinds_without_coupling_rule,
    pins,
)
from lorashear.analysis.coupling_rules.sweep import conv1d_kind, einsum_subscripts, padded_axes

__all__ = ["COUPLING_RULES", "PIN_REASONS", "CouplingRule", "conv1d_kind", "coupling_rule",
           "einsum_subscripts", "kinds_without_coupling_rule", "padded_axes", "pins"]
