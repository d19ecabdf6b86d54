"""Lowering a Hugging Face model directory (+ a peft LoRA adapter) without loading its weights.

The model is built on the ``meta`` device from its ``config.json`` (buffers computed for
real, they are tiny), traced there, and each parameter is bound to a reference into the
directory's safetensors files, checked for name and shape. No more than one weight is in
memory at a time (each is read once, to refuse NaN and Inf; ``meta`` reads none), so a
checkpoint of any size lowers in the memory its architecture needs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from lorashear.errors import LorashearError, ModelLoadError, first_line
from lorashear.frontend.lower import canonical_param_name, lower
from lorashear.ir.attributes import SourceAttr
from lorashear.ir.core import Module
from lorashear.ir.storage import DataStorage, FileStorage, MetaStorage, Storage, safetensors_keys

#: Linear layers that get fresh LoRA adapters by default (all attention and MLP projections).
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create parameters on ``meta`` (no memory, no init cost) but buffers for real.

    Non-persistent buffers such as RoPE's ``inv_freq`` are not in checkpoints; they are
    computed by the module constructors, so they must be built on a real device.
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def checkpoint_index(model_dir: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """Tensor name -> (safetensors file, shape) for a model directory (single file or sharded)."""
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{index_file} is malformed: {exc}") from None
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} holds no safetensors weights",
                             hint="save the model with save_pretrained(safe_serialization=True), "
                             "or pass --meta to lower the architecture only")
    index: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for f in files:
        path = model_dir / f
        if not path.is_file():
            raise ModelLoadError(f"{index_file} names {f}, which is missing from {model_dir}")
        for key, (shape, _) in safetensors_keys(path).items():
            index[key] = (str(path.resolve()), shape, key)
    return index


def _load_config(model_dir: Path):
    from transformers import AutoConfig

    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds here
        raise ModelLoadError(f"cannot read the config of {model_dir}: {first_line(exc)}") from None


def add_transformers_key_names(model: nn.Module, index: dict[str, tuple[str, tuple[int, ...], str]]) -> dict[str, str]:
    """Add to a :func:`checkpoint_index` the names transformers loads its keys into.

    transformers renames checkpoint keys on load (GPT-NeoX's ``embed_out`` is ``lm_head``,
    ``LayerNorm.gamma`` is ``.weight``, a base model's keys gain or lose its
    ``base_model_prefix``), and writes the old names back on save. Each renamed key is added
    under the model's parameter name, still pointing into its file (no weight is read). Keys
    that only a conversion (fusing, splitting, permuting tensors) makes into a parameter cannot
    be bound by reference; they are returned as ``{parameter name: checkpoint key}`` so the
    error can name them.
    """
    if not index:
        return {}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:  # a transformers without conversion mappings loads keys as they are
        return {}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    wanted = dict.fromkeys(model.state_dict())
    prefix = getattr(model, "base_model_prefix", None) or None
    converted: dict[str, str] = {}
    for key in sorted(index):
        if key in wanted:
            continue
        try:
            renamed, converter = rename_source_key(key, renamings, converters, prefix, wanted)
        except Exception:  # noqa: BLE001 - a key transformers cannot name is reported as missing
            continue
        if renamed == key or renamed not in wanted:
            continue
        if converter is not None:
            converted.setdefault(renamed, key)
        else:
            index.setdefault(renamed, index[key])
    return converted


class ConvertedStorage(DataStorage):
    """A parameter that transformers makes on load from checkpoint tensors (fused from one
    tensor per expert, split out of a fused projection, ...): the tensors are read from their
    files and converted by transformers' own conversion each time it is loaded, so nothing is
    held in memory (printed as ``data``, a saved ``.ir`` keeps the converted tensor)."""

    def __init__(self, converter, layer_name: str, sources: list[tuple[str, FileStorage]], target: str,
                 config, shapes: ParameterShapes | None = None) -> None:
        self._tensor = None
        self._sidecar = None
        self.converter, self.layer_name, self.sources = converter, layer_name, sources
        self.target, self.config, self.shapes = target, config, shapes

    def load(self) -> torch.Tensor:
        return run_conversion(self.converter, self.layer_name, self.sources, self.config,
                              lambda storage: storage.load(), self.shapes)[self.target]

    def source_keys(self) -> list[tuple[str, str]]:
        """The checkpoint tensors it is made from: (file, key)."""
        return [(s.path, s.key) for _, s in self.sources]

    def __repr__(self) -> str:
        return f"ConvertedStorage({self.target} from {', '.join(key for _, key in self.source_keys())})"


class ParameterShapes:
    """The model's parameter shapes, answering ``get_parameter`` with a tensor on ``meta``:
    what transformers' ``Split`` asks the model for (the sizes of the projections it splits a
    fused ``query_key_value`` into: Param2MoE, SarvamMoE), without holding the model."""

    def __init__(self, model: nn.Module) -> None:
        self.shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}

    def get_parameter(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise AttributeError(f"the model has no parameter {name}")
        return torch.empty(self.shapes[name], device="meta")


def run_conversion(converter, layer_name: str, sources: list[tuple[str, FileStorage]], config,
                   load, shapes: ParameterShapes | None = None) -> dict[str, torch.Tensor]:
    """Run a copy of transformers' ``converter`` on the checkpoint tensors ``sources``
    (``(source pattern, file tensor)``, in transformers' order), each read by ``load``, with
    ``shapes`` standing in for the model; the parameters it makes, by name."""
    import copy

    conversion = copy.deepcopy(converter)
    for pattern, storage in sources:
        conversion.add_tensor(layer_name, storage.key, pattern, lambda s=storage: load(s))
    made = conversion.convert(layer_name, model=shapes, config=config)
    return {name: tensor[0] if isinstance(tensor, list) else tensor for name, tensor in made.items()}


def converted_storages(model: nn.Module, index: dict[str, tuple[str, tuple[int, ...], str]]
                       ) -> dict[str, tuple[ConvertedStorage, tuple[int, ...]]]:
    """Parameter name -> (its :class:`ConvertedStorage`, its shape) for the parameters that
    transformers' conversion mapping makes from the checkpoint's keys (grouped and ordered as
    transformers groups them on load); the shapes come from running the conversion on
    ``meta`` tensors, so no weight is read."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:
        return {}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    wanted = dict.fromkeys(model.state_dict())
    prefix = getattr(model, "base_model_prefix", None) or None
    groups: dict[str, tuple[WeightConverter, list[tuple[str, FileStorage]]]] = {}
    for key in sorted(index, key=dot_natural_key):
        if key in wanted:
            continue
        try:
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, wanted)
        except Exception:  # noqa: BLE001 - a key transformers cannot name is left out
            continue
        if pattern is None or renamed not in wanted or pattern not in by_pattern:
            continue
        path, _, stored_key = index[key]
        groups.setdefault(renamed, (by_pattern[pattern], []))[1].append((pattern, FileStorage(path, stored_key)))
    shapes = {(path, key): shape for path, shape, key in index.values()}

    def on_meta(storage: FileStorage) -> torch.Tensor:
        return torch.empty(shapes[(storage.path, storage.key)], device="meta")

    config = getattr(model, "config", None)
    parameter_shapes = ParameterShapes(model)
    out: dict[str, tuple[ConvertedStorage, tuple[int, ...]]] = {}
    for layer_name, (converter, sources) in groups.items():
        try:
            made = run_conversion(converter, layer_name, sources, config, on_meta, parameter_shapes)
        except Exception:  # noqa: BLE001 - a conversion that does not run on shapes: reported as before
            continue
        for target, tensor in made.items():
            if target in wanted:
                out[target] = (ConvertedStorage(converter, layer_name, sources, target, config, parameter_shapes),
                               tuple(tensor.shape))
    return out


def _build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        with parameters_on_meta():
            model = model_from_config(AutoModelForCausalLM, config)
    except ValueError as exc:
        named = _named_causal_lm(config)
        if named is None:
            raise ModelLoadError(f"{type(config).__name__} is not a causal language model "
                                 f"transformers can build: {first_line(exc)}") from None
        with parameters_on_meta():
            model = model_from_config(_ClassAsAuto(named), config)
    return model.to(dtype).eval()


class _ClassAsAuto:
    """A model class with an auto class's ``from_config``."""

    def __init__(self, cls) -> None:
        self.cls = cls

    def from_config(self, config, **kwargs):
        return self.cls._from_config(config, **kwargs)


def _named_causal_lm(config):
    """The causal-LM class the config's ``architectures`` names, where the auto classes do not
    map the config (a multimodal family's text model, as Emu3's and Mllama's ``*ForCausalLM``
    saved on their own: their config is the text sub-config); None where there is none."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None) if name.endswith("ForCausalLM") else None
        if cls is not None and isinstance(config, getattr(cls, "config_class", ())):
            return cls
    return None


def model_from_config(auto_class, config) -> nn.Module:
    """``auto_class.from_config`` with PyTorch's fused attention (``sdpa``), or the model's own
    (``eager``) where transformers has no sdpa path for the architecture (BLOOM, GPT-2-family
    relatives): both trace to plain ATen ops."""
    try:
        return auto_class.from_config(config, attn_implementation="sdpa")
    except ValueError as exc:
        if "scaled_dot_product_attention" not in str(exc):
            raise
    return auto_class.from_config(config, attn_implementation="eager")


def _adapter_config(adapter_dir: Path):
    from peft import LoraConfig, PeftConfig

    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter_dir} is not a peft adapter directory (no adapter_config.json)")
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as exc:
        raise ModelLoadError(f"cannot read the adapter config in {adapter_dir}: {first_line(exc)}") from None
    if not isinstance(config, LoraConfig):
        raise ModelLoadError(f"{adapter_dir} holds a {type(config).__name__}; only LoRA adapters are supported")
    if getattr(config, "use_dora", False):
        raise ModelLoadError(f"{adapter_dir} is a DoRA adapter; only plain LoRA is supported")
    return config


def _adapter_tensors(adapter_dir: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise ModelLoadError(f"{adapter_dir} has no adapter_model.safetensors")
    out = {}
    for key, (shape, _) in safetensors_keys(path).items():
        out[key.removeprefix("base_model.model.")] = (str(path.resolve()), shape, key)
    return out


def lower_pretrained(model_dir: str | os.PathLike, *, adapter: str | os.PathLike | None = None,
                     lora_rank: int | None = None, lora_alpha: float | None = None,
                     lora_targets: Sequence[str] | None = None, lora_dropout: float = 0.0,
                     meta: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0,
                     trace_all_layers: bool = False, allow_nonfinite: bool = False) -> Module:
    """Lower a local HF causal-LM directory, optionally with a LoRA adapter, into the IR.

    ``adapter``: a peft LoRA adapter directory. ``lora_rank``: instead insert fresh LoRA
    adapters of that rank on ``lora_targets`` (A random as in peft, B zero, so the model's
    function is unchanged). ``meta``: no weights at all, for analysis of the architecture.
    ``trace_all_layers``: as in :func:`~lorashear.frontend.lower.lower`. Every weight is read
    once and refused if it holds NaN or Inf, unless ``allow_nonfinite``.
    """
    from peft import LoraConfig, get_peft_model

    if adapter is not None and lora_rank is not None:
        raise ModelLoadError("give either an adapter directory or --lora-rank, not both")
    model_dir = Path(model_dir)
    config = _load_config(model_dir)
    checkpoint = {} if meta else checkpoint_index(model_dir)
    model = _build_skeleton(config, dtype)
    converted = add_transformers_key_names(model, checkpoint)
    conversions = converted_storages(model, checkpoint) if converted else {}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if b.device.type != "meta"}
    model.to("meta")

    adapter_tensors: dict[str, tuple[str, tuple[int, ...], str]] = {}
    if adapter is not None:
        adapter_dir = Path(adapter)
        if not adapter_dir.is_dir():
            raise ModelLoadError(f"adapter directory {adapter_dir} does not exist")
        lora_config = _adapter_config(adapter_dir)
        lora_config.inference_mode = False
        adapter_tensors = {} if meta else _adapter_tensors(adapter_dir)
    elif lora_rank is not None:
        if lora_rank <= 0:
            raise ModelLoadError(f"--lora-rank must be positive, got {lora_rank}")
        lora_config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha if lora_alpha is not None else 2 * lora_rank,
                                 target_modules=list(lora_targets or DEFAULT_LORA_TARGETS),
                                 lora_dropout=lora_dropout, bias="none")
    if adapter is not None or lora_rank is not None:
        try:
            model = get_peft_model(model, lora_config, low_cpu_mem_usage=True)  # factors on meta, as all else
        except (ValueError, KeyError, TypeError) as exc:
            where = f"adapter {adapter}" if adapter is not None else "--lora-targets"
            raise ModelLoadError(f"{where} does not fit {model_dir}: {first_line(exc)}") from None

    generator = torch.Generator().manual_seed(seed)
    used_adapter_keys: set[str] = set()
    tied = tied_names(model)
    parameter_names = {canonical_param_name(n.removeprefix("base_model.model."))
                       for n, _ in model.named_parameters(remove_duplicate=False)}

    def storage_for(name: str, tensor: torch.Tensor) -> Storage:
        shape = tuple(tensor.shape)
        if name in buffers:
            return DataStorage(buffers[name])
        if name not in parameter_names:  # a constant tensor the forward makes
            if tensor.device.type != "meta":
                return DataStorage(tensor.detach().clone())
            if tensor.numel() == 0:  # no values to know (XLM's cache starts from empty tensors)
                return DataStorage(torch.empty(shape, dtype=tensor.dtype))
            if not meta:
                raise ModelLoadError(f"the forward of {type(config).__name__.removesuffix('Config')} "
                                     "makes a constant tensor "
                                     f"({name}) on the device of its weights; traced without weights, "
                                     "its value is unknown",
                                     hint="lower the model in memory with lorashear.lower(model)")
            return MetaStorage()
        if ".lora_A." in name or ".lora_B." in name:
            if adapter is not None:
                return _bind(name, shape, adapter_tensors, f"adapter {adapter}", used_adapter_keys,
                             meta=meta, mismatch="was made for another base model")
            return MetaStorage() if meta else DataStorage(fresh_lora_factor(name, shape, generator))
        if name not in checkpoint and name in conversions:
            storage, stored_shape = conversions[name]
            if stored_shape != shape:
                raise ModelLoadError(f"model {model_dir} does not match its config: {name}, converted from "
                                     f"{', '.join(key for _, key in storage.source_keys())}, has shape {list(stored_shape)}, the model expects "
                                     f"{list(shape)}")
            return storage
        if name not in checkpoint and name in converted:
            raise ModelLoadError(f"model {model_dir} stores {name} as {converted[name]}, which "
                                 "transformers converts on load (fuses, splits or reorders); lorashear "
                                 "binds weights by reference and cannot",
                                 hint="load it with transformers and save_pretrained it again, or "
                                 "pass --meta to lower the architecture only")
        if name not in checkpoint:  # a tied weight saved under another of its names
            name = next((alias for alias in tied.get(id(tensor), ()) if alias in checkpoint), name)
        return _bind(name, shape, checkpoint, f"model {model_dir}", None, meta=meta,
                     mismatch="does not match its config")

    module = lower(model, storage_fn=storage_for, trace_all_layers=trace_all_layers,
                   allow_nonfinite=allow_nonfinite)
    unused = sorted(set(adapter_tensors) - used_adapter_keys)
    if unused:
        raise ModelLoadError(f"adapter {adapter} has tensors the model has no place for, e.g. "
                             f"{unused[0]!r}", hint="was it trained for another architecture?")
    module.attributes["source"] = SourceAttr(str(model_dir.resolve()),
                                             str(Path(adapter).resolve()) if adapter else None)
    return module


def tied_names(model: nn.Module) -> dict[int, list[str]]:
    """The checkpoint names of each parameter that has several (tied weights: RoBERTa's
    ``lm_head.decoder.weight`` is its word embeddings, saved once under either name)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(canonical_param_name(name.removeprefix("base_model.model.")))
    return {key: aliases for key, aliases in names.items() if len(aliases) > 1}


def _bind(name: str, shape: tuple[int, ...], index: dict, what: str, used: set[str] | None, *,
          meta: bool, mismatch: str) -> Storage:
    if meta:
        return MetaStorage()
    entry = index.get(name)
    if entry is None:
        raise ModelLoadError(f"{what} has no tensor {name!r}")
    path, stored_shape, key = entry
    if stored_shape != shape:
        raise ModelLoadError(f"{what} {mismatch}: {name} has shape {list(stored_shape)}, "
                             f"the model expects {list(shape)}")
    if used is not None:
        used.add(name)
    return FileStorage(path, key)


def fresh_lora_factor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """peft's default init of the factor ``name`` (``...lora_A...`` or ``...lora_B...``):
    A ~ kaiming-uniform(a=sqrt(5)), B = 0 (the adapter starts as a no-op)."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def lower_any(model_dir: str | os.PathLike, **kwargs) -> Module:
    """:func:`lower_pretrained` with unexpected failures wrapped as a one-line ModelLoadError."""
    try:
        return lower_pretrained(model_dir, **kwargs)
    except LorashearError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot lower {model_dir}: {type(exc).__name__}: {first_line(exc)}") from exc
