"""The `.ir` reader under fuzzing, end to end: mutants of a real lowered module, its sidecar and
its source checkpoint go through load (parse, sidecar and weight-handle checks, fingerprints,
verify), ``emit_torch`` and one forward pass. Each either runs or fails with a LorashearError,
within a time bound; nothing else (an internal error, a hang) is allowed.

``pytest --fuzz-examples=N`` runs N mutants instead of the quick default (``make test``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lorashear.errors import EmissionError, ExecutionError, LorashearError
from lorashear.frontend.pretrained import lower_pretrained
from lorashear.ir.fileformat import load_ir, save_ir, sidecar_path
from lorashear.runtime.executor import emit_torch

#: Mutants per run by default: enough to cross every mutation kind, a few seconds in all.
QUICK_EXAMPLES = 60
#: No mutant may take longer than this to load, emit and run (a valid one takes well under 1 s).
TIME_BOUND_S = 20

EXTREMES = ["0", "-1", "1", "3", "63", "65", "9223372036854775807", "-9223372036854775808",
            "18446744073709551616", "1" + "0" * 40, "9" * 5000, "1e308", "-1e308", "4.9e-324",
            "nan", "inf", "-inf", "0.0", "1e999", "S", "B", '"S+1"', '"S*S*S*S*S*S*S"',
            '"(((((S)))))"', '"9**9**9"']
ODD_TOKENS = ["%0", "%99999", "@model.norm.weight", "@nope", "@model", "@model..norm.weight",
              "@forward", "@model.norm.weight.x", "none", "true", "meta", "data",
              'file("model/model.safetensors", "model.norm.weight")', "f64", "bool", "sym",
              "i64[B, S]", "f32[]", "[", "]", "(", ")", ",", ":", "=", "loc", "attr", "param",
              "weights", "input", "output", '""', "\\", "\x00", "é", "\t"]
#: Numbers that are literals (op arguments, sizes, attribute values), not parts of names.
_NUMBER = re.compile(r"(?<![%@\w.])-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?(?![\w.])")
_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|[%@]?[A-Za-z0-9_.\-/:]+|[()\[\],:={}]')


class MutantTimeout(Exception):
    """A mutant ran past the time bound (raised by SIGALRM)."""


@pytest.fixture(scope="module")
def seeds(tiny_models, tmp_path_factory):
    """A tiny Llama lowered with fresh LoRA (base weights by handle, LoRA factors and buffers in
    the sidecar), next to its checkpoint; and a sidecar of another model to swap in."""
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(tiny_models["llama"].model_dir, root / "model")
    save_ir(lower_pretrained(root / "model", lora_rank=2), root / "seed.ir")
    other = tmp_path_factory.mktemp("fuzz-other")
    shutil.copytree(tiny_models["qwen2"].model_dir, other / "model")
    save_ir(lower_pretrained(other / "model", lora_rank=2), other / "other.ir")
    reseeded = lower_pretrained(root / "model", lora_rank=2, seed=1)
    save_ir(reseeded, other / "reseeded.ir")
    checkpoint = root / "model" / "model.safetensors"
    return {
        "root": root,
        "text": (root / "seed.ir").read_text(),
        "sidecar": sidecar_path(root / "seed.ir").read_bytes(),
        "checkpoint": checkpoint,
        "checkpoint_bytes": checkpoint.read_bytes(),
        "foreign_sidecars": [sidecar_path(other / "other.ir").read_bytes(),
                             sidecar_path(other / "reseeded.ir").read_bytes()],
    }


def _mutate_text(data, text: str) -> str:
    lines = text.split("\n")
    kind = data.draw(st.sampled_from(["delete", "duplicate", "swap", "number", "token", "cut", "flip"]))
    if kind == "flip":
        blob = _mutate_bytes(data, text.encode("utf-8", "surrogateescape"), kind="flip")
        return blob.decode("utf-8", "surrogateescape")
    i = data.draw(st.integers(0, len(lines) - 1))
    if kind == "delete":
        del lines[i]
    elif kind == "duplicate":
        lines.insert(data.draw(st.integers(0, len(lines))), lines[i])
    elif kind == "swap":
        j = data.draw(st.integers(0, len(lines) - 1))
        lines[i], lines[j] = lines[j], lines[i]
    elif kind in ("number", "token"):
        pattern = _NUMBER if kind == "number" else _TOKEN
        spans = [m.span() for m in pattern.finditer(text)]
        if not spans:
            return text
        start, end = spans[data.draw(st.integers(0, len(spans) - 1))]
        if kind == "number":
            new = data.draw(st.sampled_from(EXTREMES))
        else:
            pool = sorted({m.group() for m in _TOKEN.finditer(lines[i])}) + ODD_TOKENS
            new = data.draw(st.sampled_from(pool))
        return text[:start] + new + text[end:]
    else:
        return text[:data.draw(st.integers(0, len(text)))]
    return "\n".join(lines)


def _mutate_bytes(data, blob: bytes, kind: str | None = None) -> bytes:
    if not blob:
        return blob
    kind = kind or data.draw(st.sampled_from(["flip", "cut", "flip-header"]))
    if kind == "cut":
        return blob[:data.draw(st.integers(0, len(blob) - 1))]
    header_end = 8 + int.from_bytes(blob[:8].ljust(8, b"\0"), "little")
    last = min(header_end, len(blob)) if kind == "flip-header" else len(blob)
    at = data.draw(st.integers(0, last - 1))
    bit = data.draw(st.integers(0, 7))
    return blob[:at] + bytes([blob[at] ^ (1 << bit)]) + blob[at + 1:]


def _replace(path: Path, blob: bytes) -> None:
    """Write ``blob`` as a new file at ``path`` (a new inode: no reader's map sees it change)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def _load_emit_run(path: Path) -> None:
    module = load_ir(path)
    model = emit_torch(module)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, attention_mask=torch.ones_like(ids))


def _on_alarm(signum, frame):
    raise MutantTimeout(f"a mutant took longer than {TIME_BOUND_S} s")


def test_mutants_run_or_fail_cleanly(seeds, request):
    examples = request.config.getoption("--fuzz-examples") or QUICK_EXAMPLES
    root = seeds["root"]
    counter = iter(range(10**9))
    previous = signal.signal(signal.SIGALRM, _on_alarm)

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def mutant(data):
        n = next(counter)
        ir = root / f"mutant{n}.ir"  # a fresh name each time: no cached handle sees old bytes
        text, sidecar, checkpoint = seeds["text"], seeds["sidecar"], seeds["checkpoint_bytes"]
        for _ in range(data.draw(st.integers(1, 3))):
            target = data.draw(st.sampled_from(["ir", "ir", "ir", "sidecar", "checkpoint", "foreign"]))
            if target == "ir":
                text = _mutate_text(data, text)
            elif target == "sidecar":
                sidecar = _mutate_bytes(data, sidecar)
            elif target == "checkpoint":
                checkpoint = _mutate_bytes(data, checkpoint)
            else:
                sidecar = data.draw(st.sampled_from(seeds["foreign_sidecars"]))
        ir.write_bytes(text.encode("utf-8", "surrogateescape"))
        sidecar_path(ir).write_bytes(sidecar)
        if checkpoint is not seeds["checkpoint_bytes"]:
            _replace(seeds["checkpoint"], checkpoint)
        start = time.perf_counter()
        signal.alarm(TIME_BOUND_S)
        try:
            _load_emit_run(ir)
            event("loaded and ran")
        except LorashearError as exc:
            event(f"refused: {type(exc).__name__}")
        finally:
            signal.alarm(0)
            ir.unlink()
            sidecar_path(ir).unlink()
            if checkpoint is not seeds["checkpoint_bytes"]:
                _replace(seeds["checkpoint"], seeds["checkpoint_bytes"])
        assert time.perf_counter() - start < TIME_BOUND_S

    try:
        mutant()
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_seed_runs_unmutated(seeds):
    """The fuzz starts from a module that loads and runs: a mutant's failure is the mutation's."""
    path = seeds["root"] / "unmutated.ir"
    path.write_text(seeds["text"])
    sidecar_path(path).write_bytes(seeds["sidecar"])
    _load_emit_run(path)


@pytest.mark.parametrize("name", ["model..norm.weight", "model.norm.weight.x", "model", "forward",
                                  "model.norm.weight."])
def test_parameter_names_torch_cannot_hold_are_errors(seeds, name):
    """A declared parameter whose name torch cannot register (an empty part, nested under
    another parameter, an nn.Module attribute) was a KeyError from emit_torch; the fuzz's token
    pool now holds such names."""
    line = next(x for x in seeds["text"].splitlines() if x.startswith("param @model.norm.weight "))
    path = seeds["root"] / "named.ir"
    path.write_text(seeds["text"].replace(line, line + "\n" + line.replace("@model.norm.weight", "@" + name)))
    sidecar_path(path).write_bytes(seeds["sidecar"])
    with pytest.raises(EmissionError, match=f"parameter @{re.escape(name)} cannot be a module attribute"):
        _load_emit_run(path)


def test_index_out_of_range_at_run_time_is_an_execution_error(seeds):
    """Found by the fuzz (one flipped bit, 0 -> 1 in the mask's key positions): positions
    shifted by one pass every shape check and index one past the sequence only when real data
    runs; that was an IndexError from emit_torch's forward, now an error naming the op."""
    text = seeds["text"]
    shifted = re.sub(r"^(%\d+) = add\((%\d+), 0\) : i64\[S\]", r"\1 = add(\2, 1) : i64[S]", text,
                     flags=re.M)
    assert shifted != text
    path = seeds["root"] / "shifted.ir"
    path.write_text(shifted)
    sidecar_path(path).write_bytes(seeds["sidecar"])
    with pytest.raises(ExecutionError, match=r"op \S+ defining %\d+ \(module .*\) failed: index 7 is out of bounds"):
        _load_emit_run(path)
