"""Trust in inputs: symbolic sizes parsed by a bounded grammar, never eval. Every bad input
ends in one `error:` line, exit code 1, within seconds, and nothing written."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lorashear.cli import lower as lower_cli
from lorashear.cli import opt as opt_cli
from lorashear.errors import IRParseError, VerificationError
from lorashear.ir.dims import MAX_DEPTH, DimSyntaxError, parse_dim
from lorashear.ir.parser import parse_module
from lorashear.ir.types import evaluate_dim

PROJECTION = "model.layers.0.self_attn.o_proj.weight"


def _fails_fast(main, argv, capsys, *must_contain: str) -> str:
    """``main(argv)`` exits 1 within seconds with one `error:` line holding ``must_contain``."""
    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert len(err.splitlines()) == 1 and ": error: " in err and "internal error" not in err, err
    for text in must_contain:
        assert text in err, err
    assert seconds < 30, seconds
    return err


@pytest.fixture(scope="module")
def pristine(tiny_models, tmp_path_factory):
    """The tiny Llama and its adapter, lowered to ``m.ir`` (with a sidecar) beside them."""
    tm = tiny_models["llama"]
    root = tmp_path_factory.mktemp("trust")
    shutil.copytree(tm.model_dir, root / "model")
    shutil.copytree(tm.adapter_dir, root / "adapter")
    assert lower_cli.main([str(root / "model"), "--adapter", str(root / "adapter"),
                           "-o", str(root / "m.ir")]) == 0
    return root


@pytest.fixture
def workdir(pristine, tmp_path):
    """A private copy of ``pristine`` to damage (the `.ir` names its weights by relative path,
    and fingerprints follow bytes, so the copy is as valid as the original)."""
    shutil.copytree(pristine, tmp_path / "w")
    return tmp_path / "w"


def _rewrite_checkpoint(model_dir: Path, change) -> None:
    weights = model_dir / "model.safetensors"
    state = load_file(weights)
    change(state)
    save_file(state, str(weights), metadata={"format": "pt"})


# --- symbolic dimensions ----------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [
    ("S", 7), ("S+1", 8), ("2*B", 6), ("(S//2)", 3), ("3 - S", -4), ("-S+10", 3),
    ("2*(((S + 1)//2))", 8), ("(S + 1)*(S + 2)", 72), ("B*S//2 - 1", 9), ("0*S", 0),
])
def test_dimension_grammar_evaluates(text, value):
    assert evaluate_dim(text, {"S": 7, "B": 3}) == value


@pytest.mark.parametrize("text,offset,message", [
    ("S+0*9**9**9**9", 5, "'\\*\\*' is not dimension arithmetic"),
    ("S/2", 1, "use|with '//'"),
    ("S.x", 1, "unexpected character '.'"),
    ("max(S, 2)", 3, "unexpected '\\('"),
    ("__import__('os')", 10, "unexpected '\\('"),
    ("S+", 2, "ends where a size was expected"),
    ("(S+1", 4, "expected '\\)'"),
    ("S)", 1, "unexpected '\\)'"),
    ("1" * 30, 0, "too large"),
    ("1e5", 1, "unexpected 'e5'"),
])
def test_dimension_outside_the_grammar_fails_at_its_token(text, offset, message):
    with pytest.raises(DimSyntaxError, match=message) as info:
        parse_dim(text)
    assert info.value.offset == offset


def test_dimension_sizes_are_bounded():
    with pytest.raises(DimSyntaxError, match="nests deeper"):
        parse_dim("(" * (MAX_DEPTH + 1) + "S" + ")" * (MAX_DEPTH + 1))
    with pytest.raises(DimSyntaxError, match="longer than"):
        parse_dim("S+" * 200 + "1")
    with pytest.raises(ValueError, match="exceeds 2\\*\\*62"):
        evaluate_dim("S*S*S*S*S", {"S": 1 << 20})
    with pytest.raises(ValueError, match="divides by zero"):
        evaluate_dim("S//(S-S)", {"S": 3})
    parse_dim("(" * MAX_DEPTH + "S" + ")" * MAX_DEPTH)


def test_hostile_dimension_is_a_parse_error_at_its_column(workdir, capsys):
    """The issue's reproduction: the size that made `lorashear-opt ... --passes=dce` spin."""
    text = (workdir / "m.ir").read_text()
    bad = workdir / "bad.ir"
    bad.write_text(text.replace(": f32[B, S, 64]", ': f32[B, S, "S+0*9**9**9**9"]', 1))
    shutil.copy(workdir / "m.ir.weights.safetensors", str(bad) + ".weights.safetensors")
    line = next(i for i, x in enumerate(bad.read_text().splitlines(), 1) if "**" in x)
    column = bad.read_text().splitlines()[line - 1].index("**") + 1
    _fails_fast(opt_cli.main, [str(bad), "--passes=dce", "-o", str(workdir / "o.ir")], capsys,
                f"bad.ir:{line}:{column}:", "'**' is not dimension arithmetic")
    assert not (workdir / "o.ir").exists()


def test_out_of_range_integers_are_parse_errors():
    module_text = "lorashear-ir 1\ninput %x : f32[B, 4]\n%0 = mul(%x, {}) : f32[B, 4]\noutput %0\n"
    parse_module(module_text.format(2**63 - 1))
    for huge in ("9" * 5000, str(2**64 + 1), "-" + "9" * 30):
        with pytest.raises(IRParseError, match="out of range"):
            parse_module(module_text.format(huge))
    with pytest.raises(IRParseError, match="dimension .* out of range"):
        parse_module("lorashear-ir 1\ninput %x : f32[B, " + "9" * 40 + "]\noutput %x\n")
    with pytest.raises(IRParseError, match="malformed size name"):
        parse_module("lorashear-ir 1\ninput %x : f32[B, S.x]\noutput %x\n")


def test_unbound_size_is_a_verification_error():
    module = parse_module('lorashear-ir 1\ninput %x : f32[B, 4]\n'
                          '%0 = mul(%x, 2) : f32["B+T", 4]\noutput %0\n')
    from lorashear.ir.verifier import verify

    with pytest.raises(VerificationError, match="unbound size"):
        verify(module)
