"""`lorashear eval` end to end on a tiny saved model."""

from __future__ import annotations

import json

import pytest

from lorashear.cli.main import main


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_llama, tokenizer, story):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = folder / "heldout.txt"
    text.write_text(story)
    return folder, text


def test_eval_prints_a_table_and_writes_json(saved_model, tmp_path, capsys):
    folder, text = saved_model
    out = tmp_path / "results.json"
    code = main(["eval", str(folder), "--tasks", "ppl,local-hellaswag", "--text", str(text),
                 "--ppl-lengths", "16,32", "--max-windows", "3", "--items", "8",
                 "--no-progress", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ppl@16" in printed and "ppl@32" in printed and "local-hellaswag" in printed
    report = json.loads(out.read_text())
    metrics = {(row["task"], row["metric"]): row for row in report["results"]}
    assert set(metrics) == {("ppl@16", "ppl"), ("ppl@32", "ppl"), ("local-hellaswag", "acc"),
                            ("local-hellaswag", "acc_norm")}
    assert metrics["ppl@32", "ppl"]["details"]["windows"] == 3
    assert metrics["local-hellaswag", "acc"]["details"]["items"] == 8


def test_missing_text_is_one_clear_line(saved_model, capsys):
    folder, _ = saved_model
    assert main(["eval", str(folder), "--tasks", "ppl"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("lorashear: error:") and "--text" in error
    assert len(error.splitlines()) == 1


def test_a_folder_without_a_model_is_one_clear_line(saved_model, tmp_path, capsys):
    _, text = saved_model
    assert main(["eval", str(tmp_path), "--tasks", "ppl", "--text", str(text)]) == 1
    assert "not a model folder" in capsys.readouterr().err


def test_eval_device_cpu_gives_the_default_numbers(saved_model, tmp_path):
    folder, text = saved_model
    reports = []
    for extra in ([], ["--device", "cpu", "--precision", "fp32"]):
        out = tmp_path / f"results{len(reports)}.json"
        assert main(["eval", str(folder), "--tasks", "ppl", "--text", str(text), "--ppl-lengths", "16",
                     "--max-windows", "3", "--no-progress", "--json", str(out), *extra]) == 0
        reports.append([row["value"] for row in json.loads(out.read_text())["results"]])
    assert reports[0] == reports[1]


@pytest.mark.parametrize("extra", [["--device", "cpu", "--precision", "bf16"], ["--device", "tpu"]])
def test_eval_refuses_bf16_on_the_cpu_and_unknown_devices(saved_model, extra, capsys):
    folder, text = saved_model
    assert main(["eval", str(folder), "--tasks", "ppl", "--text", str(text), *extra]) == 1
    error = capsys.readouterr().err
    assert "eval: " in error and ("precision=bf16 needs a CUDA device" in error or "device='tpu'" in error)


def test_eval_loads_a_pruned_model_with_per_layer_widths(saved_model, tmp_path):
    """A non-uniform output (a remote-code config, which stock loading refuses) is evaluated
    through its lorashear.ir, without running its remote code."""
    from lorashear.frontend.pretrained import lower_pretrained
    from lorashear.passes import PassManager
    from lorashear.runtime.hf import save_model_dir

    folder, text = saved_model
    module = lower_pretrained(folder)
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    mlp = [f for f in groups.families if f.kind == "mlp"]
    from lorashear.analysis.groups import PruneMaskAttr

    module.attributes["prune-mask"] = PruneMaskAttr.from_dict(
        {f.id: tuple(range(f.layer + 1)) for f in mlp})  # a different width in every layer
    PassManager.parse("compress").run(module)
    out_dir = save_model_dir(module, tmp_path / "pruned", merge=True)
    assert json.loads((out_dir / "config.json").read_text())["model_type"].startswith("lorashear")
    results = {}
    for name, model_dir in (("pruned", out_dir), ("dense", folder)):
        out = tmp_path / f"{name}.json"
        code = main(["eval", str(model_dir), "--tasks", "ppl", "--text", str(text),
                     "--ppl-lengths", "32", "--max-windows", "2", "--no-progress", "--json", str(out)])
        assert code == 0
        results[name] = json.loads(out.read_text())["results"][0]["value"]
    assert results["pruned"] != results["dense"]  # the pruned model, not the source, was scored
