"""`lorashear-emit` formats in one place: torch and hf directories, and an ONNX model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lorashear.errors import EmissionError
from lorashear.ir.attributes import HFConfigAttr, SourceAttr
from lorashear.ir.core import Module
from lorashear.runtime.hf import TOKENIZER_FILES, save_model_dir

FORMATS = ("torch", "hf", "onnx")


def emit(module: Module, fmt: str, out: str | os.PathLike, *, kv_cache: bool = True) -> Path:
    """Write ``module`` in format ``fmt`` to ``out``.

    ``onnx`` writes the decoder with past key values by default (``kv_cache``: what ONNX
    Runtime decodes with, see :func:`~lorashear.runtime.onnx_emit.emit_onnx`); ``kv_cache=False``
    writes the scoring-only graph (``input_ids``, ``attention_mask`` -> ``logits``). Into a
    directory, the decoder comes with the model's ``config.json`` and its source's tokenizer
    files, so the directory alone decodes (``lorashear generate DIR --runtime onnx``). The
    ``torch`` and ``hf`` directories keep the plain graph: their loader rewrites it for
    decoding when ``generate()`` first needs it.
    """
    if fmt == "torch":
        return save_model_dir(module, out, merge=False)
    if fmt == "hf":
        return save_model_dir(module, out, merge=True)
    if fmt == "onnx":
        from lorashear.runtime.kv_cache import KVCacheError
        from lorashear.runtime.onnx_emit import emit_onnx

        try:
            path = emit_onnx(module, out, kv_cache=kv_cache)
        except KVCacheError as exc:
            raise KVCacheError(f"cannot emit an ONNX decoder with past key values: {exc.message}",
                               hint="--no-kv-cache (kv_cache=False) writes the scoring-only "
                               "graph") from exc
        if kv_cache and Path(out).is_dir():
            write_decoder_files(module, path.parent)
        return path
    raise EmissionError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def write_decoder_files(module: Module, folder: Path) -> None:
    """``config.json`` (the module's Hugging Face config: token ids, limits) and the tokenizer
    files of the model the module was lowered from, next to an ONNX decoder in ``folder``.
    Files already there are replaced; a module without a config or a source skips them."""
    config = module.attributes.get("config")
    if isinstance(config, HFConfigAttr):
        data = dict(config.config)
        data.pop("quantization_config", None)
        (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    source = module.attributes.get("source")
    if isinstance(source, SourceAttr):
        src = Path(source.model)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, folder / name)
