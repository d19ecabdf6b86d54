"""Emission to a model directory and loading it back (loading never unpickles or runs remote code).

Two layouts share one writer:
- ``torch``: the IR as it is (LoRA kept, trainable) + ``model.safetensors``; reload with
  :func:`load_pretrained` to continue training or run it.
- ``hf``: LoRA merged into the base weights, ``config.json`` and ``model.safetensors`` under
  the checkpoint's own names, the tokenizer files of the source model, a ``README.md`` saying
  how to load it, and ``lorashear.ir`` so :func:`load_pretrained` restores any shape exactly.

What ``config.json`` claims follows the weights (:func:`hf_config`), checked by building each
candidate model on the ``meta`` device and comparing its parameter shapes with the weights:

- ``stock``: every layer kept the shapes the (updated) source config describes: the source's
  config, and plain ``AutoModelForCausalLM.from_pretrained`` loads it (so do vLLM, TGI and
  llama.cpp's converter).
- ``remote-code``: the layers differ in width, and the family is one that
  :mod:`lorashear.runtime.hf_modeling` covers (llama, mistral, qwen2, qwen3): a
  ``lorashear_<family>`` config with per-layer widths read from the weights, registered through
  ``auto_map`` with the two files copied beside it, so ``from_pretrained(dir,
  trust_remote_code=True)`` loads it with stock transformers and no lorashear.
- ``lorashear``: anything else (another family with layers of differing widths): a config
  that claims no stock architecture (``model_type`` ``lorashear_ir``); only
  :func:`load_pretrained` loads it. Emission never fails for this.

Biases the source has none of (``reconstruct{bias=true}`` adds them to ``o_proj`` and
``down_proj``) are claimed through the family's own flags where its config has them
(``attention_bias``, ``mlp_bias``: :func:`bias_flags`), with a zero bias written for every
other projection the flag gives one; without such a flag the directory loads with lorashear.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from lorashear._atomic import atomic_path
from lorashear.errors import EmissionError, ModelLoadError
from lorashear.frontend.moe import drop_open_expert_gates, fuse_expert_params
from lorashear.ir.attributes import HFConfigAttr, SourceAttr, StoredTransposedAttr
from lorashear.ir.core import Module, clone_module
from lorashear.ir.fileformat import load_ir
from lorashear.ir.fingerprint import fingerprint_file
from lorashear.ir.printer import print_module
from lorashear.ir.storage import FileStorage
from lorashear.ir.types import torch_dtype
from lorashear.runtime.executor import IRModel, emit_torch
from lorashear.runtime.hf_modeling import FOLDER as REMOTE_CODE_FOLDER
from lorashear.runtime.hf_modeling import REMOTE_CODE_FILES

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
    expert_shapes: dict[str, tuple[int, ...]] = {}
    masked_experts: list[str] = []
    if merge:
        merge_lora(module)
        expert_shapes = fuse_expert_params(module)  # MoE: transformers' fused expert tensors
        masked_experts = drop_open_expert_gates(module)  # MoE: no gate buffer where none is masked
    missing = [n for n, p in module.params.items() if not p.storage.has_data]
    if missing:
        raise EmissionError(f"cannot emit weights: {len(missing)} parameters have no data "
                            f"(e.g. @{missing[0]}); the module was lowered with --meta")
    tensors: dict[str, torch.Tensor] = {}
    transposed = stored_transposed(module)
    for name, p in module.params.items():
        tensor = p.storage.load().to("cpu", torch_dtype(p.type.dtype))
        tensors[name] = (tensor.t() if name in transposed else tensor).contiguous()
    config = module.attributes.get("config")
    data: dict[str, Any] | None = None
    if isinstance(config, HFConfigAttr):
        data = dict(config.config)
        data.pop("quantization_config", None)
        if merge:
            data = moe_config(data, expert_shapes)
            shapes = {n: tuple(p.type.shape) for n, p in module.params.items() if not p.buffer}
            flagged, zeros = bias_flags(data, shapes)
            needs_flags = flagged is not data
            data, loads = hf_config(data, shapes)
            if needs_flags:
                with_biases, loads_with = hf_config(flagged, {**shapes, **zeros})
                if loads_with != "lorashear":  # a stock or remote-code model has these shapes
                    data, loads = with_biases, loads_with
                    for name, shape in zeros.items():
                        tensors[name] = torch.zeros(shape, dtype=tensors[name[: -len("bias")] + "weight"].dtype)
            if masked_experts and loads != "lorashear":  # a stock router would choose the masked experts
                data, loads = lorashear_only_config(data, f"experts are masked, not removed (@{masked_experts[0]} "
                                                          "holds zeros; compress removes them)"), "lorashear"
    with atomic_path(out_dir, directory=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "producer": "lorashear"})
        weights = str((out_dir / WEIGHTS_FILE).resolve())
        fingerprint = fingerprint_file(tmp / WEIGHTS_FILE)  # the bytes, not the path: survives the move
        for name, p in module.params.items():
            p.storage = FileStorage(weights, name, fingerprint, transposed=name in transposed)
        text = print_module(module, path_fn=lambda path: os.path.relpath(path, out_dir.resolve()))
        (tmp / IR_FILE).write_text(text, encoding="utf-8")
        if data is not None:
            if merge:
                if loads == "remote-code":
                    for name in REMOTE_CODE_FILES:
                        shutil.copy2(REMOTE_CODE_FOLDER / name, tmp / name)
                (tmp / "README.md").write_text(_readme(loads, data), encoding="utf-8")
            (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        _copy_tokenizer(module, tmp)
    return out_dir


def stored_transposed(module: Module) -> set[str]:
    """The parameters the checkpoint stores transposed (GPT-2's ``Conv1D``; see the
    ``stored-transposed`` attribute), which emission writes back in that layout."""
    attr = module.attributes.get("stored-transposed")
    return set(attr.params) & module.params.keys() if isinstance(attr, StoredTransposedAttr) else set()


def moe_config(data: dict[str, Any], expert_shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """``data`` with its expert count and expert MLP width read from the fused ``down_proj``
    ``[experts, hidden, intermediate]`` of every layer, where all layers agree (otherwise no
    stock config describes the weights, and ``data`` is returned unchanged)."""
    downs = {shape for name, shape in expert_shapes.items() if name.endswith(".down_proj") and len(shape) == 3}
    if len(downs) != 1:
        return data
    experts, _, width = downs.pop()
    data = dict(data)
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if isinstance(data.get(key), int):
            data[key] = experts
            break
    key = "moe_intermediate_size" if isinstance(data.get("moe_intermediate_size"), int) else "intermediate_size"
    data[key] = width
    return data


#: How an emitted directory loads: see the module docstring.
Loader = Literal["stock", "remote-code", "lorashear"]
#: Families whose per-layer-width model :mod:`lorashear.runtime.hf_modeling` defines: the
#: stock ``model_type`` and the infix of its class names (``Lorashear<infix>ForCausalLM``).
REMOTE_CODE_FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
#: ``model_type`` of a config that only :func:`load_pretrained` loads.
LORASHEAR_ONLY_TYPE = "lorashear_ir"
#: How such a config says it loads (its ``lorashear_loads_with``, followed by the reason).
LOADS_WITH = "lorashear.runtime.hf.load_pretrained"


def hf_config(data: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, Any], Loader]:
    """The ``config.json`` to write beside parameters of ``shapes`` (merged, checkpoint names,
    buffers left out) whose
    source config, updated by the passes, is ``data``, and how the directory then loads: the
    stock config when a stock model of it has exactly these shapes, else a per-layer-width
    remote-code config when its model has them, else one that claims no stock architecture."""
    if _model_shapes(data, None) == _expected(shapes, data):
        return data, "stock"
    family = REMOTE_CODE_FAMILIES.get(data.get("model_type", ""))
    widths = per_layer_widths(data, shapes) if family else None
    if family and widths:
        remote = _remote_code_config(data, family, widths)
        if _model_shapes(remote, family) == _expected(shapes, remote):
            return remote, "remote-code"
    return lorashear_only_config(data, "layers differ in width and no stock or remote-code model "
                                       "describes them"), "lorashear"


def lorashear_only_config(data: dict[str, Any], why: str) -> dict[str, Any]:
    """``data`` as a config that claims no stock architecture (only :func:`load_pretrained`
    loads it), saying ``why``."""
    return {**data, "model_type": LORASHEAR_ONLY_TYPE, "architectures": ["LorashearIRModel"],
            "lorashear_source_model_type": data.get("model_type"),
            "lorashear_loads_with": f"{LOADS_WITH} ({why})"}


#: Config flags that give a family's projections biases, and the module path part they cover.
BIAS_FLAGS = (("attention_bias", ".self_attn."), ("mlp_bias", ".mlp."))


def bias_flags(data: dict[str, Any], shapes: dict[str, tuple[int, ...]]
               ) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """For weights that carry biases the config ``data`` says its projections lack (a
    ``*.self_attn.*.bias`` while ``attention_bias`` is false; ``mlp_bias`` likewise): the config
    with those flags set, and the shapes of the zero biases every other 2-D weight under the
    flagged parts then needs. ``(data, {})`` when nothing is to be flagged."""
    flagged = [(flag, part) for flag, part in BIAS_FLAGS
               if data.get(flag) is False and any(n.endswith(".bias") and part in n for n in shapes)]
    if not flagged:
        return data, {}
    zeros = {}
    for name, shape in shapes.items():
        if name.endswith(".weight") and len(shape) == 2 and any(part in name for _, part in flagged):
            bias = name[: -len("weight")] + "bias"
            if bias not in shapes:
                zeros[bias] = (shape[0],)
    return {**data, **{flag: True for flag, _ in flagged}}, zeros


def per_layer_widths(data: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, list[int]] | None:
    """Each layer's MLP width and query/key-value head counts, read from its ``mlp.down_proj``
    and ``self_attn.q_proj``/``k_proj`` weights (None when a layer lacks them or a projection
    is not whole heads of ``head_dim``)."""
    try:
        layers = int(data["num_hidden_layers"])
        head_dim = int(data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    widths: dict[str, list[int]] = {"layer_intermediate_sizes": [], "layer_num_attention_heads": [],
                                    "layer_num_key_value_heads": []}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        down = shapes.get(prefix + "mlp.down_proj.weight")
        q = shapes.get(prefix + "self_attn.q_proj.weight")
        k = shapes.get(prefix + "self_attn.k_proj.weight")
        if down is None or q is None or k is None or q[0] % head_dim or k[0] % head_dim:
            return None
        widths["layer_intermediate_sizes"].append(down[1])
        widths["layer_num_attention_heads"].append(q[0] // head_dim)
        widths["layer_num_key_value_heads"].append(k[0] // head_dim)
    return widths


def _remote_code_config(data: dict[str, Any], family: str, widths: dict[str, list[int]]) -> dict[str, Any]:
    config = {k: v for k, v in data.items() if k not in ("lorashear_per_layer", "auto_map")}
    config.update(widths)
    config.update(
        model_type=f"lorashear_{data['model_type']}",
        architectures=[f"Lorashear{family}ForCausalLM"],
        auto_map={"AutoConfig": f"configuration_lorashear.Lorashear{family}Config",
                  "AutoModelForCausalLM": f"modeling_lorashear.Lorashear{family}ForCausalLM"},
        head_dim=int(data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"]),
        intermediate_size=max(widths["layer_intermediate_sizes"]),
        num_attention_heads=max(widths["layer_num_attention_heads"]),
        num_key_value_heads=max(widths["layer_num_key_value_heads"]))
    return config


def _expected(shapes: dict[str, tuple[int, ...]], data: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """``shapes`` as a model's state dict lists them: a tied head is there, though not saved."""
    if data.get("tie_word_embeddings") and "model.embed_tokens.weight" in shapes:
        return {"lm_head.weight": shapes["model.embed_tokens.weight"], **shapes}
    return dict(shapes)


def _model_shapes(data: dict[str, Any], family: str | None) -> dict[str, tuple[int, ...]] | None:
    """The parameter shapes of the model ``data`` describes, built on the ``meta`` device: the
    stock one (``family`` None) or the per-layer one of :mod:`lorashear.runtime.hf_modeling`;
    None when transformers cannot build it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            if family is None:
                config = AutoConfig.for_model(**copy.deepcopy(data))
                model = AutoModelForCausalLM.from_config(config)
            else:
                from lorashear.runtime.hf_modeling import (
                    configuration_lorashear,
                    modeling_lorashear,
                )
                config = getattr(configuration_lorashear, f"Lorashear{family}Config").from_dict(copy.deepcopy(data))
                model = getattr(modeling_lorashear, f"Lorashear{family}ForCausalLM")(config)
    except Exception:  # transformers raises many kinds for a config it cannot build
        return None
    return {name: tuple(t.shape) for name, t in model.named_parameters(remove_duplicate=False)}


def _readme(loads: Loader, data: dict[str, Any]) -> str:
    how = {
        "stock": "Every layer has the shapes `config.json` describes: stock transformers loads it\n"
                 "(`AutoModelForCausalLM.from_pretrained(dir)`), and so do tools that read a stock config.",
        "remote-code": "Its layers differ in width (`layer_intermediate_sizes`, `layer_num_attention_heads`,\n"
                       "`layer_num_key_value_heads` in `config.json`). Stock transformers loads it with the\n"
                       "modeling file shipped here, which imports only torch and transformers:\n"
                       "`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.",
        "lorashear": f"No stock model of its family ({data.get('lorashear_source_model_type')}) describes it:\n"
                     f"{data.get('lorashear_loads_with', '').removeprefix(LOADS_WITH + ' (').removesuffix(')')}. "
                     "It loads with lorashear\n"
                     "only, `lorashear.runtime.hf.load_pretrained(dir)`.",
    }[loads]
    return ("# A model pruned by lorashear\n\n" + how + "\n\n`lorashear.runtime.hf.load_pretrained(dir)` "
            "loads it in every case, from `lorashear.ir`.\n")


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
