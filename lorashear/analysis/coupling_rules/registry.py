"""The coupling-rule registry: the table of op kind -> rule, and :func:`pins`, the explicit
form of "not modelled". The rules themselves live in the sibling modules."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from lorashear.ir.core import Op
from lorashear.ir.ops import RuleTable

if TYPE_CHECKING:
    from lorashear.analysis.coupling import CouplingBuilder

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
