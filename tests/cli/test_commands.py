"""The three commands end to end, and every bad input: one line on stderr, non-zero exit,
no output file left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorashear.cli import emit as emit_cli
from lorashear.cli import lower as lower_cli
from lorashear.cli import opt as opt_cli
from lorashear.runtime.hf import load_pretrained
from tests.conftest import build_tiny, random_batch, save_word_tokenizer


def _fails(main, argv, capsys, *must_contain: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for text in must_contain:
        assert text in err, err
    return err


@pytest.fixture(scope="module")
def llama_ir(tiny_models, tmp_path_factory):
    tm = tiny_models["llama"]
    out = tmp_path_factory.mktemp("cli") / "m.ir"
    assert lower_cli.main([str(tm.model_dir), "--adapter", str(tm.adapter_dir), "-o", str(out)]) == 0
    return out


def test_lower_trace_all_layers_writes_the_same_ir(tiny_models, llama_ir, tmp_path):
    """--trace-all-layers (the reference path) and the default stamped lowering agree."""
    tm = tiny_models["llama"]
    out = tmp_path / "all-layers.ir"
    assert lower_cli.main([str(tm.model_dir), "--adapter", str(tm.adapter_dir), "-o", str(out),
                           "--trace-all-layers"]) == 0
    assert out.read_text() == llama_ir.read_text()


def test_lower_opt_emit_pipeline(tiny_models, llama_ir, tmp_path, capsys):
    tm = tiny_models["llama"]
    out = tmp_path / "merged.ir"
    assert opt_cli.main([str(llama_ir), "--passes=merge-lora,dce", "-o", str(out), "--time-passes",
                         "--print-ir-after-all"]) == 0
    err = capsys.readouterr().err
    assert "IR after merge-lora" in err and "pass execution timing report" in err
    assert "lora_linear" not in out.read_text()
    assert emit_cli.main([str(out), "--format", "hf", "-o", str(tmp_path / "hf")]) == 0
    ids, mask = random_batch(tm.base.config.vocab_size)
    with torch.no_grad():
        got = load_pretrained(tmp_path / "hf")(ids, attention_mask=mask).logits
        want = tm.peft(input_ids=ids, attention_mask=mask).logits
    assert (got - want).abs()[mask.bool()].max() <= 1e-4


def test_readme_pruning_command_runs_as_written(tmp_path, capsys):
    """The README's quick-start pruning pipeline, taken from the README itself, with its
    defaults, on a tiny Llama whose directory holds a tokenizer: it ends in a compressed
    model about 20% smaller in its attention + MLP weights, whose logits the executor runs."""
    import re

    from lorashear.ir.fileformat import load_ir
    from lorashear.runtime.executor import emit_torch

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("lorashear-opt ") and "lhspg" in x)
    passes = re.search(r"--passes='([^']+)'", line).group(1)
    words = ("the ship sailed north while the captain read a letter from her sister in bath "
             "and every officer of the navy spoke of the war and the sea").split()
    generator = torch.Generator().manual_seed(0)
    book = tmp_path / "book.txt"
    book.write_text(" ".join(words[i] for i in torch.randint(len(words), (30_000,), generator=generator)))
    tm = build_tiny("llama", tmp_path, seed=7)
    save_word_tokenizer(tm.model_dir, [" ".join(words)], vocab_size=128)
    model_ir, small = tmp_path / "model.ir", tmp_path / "small.ir"
    assert lower_cli.main([str(tm.model_dir), "--adapter", str(tm.adapter_dir), "-o", str(model_ir)]) == 0
    assert opt_cli.main([str(model_ir), "-o", str(small), "--passes",
                         passes.replace("book.txt", str(book)).replace("model.ir", str(model_ir))]) == 0, \
        capsys.readouterr().err
    pruned = load_ir(small)
    assert set(pruned.attributes) >= {"knowledge", "lhspg-log", "recover-log"}

    def numel(module, part):
        return sum(p.type.numel() for n, p in module.params.items() if part in n and "lora_" not in n)
    before = load_ir(model_ir)
    kept = sum(numel(pruned, p) for p in ("self_attn", "mlp")) / sum(numel(before, p) for p in ("self_attn", "mlp"))
    assert 0.75 <= kept <= 0.85, kept
    with torch.no_grad():
        logits = emit_torch(pruned)(torch.randint(128, (1, 16), generator=generator)).logits
    assert logits.shape == (1, 16, 128) and torch.isfinite(logits).all()


def test_entry_points_run_as_processes(llama_ir):
    for cmd in (["lorashear-opt", "--list-passes"], ["lorashear-lower", "--help"],
                ["lorashear-emit", "--help"], ["lorashear", "--help"]):
        exe = shutil.which(cmd[0])
        assert exe, f"{cmd[0]} is not installed (pip install -e .)"
        done = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    done = subprocess.run([shutil.which("lorashear-opt"), str(llama_ir), "--passes=nope"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "unknown pass" in done.stderr


def test_list_passes_shows_options_and_docs(capsys):
    assert opt_cli.main(["--list-passes"]) == 0
    out = capsys.readouterr().out
    assert "merge-lora:" in out and "dce:" in out


# --- bad input ---------------------------------------------------------------------------------
def test_not_a_model_dir(tmp_path, capsys):
    out = tmp_path / "x.ir"
    _fails(lower_cli.main, [str(tmp_path), "-o", str(out)], capsys, "not a Hugging Face model directory")
    _fails(lower_cli.main, [str(tmp_path / "missing"), "-o", str(out)], capsys, "does not exist")
    assert not out.exists()


def test_model_dir_without_weights(tiny_models, tmp_path, capsys):
    src = tiny_models["llama"].model_dir
    shutil.copy(src / "config.json", tmp_path / "config.json")
    _fails(lower_cli.main, [str(tmp_path), "-o", str(tmp_path / "x.ir")], capsys, "no safetensors")
    # but the architecture alone lowers with --meta
    assert lower_cli.main([str(tmp_path), "--meta", "-o", str(tmp_path / "meta.ir")]) == 0


def test_adapter_for_another_base_model(tiny_models, tmp_path, capsys):
    out = tmp_path / "x.ir"
    _fails(lower_cli.main, [str(tiny_models["qwen2"].model_dir), "--adapter",
                            str(tiny_models["llama"].adapter_dir), "-o", str(out)],
           capsys, "was made for another base model", "lora_A")
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "newer", "empty", "bad-type", "undefined"])
def test_corrupted_ir_file(llama_ir, tmp_path, capsys, damage):
    text = llama_ir.read_text()
    bad = tmp_path / "bad.ir"
    shutil.copy(str(llama_ir) + ".weights.safetensors", str(bad) + ".weights.safetensors")
    if damage == "truncate":
        bad.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x00\xff" * 50)
    elif damage == "newer":
        bad.write_text("lorashear-ir 99\n" + text.split("\n", 1)[1])
    elif damage == "empty":
        bad.write_text("")
    elif damage == "bad-type":
        bad.write_text(text.replace(": f32[B, S, 64]", ": f32[B, S, 65]", 1))
    elif damage == "undefined":
        bad.write_text(text.replace("(%2,", "(%99999,", 1))
    out = tmp_path / "out.ir"
    err = _fails(opt_cli.main, [str(bad), "--passes=dce", "-o", str(out)], capsys, "bad.ir")
    if damage == "newer":
        assert "version 99" in err
    assert not out.exists()


def test_missing_sidecar(llama_ir, tmp_path, capsys):
    bad = tmp_path / "m.ir"
    shutil.copy(llama_ir, bad)
    _fails(opt_cli.main, [str(bad), "--passes=dce", "-o", str(tmp_path / "o.ir")], capsys, "sidecar")


@pytest.mark.parametrize("pipeline,expect", [
    ("merge-lorra", "did you mean 'merge-lora'"),
    ("dce{ratio=0.2}", "has no option 'ratio'"),
    ("dce,", "expected a pass name"),
    ("merge-lora{", "unclosed"),
    ("", "no pipeline"),
])
def test_bad_pipelines(llama_ir, tmp_path, capsys, pipeline, expect):
    out = tmp_path / "o.ir"
    _fails(opt_cli.main, [str(llama_ir), f"--passes={pipeline}", "-o", str(out)], capsys, expect)
    assert not out.exists()


def test_ill_typed_option(llama_ir, tmp_path, capsys):
    plugin = tmp_path / "plug.py"
    plugin.write_text(PLUGIN)
    _fails(opt_cli.main, [str(llama_ir), "--load-pass-plugin", str(plugin),
                          "--passes=scale-logits{factor=abc}"], capsys, "expected a number", "factor")


PLUGIN = '''
from dataclasses import dataclass
from typing import ClassVar
from lorashear import ModulePass, PassResult, option
from lorashear.ir.core import Op, Value


@dataclass(frozen=True)
class ScaleLogits(ModulePass):
    """Multiply the logits by a constant (a user's own pass, from a plugin file)."""
    name: ClassVar[str] = "scale-logits"
    factor: float = option(2.0, "the constant")

    def run(self, module, analyses):
        out = module.graph.outputs[0]
        scaled = Value(out.name + "_scaled", out.type)
        module.graph.ops.append(Op("mul", [out, self.factor], {}, [scaled], ""))
        module.graph.outputs[0] = scaled
        return PassResult(True)
'''


def test_plugin_pass_runs(llama_ir, tiny_models, tmp_path, capsys):
    plugin = tmp_path / "plug.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "scaled.ir"
    assert opt_cli.main([str(llama_ir), "--load-pass-plugin", str(plugin),
                         "--passes=scale-logits{factor=3}", "-o", str(out)]) == 0
    from lorashear.ir.fileformat import load_ir
    from lorashear.runtime.executor import emit_torch

    ids, _ = random_batch(tiny_models["llama"].base.config.vocab_size)
    with torch.no_grad():
        a = emit_torch(load_ir(llama_ir))(ids).logits
        b = emit_torch(load_ir(out))(ids).logits
    assert torch.allclose(3 * a, b, atol=1e-5)


def test_plugin_errors(llama_ir, tmp_path, capsys):
    _fails(opt_cli.main, [str(llama_ir), "--load-pass-plugin", str(tmp_path / "nope.py"),
                          "--passes=dce"], capsys, "does not exist")
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    _fails(opt_cli.main, [str(llama_ir), "--load-pass-plugin", str(empty), "--passes=dce"],
           capsys, "defines no pass")
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    _fails(opt_cli.main, [str(llama_ir), "--load-pass-plugin", str(broken), "--passes=dce"],
           capsys, "fails to import")


def test_emit_meta_module_fails_cleanly(tiny_models, tmp_path, capsys):
    ir = tmp_path / "meta.ir"
    assert lower_cli.main([str(tiny_models["llama"].model_dir), "--meta", "-o", str(ir)]) == 0
    capsys.readouterr()
    assert "file(" not in ir.read_text() and "= meta" in ir.read_text()
    _fails(emit_cli.main, [str(ir), "--format", "hf", "-o", str(tmp_path / "hf")], capsys, "--meta")
    assert not (tmp_path / "hf").exists()


def test_hf_output_config_and_tokenizer_free(tiny_models, llama_ir, tmp_path):
    assert emit_cli.main([str(llama_ir), "--format", "hf", "-o", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["hidden_size"] == 64 and config["num_key_value_heads"] == 2
    assert not list(Path(tmp_path / "hf").glob("*.bin")) and not list(Path(tmp_path / "hf").glob("*.pt"))


def test_help_on_every_command():
    for mod in (lower_cli, opt_cli, emit_cli):
        text = mod.build_parser().format_help()
        assert "usage:" in text and "--debug" in text
    assert sys.executable
