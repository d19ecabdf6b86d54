"""The text parser under fuzzing, and the verifier on broken modules."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorashear.errors import IRFormatVersionError, IRParseError, VerificationError
from lorashear.ir.core import Op, Value
from lorashear.ir.parser import parse_module
from lorashear.ir.printer import FORMAT_VERSION, print_module
from lorashear.ir.types import TensorType
from lorashear.ir.verifier import verify

SMALL = """lorashear-ir 1
attr source = source {"adapter":null,"model":"/m"}
param @w : f32[8, 4] = meta
param @b : f32[8] = file("weights.safetensors", "b")
input %x : f32[B, S, 4]
%0 = linear(%x, @w, @b) : f32[B, S, 8] loc("layer")
%1 = dim(%x, 1) : sym
%2, %3 = split_with_sizes(%0, [3, 5], -1) : f32[B, S, 3], f32[B, S, 5]
%4 = mul(%3, 0.5) : f32[B, S, 5]
%5 = reshape(%4, [-1, %1, 5]) : f32[B, S, 5]
%6 = sum(%5, [-1], true, dtype=f32) : f32[B, S, 1]
%7 = gt.scalar(%6, 0.0) : bool[B, S, 1]
%8 = masked_fill(%6, %7, -inf) : f32[B, S, 1]
output logits = %8
"""


def test_small_round_trip_and_verify():
    module = parse_module(SMALL)
    assert print_module(module) == SMALL
    verify(module)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_text_fails_only_with_parse_errors(data):
    text = SMALL
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(text)))
        kind = data.draw(st.sampled_from(["delete", "insert", "replace", "truncate"]))
        if kind == "delete":
            text = text[:pos] + text[pos + data.draw(st.integers(1, 8)):]
        elif kind == "insert":
            text = text[:pos] + data.draw(st.text(max_size=6)) + text[pos:]
        elif kind == "replace":
            text = text[:pos] + data.draw(st.sampled_from(list('%@[](),:="{}0-x\n '))) + text[pos + 1:]
        else:
            text = text[:pos]
    try:
        module = parse_module(text)
    except (IRParseError, IRFormatVersionError):
        return
    # whatever parses prints back to text that parses to the same print
    assert print_module(parse_module(print_module(module))) == print_module(module)
    try:
        verify(module)
    except VerificationError:
        pass


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_random_text_never_crashes(text):
    try:
        parse_module("lorashear-ir 1\n" + text)
    except (IRParseError, IRFormatVersionError):
        pass


@pytest.mark.parametrize("old,new,message", [
    ("%0 = linear(%x, @w, @b) : f32[B, S, 8]", "%0 = linear(%x, @w, @b) : f32[B, S, 9]", "declared f32"),
    ("%4 = mul(%3, 0.5)", "%4 = frobnicate(%3, 0.5)", "unknown op kind"),
    ("param @w : f32[8, 4]", "param @w : f32[8, 3]", "ill-typed"),
    ("%1 = dim(%x, 1) : sym", "%1 = dim(%x, 1) : f32[1]", "declared f32"),
])
def test_verifier_catches(old, new, message):
    module = parse_module(SMALL.replace(old, new))
    with pytest.raises(VerificationError, match=message):
        verify(module)


def test_verifier_catches_use_before_def():
    module = parse_module(SMALL)
    ops = module.graph.ops
    ops[0], ops[2] = ops[2], ops[0]
    with pytest.raises(VerificationError, match="before it is defined"):
        verify(module)


def test_verifier_catches_foreign_param():
    module = parse_module(SMALL)
    other = parse_module(SMALL)
    module.graph.ops[0].args[1] = other.params["w"]
    with pytest.raises(VerificationError, match="not a parameter of this module"):
        verify(module)


def test_parse_errors_point_at_line_and_column():
    with pytest.raises(IRParseError, match=r"<string>:6:\d+: use of undefined value %y"):
        parse_module(SMALL.replace("linear(%x,", "linear(%y,"))
    with pytest.raises(IRParseError, match="undeclared parameter @q"):
        parse_module(SMALL.replace("@w, @b", "@q, @b"))
    with pytest.raises(IRParseError, match="defined twice"):
        parse_module(SMALL.replace("%4 = mul", "%3 = mul"))
    newer = FORMAT_VERSION + 1
    with pytest.raises(IRFormatVersionError, match=f"version {newer}"):
        parse_module(SMALL.replace("lorashear-ir 1", f"lorashear-ir {newer}"))


def test_op_cannot_read_its_own_result():
    with pytest.raises(IRParseError, match="undefined value %4"):
        parse_module(SMALL.replace("%4 = mul(%3, 0.5)", "%4 = mul(%4, 0.5)"))


def test_values_keep_producers():
    module = parse_module(SMALL)
    for op in module.graph.ops:
        for r in op.results:
            assert isinstance(r, Value) and r.producer is op and isinstance(op, Op)
    assert module.graph.inputs[0].type == TensorType("f32", ("B", "S", 4))


LORA = """lorashear-ir 1
param @q.weight : f32[4, 4] = meta
param @q.lora_A.weight : f32[2, 4] = meta
param @q.lora_B.weight : f32[4, 2] = meta
input %x : f32[B, S, 4]
%0 = lora_linear(%x, @q.weight, none, @q.lora_A.weight, @q.lora_B.weight, scaling=2.0, dropout=0.0) : f32[B, S, 4]
output logits = %0
"""


def test_lora_rank_mismatch_is_caught():
    verify(parse_module(LORA))
    with pytest.raises(VerificationError, match="lora_linear.*ill-typed"):
        verify(parse_module(LORA.replace("@q.lora_B.weight : f32[4, 2]", "@q.lora_B.weight : f32[4, 3]")))


def test_pass_attributes_parse_in_a_fresh_process(tmp_path):
    """`.ir` files carrying groups/prune-mask load without importing any pass first."""
    import subprocess
    import sys
    from pathlib import Path

    source = Path(__file__).parent.parent / "filecheck" / "mlp.ir"
    done = subprocess.run(["lorashear-opt", str(source), "--passes=discover", "-o", str(tmp_path / "g.ir")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    code = ("from lorashear.ir.fileformat import load_ir; m = load_ir(r'%s'); "
            "print(sorted(m.attributes))" % (tmp_path / "g.ir"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "'groups'" in done.stdout and "'prune-mask'" in done.stdout


def test_bound_args_name_positional_and_keyword_arguments_alike():
    """An op reads the same by name whether lowering passed an argument by position or keyword."""
    from lorashear.ir.core import Op, Value
    from lorashear.ir.types import TensorType

    x = Value("x", TensorType("f32", (2, 3, 4)))
    by_position = Op("transpose", [x, 0, 2], {}, [Value("y", TensorType("f32", (4, 3, 2)))])
    by_keyword = Op("transpose", [x], {"dim0": 0, "dim1": 2}, [Value("z", TensorType("f32", (4, 3, 2)))])
    assert by_position.bound_args() == by_keyword.bound_args() == {"self": x, "dim0": 0, "dim1": 2}
    softmax = Op("softmax", [x, -1], {}, [Value("s", x.type)])
    assert softmax.bound_args()["dtype"] is None  # the schema's default is filled in
    dropout = Op("dropout", [x, 0.1], {}, [Value("d", x.type)])
    assert dropout.bound_args() == {"x": x, "p": 0.1, "training": False}


def test_lora_parts_name_every_adapter_operand(lowered):
    from lorashear.ir.lora import adapters

    module = lowered("llama", True)
    found = list(adapters(module))
    assert found
    for op, parts in found:
        assert [parts.x, parts.weight, parts.bias, parts.lora_a, parts.lora_b] == op.args
        assert parts.scaling == float(op.kwargs["scaling"])
        assert "lora_A" in parts.lora_a.name and "lora_B" in parts.lora_b.name
        assert parts.lora_b.type.shape[0] == parts.weight.type.shape[0]
