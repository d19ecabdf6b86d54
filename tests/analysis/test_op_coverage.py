"""Every IR op kind is accounted for: a coupling rule (or an explicit pin with its reason) and
an ONNX translation (or an explicit opt-out with its reason); every rule says what it does."""

from __future__ import annotations

import pytest

from lorashear.analysis.coupling import DimensionCoupling
from lorashear.analysis.coupling_rules import (
    COUPLING_RULES,
    PIN_REASONS,
    kinds_without_coupling_rule,
)
from lorashear.analysis.manager import AnalysisManager
from lorashear.analysis.zero_rules import ZERO_RULES
from lorashear.ir.core import Graph, Module, Op, Param, Value
from lorashear.ir.ops import OP_DEFS, OpDef
from lorashear.ir.storage import MetaStorage
from lorashear.ir.types import TensorType
from lorashear.passes.compress import COMPRESS_RULES
from lorashear.runtime.onnx_emit import kinds_without_translation
from lorashear.runtime.onnx_ops import NO_TRANSLATION, TRANSLATIONS


def test_every_kind_has_a_coupling_rule():
    assert kinds_without_coupling_rule(OP_DEFS) == []
    assert set(COUPLING_RULES) <= set(OP_DEFS)


def test_every_kind_has_an_onnx_translation_or_a_reason():
    assert kinds_without_translation(OP_DEFS) == []
    assert set(TRANSLATIONS) | set(NO_TRANSLATION) <= set(OP_DEFS)
    assert all(reason for reason in NO_TRANSLATION.values())


def test_a_new_kind_without_rules_is_named(monkeypatch):
    monkeypatch.setitem(OP_DEFS, "my_new_op", OpDef("my_new_op", lambda x: x))
    assert kinds_without_coupling_rule(OP_DEFS) == ["my_new_op"]
    assert kinds_without_translation(OP_DEFS) == ["my_new_op"]


def test_rules_are_documented_and_pins_give_reasons():
    for registry in (COUPLING_RULES, ZERO_RULES, COMPRESS_RULES):
        undocumented = sorted(kind for kind, rule in registry.items() if not (rule.__doc__ or "").strip())
        assert undocumented == []
    assert PIN_REASONS and all("{op}" in reason for reason in PIN_REASONS.values())


@pytest.mark.parametrize("kind", sorted(set(PIN_REASONS) & {"cumsum", "flip", "layer_norm"}))
def test_a_pinned_kind_pins_with_its_reason(kind):
    """``linear(x, W)`` then a pinned op over the output: W's rows carry the op's reason."""
    x = Value("x", TensorType("f32", ("B", 6)))
    w = Param("w", TensorType("f32", (4, 6)), MetaStorage())
    h, y = Value("h", TensorType("f32", ("B", 4))), Value("y", TensorType("f32", ("B", 4)))
    args = {"cumsum": [h, 1], "flip": [h, [1]], "layer_norm": [h, [4]]}[kind]
    ops = [Op("linear", [x, w], {}, [h]), Op(kind, args, {}, [y], loc="model.x")]
    module = Module(Graph([x], ops, [y], ["out"]), [w])
    coupling = AnalysisManager(module).get(DimensionCoupling)
    reasons = {(name, axis): reason for name, axis, reason in coupling.unprunable}
    assert reasons[("w", 0)] == PIN_REASONS[kind].format(op=f"op {kind} at model.x")


def test_a_kind_takes_one_rule_per_table():
    """Each table refuses a second rule for a kind, naming the kind and what it already has."""
    import pytest

    from lorashear.ir.ops import RuleTable

    table: RuleTable = RuleTable("a test rule")
    table.register("neg", "abs")(len)
    assert table["neg"] is len and table["abs"] is len
    with pytest.raises(ValueError, match="op kind 'abs' already has a test rule"):
        table.register("abs")(print)
    for real in (COUPLING_RULES, ZERO_RULES, COMPRESS_RULES, TRANSLATIONS):
        kind = next(iter(real))
        with pytest.raises(ValueError, match=f"op kind '{kind}' already has"):
            real.register(kind)(print)
