"""`lorashear generate` end to end on a tiny emitted model with a word-level tokenizer: the
streamed text is the model's own greedy continuation, in the PyTorch executor and in ONNX
Runtime alike; chat templates, sampling and beams; every bad input is one clear line."""

from __future__ import annotations

import shutil

import pytest

from lorashear.cli import emit as emit_cli
from lorashear.cli.main import build_parser, main
from lorashear.frontend.pretrained import lower_pretrained
from lorashear.ir.fileformat import save_ir
from lorashear.runtime.hf import load_pretrained, save_model_dir
from tests.conftest import save_word_tokenizer

WORDS = ("the cat sat on a mat while one dog ran to it and we all saw how fast it went home "
         "then she said hello to him before they left the old house by the sea").split() + [
             f"w{i}" for i in range(100)]  # every id of the tiny model's 128 decodes to a word
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")
PROMPT = "the cat sat on a mat"


@pytest.fixture(scope="module")
def model_dirs(tiny_models, tmp_path_factory):
    """(hf directory, directory with model.onnx), both with the tokenizer, from one module."""
    root = tmp_path_factory.mktemp("generate")
    source = root / "source"
    shutil.copytree(tiny_models["llama"].model_dir, source)
    save_word_tokenizer(source, [" ".join(WORDS)] * 3, vocab_size=128)
    (source / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    module = lower_pretrained(source, adapter=tiny_models["llama"].adapter_dir)
    save_model_dir(module, root / "hf", merge=True)
    save_ir(module, root / "m.ir")
    (root / "onnx").mkdir()
    assert emit_cli.main([str(root / "m.ir"), "--format", "onnx", "-o", str(root / "onnx")]) == 0
    return root / "hf", root / "onnx"


def _expected(folder, prompt: str, chat: bool = False, **options) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = load_pretrained(folder).generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                           eos_token_id=2, **options)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _generate(capsys, *argv: str) -> str:
    assert main(["generate", *argv, "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert "new tokens in" in captured.err
    return captured.out.strip()


def test_streams_the_greedy_continuation_in_both_runtimes(model_dirs, capsys):
    hf, onnx_dir = model_dirs
    want = _expected(hf, PROMPT)
    assert want.strip()
    assert _generate(capsys, str(hf), "--prompt", PROMPT) == want.strip()
    assert _generate(capsys, str(onnx_dir), "--prompt", PROMPT, "--runtime", "onnx") == want.strip()
    # a .onnx path picks the onnx runtime by itself; the tokenizer is found beside it
    assert _generate(capsys, str(onnx_dir / "model.onnx"), "--prompt", PROMPT) == want.strip()


def test_emitted_onnx_directory_is_a_decoder_with_config_and_tokenizer(model_dirs):
    import onnx

    _, onnx_dir = model_dirs
    names = [v.name for v in onnx.load(str(onnx_dir / "model.onnx")).graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "past_key_values.0.key"]
    assert (onnx_dir / "config.json").is_file() and (onnx_dir / "tokenizer.json").is_file()


def test_chat_template_and_beams(model_dirs, capsys):
    hf, onnx_dir = model_dirs
    want = _expected(hf, "hello", chat=True)
    assert _generate(capsys, str(hf), "--prompt", "hello", "--chat") == want.strip()
    beams = _expected(hf, PROMPT, num_beams=3)
    assert _generate(capsys, str(onnx_dir), "--prompt", PROMPT, "--runtime", "onnx",
                     "--num-beams", "3") == beams.strip()


def test_sampling_repeats_with_a_seed(model_dirs, capsys):
    hf, _ = model_dirs
    options = ["--prompt", PROMPT, "--do-sample", "--temperature", "1.5", "--top-k", "50"]
    runs = {_generate(capsys, str(hf), *options, "--seed", str(seed)) for seed in (1, 1, 2)}
    assert len(runs) == 2  # the same seed gives the same text, another seed another


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "0.7"], "only apply with --do-sample"),
    (["--do-sample", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--num-beams", "0"], "--num-beams must be at least 1"),
    (["--runtime", "onnx", "--dtype", "bfloat16"], "--dtype applies to --runtime torch"),
    (["--device", "tpu:7"], "is not a torch device"),
])
def test_bad_options_are_one_clear_line(model_dirs, capsys, argv, message):
    hf, onnx_dir = model_dirs
    folder = onnx_dir if "onnx" in argv else hf
    assert main(["generate", str(folder), "--prompt", PROMPT, *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_missing_model_or_tokenizer_is_one_clear_line(model_dirs, tmp_path, capsys):
    hf, onnx_dir = model_dirs
    cases = [([str(tmp_path / "nowhere"), "--prompt", "x"], "does not exist"),
             ([str(tmp_path), "--prompt", "x", "--runtime", "onnx"], "no ONNX model"),
             ([str(onnx_dir / "model.onnx"), "--prompt", "x", "--runtime", "torch"], "--runtime onnx")]
    bare = tmp_path / "bare"
    shutil.copytree(hf, bare, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    cases.append(([str(bare), "--prompt", "x"], "no usable tokenizer"))
    plain = tmp_path / "plain"
    shutil.copytree(hf, plain, ignore=shutil.ignore_patterns("chat_template*"))
    cases.append(([str(plain), "--prompt", "x", "--chat"], "no chat template"))
    for argv, message in cases:
        assert main(["generate", *argv]) == 1, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_help_on_every_option():
    parser = build_parser()
    generate = next(a for a in parser._subparsers._group_actions[0].choices.items()
                    if a[0] == "generate")[1]
    assert all(action.help for action in generate._actions), \
        [action.dest for action in generate._actions if not action.help]
    assert "--prompt" in generate.format_help()


def test_no_kv_cache_is_for_onnx_only(model_dirs, tmp_path, capsys):
    hf, _ = model_dirs
    ir = hf / "lorashear.ir"
    assert emit_cli.main([str(ir), "--format", "hf", "-o", str(tmp_path / "x"), "--no-kv-cache"]) == 1
    assert "--no-kv-cache applies to --format onnx only" in capsys.readouterr().err
    assert emit_cli.main([str(ir), "--format", "onnx", "-o", str(tmp_path / "p.onnx"),
                          "--no-kv-cache"]) == 0
    import onnx

    assert [v.name for v in onnx.load(str(tmp_path / "p.onnx")).graph.input] == \
        ["input_ids", "attention_mask"]


def test_a_graph_without_attention_needs_no_kv_cache(tmp_path, capsys):
    from lorashear.ir.core import DTypeArg, Graph, Module, Op, Value
    from lorashear.ir.types import TensorType

    ids = Value("input_ids", TensorType("i64", ("B", "S")))
    out = Value("y", TensorType("f32", ("B", "S")))
    save_ir(Module(Graph([ids], [Op("cast", [ids, DTypeArg("f32")], {}, [out])], [out], ["logits"])),
            tmp_path / "m.ir")
    assert emit_cli.main([str(tmp_path / "m.ir"), "--format", "onnx", "-o", str(tmp_path / "a.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no attention op" in err and "--no-kv-cache" in err, err
    assert emit_cli.main([str(tmp_path / "m.ir"), "--format", "onnx", "-o", str(tmp_path / "a.onnx"),
                          "--no-kv-cache"]) == 0
