"""Symbolic sizes from ``torch.export``'s shape environment, simplified to the IR's size
arithmetic where their value is decided: a ``Max``/``Min`` fixed by the sizes' ranges, and a floor
division that divides exactly."""

from __future__ import annotations


def static_min_max(expr, shape_env):
    """``expr``, or its value where it holds a ``Max``/``Min`` that the sizes' known ranges
    decide (MPT's ``1 - Max(0, 1 - S)`` is 1 for any sequence length of at least 2)."""
    import sympy

    if shape_env is None or not any(name in str(expr) for name in ("Max(", "Min(")):
        return expr
    try:
        bounds = shape_env.bound_sympy(expr)
    except Exception:  # noqa: BLE001 - torch's range analysis: undecided if it fails
        return expr
    if bounds.lower == bounds.upper and bounds.lower.is_number:
        return sympy.Integer(int(bounds.lower))
    return expr


def exact_quotients(expr):
    """``expr`` with each floor division that divides exactly replaced by its quotient (XLNet's
    ``S**2 // S`` is ``S``); unchanged where none does."""
    import sympy
    from torch.utils._sympy.functions import FloorDiv

    if expr.is_number or not expr.has(FloorDiv):
        return expr

    def quotient(node):
        exact = sympy.cancel(node.args[0] / node.args[1])
        if sympy.fraction(exact)[1] == 1 and exact.is_polynomial() \
                and all(c.is_integer for c in sympy.Poly(exact).coeffs()):
            return exact
        return node

    try:
        return expr.replace(lambda n: isinstance(n, FloorDiv), quotient)
    except Exception:  # noqa: BLE001 - an expression sympy cannot rewrite stays as it is
        return expr
