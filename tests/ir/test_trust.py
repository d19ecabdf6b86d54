"""Trust in inputs: symbolic sizes without eval, weight handles checked on load, fingerprints of
the source checkpoint, NaN/Inf refused at lowering. Every bad input ends in one `error:` line,
exit code 1, within seconds, and nothing written."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorashear.cli import emit as emit_cli
from lorashear.cli import lower as lower_cli
from lorashear.cli import opt as opt_cli
from lorashear.errors import IRParseError, ModelLoadError, VerificationError
from lorashear.frontend.lower import lower
from lorashear.frontend.pretrained import lower_pretrained
from lorashear.ir.dims import MAX_DEPTH, DimSyntaxError, parse_dim
from lorashear.ir.fileformat import load_ir, save_ir
from lorashear.ir.fingerprint import fingerprint_file
from lorashear.ir.parser import parse_module
from lorashear.ir.printer import print_module
from lorashear.ir.types import evaluate_dim
from lorashear.runtime.executor import emit_torch
from tests.conftest import random_batch

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
    ("min(2048,S)", 7), ("min(4, S)", 4), ("256-max(0,256-S)", 7), ("max(B, min(S, 5), 4)", 5),
])
def test_dimension_grammar_evaluates(text, value):
    assert evaluate_dim(text, {"S": 7, "B": 3}) == value


@pytest.mark.parametrize("text,offset,message", [
    ("S+0*9**9**9**9", 5, "'\\*\\*' is not dimension arithmetic"),
    ("S/2", 1, "use|with '//'"),
    ("S.x", 1, "unexpected character '.'"),
    ("abs(S)", 3, "unexpected '\\('"),
    ("min(S)", 5, "at least two sizes"),
    ("max(S, 2", 8, "expected ',' or '\\)'"),
    ("min(S,)", 6, "unexpected '\\)'"),
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
    for version in ("9" * 5000, "\u00b2"):  # int() refuses both; the header check must first
        with pytest.raises(IRParseError, match="malformed header"):
            parse_module(f"lorashear-ir {version}\ninput %x : f32[B]\noutput %x\n")
    with pytest.raises(IRParseError, match="lists nest deeper than 16"):  # not a RecursionError
        parse_module(module_text.format("[" * 100_000 + "]" * 100_000))
    with pytest.raises(IRParseError, match="bad source attribute payload"):
        parse_module("lorashear-ir 1\nattr source = source " + "[" * 100_000 + "]" * 100_000
                     + "\ninput %x : f32[B]\noutput %x\n")
    with pytest.raises(IRParseError, match="malformed size name"):
        parse_module("lorashear-ir 1\ninput %x : f32[B, S.x]\noutput %x\n")


def test_unbound_size_is_a_verification_error():
    module = parse_module('lorashear-ir 1\ninput %x : f32[B, 4]\n'
                          '%0 = mul(%x, 2) : f32["B+T", 4]\noutput %0\n')
    from lorashear.ir.verifier import verify

    with pytest.raises(VerificationError, match="unbound size"):
        verify(module)


# --- weight handles ---------------------------------------------------------------------------
@pytest.mark.parametrize("damage,expect", [
    ("missing-key", "the file holds no such tensor"),
    ("missing-file", "does not exist"),
    ("shape", "the file holds it with shape [64, 32], the IR declares [64, 64]"),
    ("dtype", "the file holds it as I64, the IR declares f32"),
    ("truncated", "lies outside the file (is the file cut short?)"),
    ("garbage", "is not a valid safetensors file"),
])
def test_bad_weight_handles_fail_on_load(workdir, capsys, damage, expect):
    ir = workdir / "m.ir"
    weights = workdir / "model" / "model.safetensors"
    if damage == "missing-key":
        ir.write_text(ir.read_text().replace(f'"{PROJECTION}")', f'"{PROJECTION}.gone")'))
    elif damage == "missing-file":
        weights.unlink()
    elif damage == "shape":
        _rewrite_checkpoint(workdir / "model", lambda s: s.update({PROJECTION: s[PROJECTION][:, :32].clone()}))
    elif damage == "dtype":
        _rewrite_checkpoint(workdir / "model", lambda s: s.update({PROJECTION: s[PROJECTION].long()}))
    elif damage == "truncated":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 1000)
    elif damage == "garbage":
        weights.write_bytes(b"\xff" * 64)
    line = next(i for i, x in enumerate(ir.read_text().splitlines(), 1) if x.startswith("param @"))
    if damage not in ("missing-file", "truncated", "garbage"):
        line = next(i for i, x in enumerate(ir.read_text().splitlines(), 1) if f"@{PROJECTION} " in x)
    for main, argv in ((opt_cli.main, ["--passes=dce", "-o", str(workdir / "o.ir")]),
                       (emit_cli.main, ["--format", "hf", "-o", str(workdir / "hf")])):
        _fails_fast(main, [str(ir), *argv], capsys, f"m.ir:{line}: @", expect)
    assert not (workdir / "o.ir").exists() and not (workdir / "hf").exists()


def test_checkpoint_cut_short_after_loading_is_a_clear_error(workdir):
    """Without a fingerprint (a `.ir` from before them) and with one: a tensor read after the
    file was shortened is a ModelLoadError naming the file, never safetensors' own error."""
    text = (workdir / "m.ir").read_text()
    legacy = workdir / "legacy.ir"
    legacy.write_text("\n".join(x for x in text.splitlines() if not x.startswith("weights ")) + "\n")
    shutil.copy(workdir / "m.ir.weights.safetensors", str(legacy) + ".weights.safetensors")
    weights = workdir / "model" / "model.safetensors"
    for path in (legacy, workdir / "m.ir"):
        module = load_ir(path)
        original = weights.read_bytes()
        with open(weights, "r+b") as f:
            f.truncate(len(original) - 1000)
        with pytest.raises(ModelLoadError, match="model.safetensors"):
            module.params[PROJECTION].storage.load()
        weights.write_bytes(original)


# --- fingerprints -----------------------------------------------------------------------------
def test_lowering_records_fingerprints_that_print_and_parse_back(workdir):
    text = (workdir / "m.ir").read_text()
    lines = text.splitlines()
    assert lines[0] == "lorashear-ir 2"
    weights = [x for x in lines if x.startswith("weights ")]
    assert weights == [
        f'weights "model/model.safetensors" fingerprint "{fingerprint_file(workdir / "model" / "model.safetensors")}"',
        f'weights "adapter/adapter_model.safetensors" fingerprint '
        f'"{fingerprint_file(workdir / "adapter" / "adapter_model.safetensors")}"',
    ]
    module = load_ir(workdir / "m.ir")
    assert print_module(parse_module(print_module(module))) == print_module(module)
    save_ir(module, workdir / "again.ir")
    assert (workdir / "again.ir").read_text() == text


def test_module_without_file_handles_keeps_version_one(tiny_models):
    module = lower_pretrained(tiny_models["llama"].model_dir, meta=True)
    assert print_module(module).startswith("lorashear-ir 1\n")


def test_fingerprint_follows_bytes_not_names(workdir):
    weights = workdir / "model" / "model.safetensors"
    before = fingerprint_file(weights)
    shutil.copy(weights, workdir / "copy.safetensors")
    assert fingerprint_file(workdir / "copy.safetensors") == before
    state = load_file(weights)
    for change in (lambda s: s[PROJECTION].neg_(),  # every element of one projection
                   lambda s: s[PROJECTION][-1, -1].add_(1.0),  # the last element only
                   lambda s: s.update(extra=torch.zeros(1))):  # one more tensor
        changed = {k: v.clone() for k, v in state.items()}
        change(changed)
        save_file(changed, str(workdir / "copy.safetensors"), metadata={"format": "pt"})
        assert fingerprint_file(workdir / "copy.safetensors") != before
    save_file(state, str(workdir / "copy.safetensors"), metadata={"format": "other"})
    assert fingerprint_file(workdir / "copy.safetensors") != before


def test_rewritten_checkpoint_is_refused_until_accepted(workdir, tiny_models, capsys):
    """The issue's case: the checkpoint re-saved after lowering with one projection negated."""
    ir = workdir / "m.ir"
    _rewrite_checkpoint(workdir / "model", lambda s: s[PROJECTION].neg_())
    weights_line = next(i for i, x in enumerate(ir.read_text().splitlines(), 1)
                        if x.startswith('weights "model/'))
    for main, argv in ((opt_cli.main, ["--passes=dce", "-o", str(workdir / "o.ir")]),
                       (emit_cli.main, ["--format", "hf", "-o", str(workdir / "hf")])):
        _fails_fast(main, [str(ir), *argv], capsys, f"m.ir:{weights_line}:", "model.safetensors changed",
                    "--accept-changed-weights")
    assert not (workdir / "o.ir").exists() and not (workdir / "hf").exists()
    with pytest.raises(ModelLoadError, match="fingerprint differs"):
        load_ir(ir)

    # accepted deliberately: the new weights are used and the output records them
    assert opt_cli.main([str(ir), "--accept-changed-weights", "--passes=dce", "-o", str(ir)]) == 0
    assert f'fingerprint "{fingerprint_file(workdir / "model" / "model.safetensors")}"' in ir.read_text()
    ids, mask = random_batch(128)
    with torch.no_grad():
        now = emit_torch(load_ir(ir))(ids, attention_mask=mask).logits
        before = tiny_models["llama"].peft(input_ids=ids, attention_mask=mask).logits
    assert (now - before).abs().max() > 1e-3


def test_checkpoint_rewritten_during_a_run_is_noticed_on_read(workdir):
    module = load_ir(workdir / "m.ir")
    module.params["model.norm.weight"].storage.load()
    _rewrite_checkpoint(workdir / "model", lambda s: s[PROJECTION].mul_(2))
    with pytest.raises(ModelLoadError, match="changed after the module was loaded"):
        module.params[PROJECTION].storage.load()


def test_weights_statements_are_checked_by_the_parser(workdir):
    text = (workdir / "m.ir").read_text()
    line = next(x for x in text.splitlines() if x.startswith('weights "model/'))
    with pytest.raises(IRParseError, match="malformed fingerprint"):
        parse_module(text.replace(line, line[:-3] + 'zz"'))
    with pytest.raises(IRParseError, match="declared twice"):
        parse_module(text.replace(line, line + "\n" + line))
    with pytest.raises(IRParseError, match=":4:1: no parameter reads the weights file"):
        parse_module(text.replace(line, line.replace("model/model", "model/other")))
    with pytest.raises(IRParseError, match="expected 'fingerprint'"):
        parse_module(text.replace(line, line.replace(" fingerprint ", " fingerprnt ")))


def test_emitted_directory_records_its_own_fingerprint(workdir):
    assert emit_cli.main([str(workdir / "m.ir"), "--format", "torch", "-o", str(workdir / "out")]) == 0
    text = (workdir / "out" / "lorashear.ir").read_text()
    assert f'weights "model.safetensors" fingerprint "{fingerprint_file(workdir / "out" / "model.safetensors")}"' in text
    moved = workdir / "moved"
    shutil.move(workdir / "out", moved)
    load_ir(moved / "lorashear.ir")


# --- sidecars ---------------------------------------------------------------------------------
@pytest.mark.parametrize("damage,expect", [
    ("truncated", "sidecar"), ("dtype", "as torch.float64, the IR declares f32"),
    ("shape", "with shape [4]"), ("missing", "lacks tensor"),
])
def test_bad_sidecar_fails_on_load(workdir, capsys, damage, expect):
    side = workdir / "m.ir.weights.safetensors"
    state = load_file(side)
    name = next(iter(state))
    if damage == "truncated":
        side.write_bytes(side.read_bytes()[:-7])
    else:
        if damage == "dtype":
            state[name] = state[name].double()
        elif damage == "shape":
            state[name] = state[name][:4].clone()
        else:
            state = {f"{name}.other": state[name]}
        save_file(state, str(side))
    _fails_fast(opt_cli.main, [str(workdir / "m.ir"), "--passes=dce", "-o", str(workdir / "o.ir")],
                capsys, "m.ir", expect)
    assert not (workdir / "o.ir").exists()


# --- non-finite weights -----------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weight_is_refused_naming_the_tensor(workdir, capsys, value):
    def poison(state):
        state["model.layers.1.mlp.up_proj.weight"].view(-1)[[5, 77]] = value

    _rewrite_checkpoint(workdir / "model", poison)
    out = workdir / "nan.ir"
    _fails_fast(lower_cli.main, [str(workdir / "model"), "-o", str(out)], capsys,
                "'model.layers.1.mlp.up_proj.weight'", "holds 2 non-finite values", "--allow-nonfinite")
    assert not out.exists()
    with pytest.raises(ModelLoadError, match="up_proj.weight' of .*model.safetensors holds 2"):
        lower_pretrained(workdir / "model")
    assert lower_cli.main([str(workdir / "model"), "--allow-nonfinite", "-o", str(out)]) == 0
    assert lower_cli.main([str(workdir / "model"), "--meta", "-o", str(workdir / "meta.ir")]) == 0


def test_weight_that_overflows_the_lowered_dtype_is_refused(workdir):
    def large(state):
        state["model.norm.weight"][3] = 1e6  # finite in fp32, Inf once lowered as f16

    _rewrite_checkpoint(workdir / "model", large)
    lower_pretrained(workdir / "model")
    with pytest.raises(ModelLoadError, match="'model.norm.weight' .* holds 1 non-finite value .* as f16"):
        lower_pretrained(workdir / "model", dtype=torch.float16)


def test_nonfinite_in_memory_model_is_refused():
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa").eval()
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    with pytest.raises(ModelLoadError, match="parameter @model.norm.weight holds 1 non-finite value "):
        lower(model)
    assert lower(model, allow_nonfinite=True).params["model.norm.weight"].storage.load().isnan().sum() == 1


def test_recently_modified_files_are_fingerprinted_afresh(tmp_path, monkeypatch):
    """A rewrite that keeps a file's size and stat times (a coarse file-system clock) is still
    noticed while the file is recent; an old file's fingerprint is remembered by its stat."""
    from types import SimpleNamespace

    from lorashear.ir import fingerprint

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(64)}, str(path))
    zeros = path.read_bytes()
    save_file({"w": torch.ones(64)}, str(path))
    ones = path.read_bytes()
    assert len(zeros) == len(ones)
    now = time.time_ns()
    seen = SimpleNamespace(st_dev=1, st_ino=2, st_size=len(ones), st_mtime_ns=now, st_ctime_ns=now)
    real_stat = fingerprint.os.stat
    monkeypatch.setattr(fingerprint.os, "stat", lambda p, *args, **kwargs: seen if str(p) == str(path)
                        else real_stat(p, *args, **kwargs))
    before = fingerprint.current_fingerprint(path)
    path.write_bytes(zeros)
    assert fingerprint.current_fingerprint(path) != before
    seen.st_ino, seen.st_mtime_ns, seen.st_ctime_ns = 3, now - 10**10, now - 10**10
    remembered = fingerprint.current_fingerprint(path)
    path.write_bytes(ones)
    assert fingerprint.current_fingerprint(path) == remembered
