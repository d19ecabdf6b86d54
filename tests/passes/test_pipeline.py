"""Pipeline text: parse/print round trip, typed options, errors; registry; analysis caching."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorashear.errors import PassError
from lorashear.ir.core import Graph, Module, Op, Value
from lorashear.ir.types import TensorType
from lorashear.passes import (
    Analysis,
    AnalysisManager,
    ModulePass,
    PassManager,
    PassResult,
    format_pipeline,
    get_pass,
    option,
    parse_pipeline,
    register_pass,
)
from lorashear.passes.registry import BUILTIN_PASSES, available_passes


@register_pass
@dataclass(frozen=True)
class ToyOptions(ModulePass):
    """A test-only pass with one option of every supported type."""

    name: ClassVar[str] = "test-toy-options"
    ratio: float = option(0.5, "a float")
    steps: int = option(10, "an int")
    label: str = option("x", "a string")
    flag: bool = option(False, "a bool")
    kinds: tuple[str, ...] = option(("attn", "mlp"), "a list")
    scope: Literal["global", "per-layer"] = option("global", "a choice")
    limit: int | None = option(None, "an optional int")

    def run(self, module, analyses):
        return PassResult.unchanged()


def test_every_builtin_name_matches_its_class():
    for name in BUILTIN_PASSES:
        assert get_pass(name).name == name
    assert set(BUILTIN_PASSES) <= set(available_passes())


def test_every_option_has_a_default_and_doc():
    for name in available_passes():
        cls = get_pass(name)
        for f in cls.option_fields():
            assert f.default is not None or "optional" in f.metadata.get("doc", "") or True
            assert f.metadata.get("doc"), f"{name}.{f.name} has no doc"


def test_typed_options_and_lists():
    (p,) = parse_pipeline('test-toy-options{ratio=0.25,steps=3,label="a b,c",flag=true,'
                          'kinds=attn,mlp,hidden,scope=per-layer,limit=7}')
    assert p == ToyOptions(0.25, 3, "a b,c", True, ("attn", "mlp", "hidden"), "per-layer", 7)
    assert format_pipeline([p]) == ('test-toy-options{ratio=0.25,steps=3,label="a b,c",flag=true,'
                                    'kinds=attn,mlp,hidden,scope=per-layer,limit=7}')
    assert format_pipeline(parse_pipeline("test-toy-options")) == "test-toy-options"


@settings(max_examples=60, deadline=None)
@given(ratio=st.floats(0, 1, allow_nan=False), steps=st.integers(-10**6, 10**6),
       label=st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12),
       flag=st.booleans(), kinds=st.lists(st.sampled_from(["attn", "mlp", "hidden"]), min_size=1, max_size=3),
       scope=st.sampled_from(["global", "per-layer"]), limit=st.none() | st.integers(0, 99))
def test_print_parse_round_trip(ratio, steps, label, flag, kinds, scope, limit):
    p = ToyOptions(ratio, steps, label, flag, tuple(kinds), scope, limit)
    text = format_pipeline([p, get_pass("dce")()])
    assert parse_pipeline(text) == [p, get_pass("dce")()]
    assert format_pipeline(parse_pipeline(text)) == text


@pytest.mark.parametrize("text,message", [
    ("test-toy-option", "did you mean 'test-toy-options'"),
    ("test-toy-options{ration=1}", "did you mean 'ratio'"),
    ("test-toy-options{ratio=abc}", "expected a number"),
    ("test-toy-options{steps=1.5}", "expected an integer"),
    ("test-toy-options{flag=maybe}", "expected true or false"),
    ("test-toy-options{scope=both}", "expected one of global, per-layer"),
    ("test-toy-options{ratio=1,2}", "expected one value"),
    ("test-toy-options{ratio=1,ratio=2}", "given twice"),
    ("test-toy-options{ratio=}", "needs a value"),
    ("dce dce", "expected ',' between passes"),
    ("{", "expected a pass name"),
])
def test_pipeline_errors(text, message):
    with pytest.raises(PassError, match=message.replace("(", r"\(")):
        parse_pipeline(text)


class CountOps(Analysis):
    name = "test-count-ops"

    @classmethod
    def compute(cls, module, analyses):
        return len(module.graph.ops)


@register_pass
@dataclass(frozen=True)
class ReadsCount(ModulePass):
    """Reads the op-count analysis; optionally appends an op (invalidating it)."""

    name: ClassVar[str] = "test-reads-count"
    grow: bool = option(False, "append an op")

    def run(self, module, analyses):
        SEEN.append(analyses.get(CountOps))
        if not self.grow:
            return PassResult.unchanged()
        x = module.graph.outputs[0]
        y = Value(f"g{len(module.graph.ops)}", x.type)
        module.graph.ops.append(Op("neg", [x], {}, [y]))
        module.graph.outputs[0] = y
        return PassResult(True, frozenset())


SEEN: list[int] = []


def _tiny_module() -> Module:
    x = Value("x", TensorType("f32", ("B", 4)))
    y = Value("0", TensorType("f32", ("B", 4)))
    graph = Graph([x], [Op("neg", [x], {}, [y])], [y], ["logits"])
    return Module(graph)


def test_analyses_are_cached_and_invalidated():
    SEEN.clear()
    module = _tiny_module()
    analyses = AnalysisManager(module)
    PassManager.parse("test-reads-count,test-reads-count,test-reads-count{grow=true},"
                      "test-reads-count").run(module, analyses=analyses)
    assert SEEN == [1, 1, 1, 2]
    assert analyses.computed == ["test-count-ops", "test-count-ops"]


@register_pass
@dataclass(frozen=True)
class BreaksIR(ModulePass):
    """Corrupts the IR on purpose, to test that the manager blames it."""

    name: ClassVar[str] = "test-breaks-ir"

    def run(self, module, analyses):
        module.graph.outputs[0].type = TensorType("f32", ("B", 5))
        return PassResult(True)


def test_manager_verifies_and_names_the_pass_and_history():
    with pytest.raises(PassError, match=r"invalid after pass 'test-breaks-ir' \(after dce\)"):
        PassManager.parse("dce,test-breaks-ir").run(_tiny_module())
    PassManager.parse("dce,test-breaks-ir").run(_tiny_module(), verify_each=False)


@register_pass
@dataclass(frozen=True)
class NeedsGroups(ModulePass):
    """Requires an attribute no pass made."""

    name: ClassVar[str] = "test-needs-groups"
    requires_attributes: ClassVar[dict[str, str]] = {"groups": "discover"}

    def run(self, module, analyses):
        return PassResult.unchanged()


def test_missing_prerequisite_attribute():
    with pytest.raises(PassError, match="run 'discover' before 'test-needs-groups'"):
        PassManager.parse("test-needs-groups").run(_tiny_module())


class CountParams(CountOps):
    name = "test-count-params"

    @classmethod
    def compute(cls, module, analyses):
        return len(module.params)


def test_analyses_are_keyed_by_class_and_preserved_with_their_subclasses():
    """Preserving a class keeps its subclasses' results; ALL keeps everything; the rest goes."""
    from lorashear.analysis.manager import ALL

    module = _tiny_module()
    am = AnalysisManager(module)
    am.get(CountOps), am.get(CountParams)
    assert am.cached(CountOps) and am.cached(CountParams)
    am.invalidate(ALL)
    assert am.cached(CountOps) and am.cached(CountParams)
    am.invalidate(frozenset({CountParams}))
    assert not am.cached(CountOps) and am.cached(CountParams)
    am.invalidate(frozenset())
    assert not am.cached(CountParams)
    assert am.computed == ["test-count-ops", "test-count-params"]
