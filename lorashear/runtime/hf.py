"""Emission to a model directory and loading it back, without pickle or remote code.

Two layouts share one writer:
- ``torch``: the IR as it is (LoRA kept, trainable) + ``model.safetensors``; reload with
  :func:`load_pretrained` to continue training or run it.
- ``hf``: LoRA merged into the base weights, ``config.json`` and ``model.safetensors`` under
  the checkpoint's own names (plain ``transformers.AutoModelForCausalLM.from_pretrained``
  loads it whenever every layer kept the config's shapes), the tokenizer files of the source
  model, and ``lorashear.ir`` so :func:`load_pretrained` restores any shape exactly.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorashear._atomic import atomic_path
from lorashear.errors import EmissionError, ModelLoadError
from lorashear.ir.attributes import HFConfigAttr, SourceAttr
from lorashear.ir.core import Module, clone_module
from lorashear.ir.fileformat import load_ir
from lorashear.ir.fingerprint import fingerprint_file
from lorashear.ir.printer import print_module
from lorashear.ir.storage import FileStorage
from lorashear.ir.types import torch_dtype
from lorashear.runtime.executor import IRModel, emit_torch

IR_FILE = "lorashear.ir"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")


def save_model_dir(module: Module, out_dir: str | os.PathLike, *, merge: bool) -> Path:
    """Write ``module`` as a self-contained directory (see the module docstring)."""
    from lorashear.ir.lora import merge_lora

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EmissionError(f"output {out_dir} exists and is not a directory")
    module = clone_module(module)
    if merge:
        merge_lora(module)
    missing = [n for n, p in module.params.items() if not p.storage.has_data]
    if missing:
        raise EmissionError(f"cannot emit weights: {len(missing)} parameters have no data "
                            f"(e.g. @{missing[0]}); the module was lowered with --meta")
    tensors: dict[str, torch.Tensor] = {}
    for name, p in module.params.items():
        tensors[name] = p.storage.load().to("cpu", torch_dtype(p.type.dtype)).contiguous()
    with atomic_path(out_dir, directory=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "producer": "lorashear"})
        weights = str((out_dir / WEIGHTS_FILE).resolve())
        fingerprint = fingerprint_file(tmp / WEIGHTS_FILE)  # the bytes, not the path: survives the move
        for name, p in module.params.items():
            p.storage = FileStorage(weights, name, fingerprint)
        text = print_module(module, path_fn=lambda path: os.path.relpath(path, out_dir.resolve()))
        (tmp / IR_FILE).write_text(text, encoding="utf-8")
        config = module.attributes.get("config")
        if isinstance(config, HFConfigAttr):
            data = dict(config.config)
            data.pop("quantization_config", None)
            (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        _copy_tokenizer(module, tmp)
    return out_dir


def _copy_tokenizer(module: Module, dest: Path) -> None:
    source = module.attributes.get("source")
    if not isinstance(source, SourceAttr):
        return
    src = Path(source.model)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)


def load_pretrained(model_dir: str | os.PathLike, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> IRModel:
    """Load a directory written by ``lorashear-emit`` (or any local HF causal-LM directory).

    Uses the directory's ``lorashear.ir`` when present, which restores non-uniform pruned
    shapes exactly; otherwise lowers the HF checkpoint. Never unpickles anything.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    ir_file = model_dir / IR_FILE
    if ir_file.is_file():
        module = load_ir(ir_file)
    else:
        from lorashear.frontend.pretrained import lower_any
        module = lower_any(model_dir)
    return emit_torch(module, device=device, dtype=dtype)
