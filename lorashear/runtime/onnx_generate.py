"""Decoding in ONNX Runtime under transformers' own generation loop.

:func:`onnx_generator` opens an ONNX model emitted by lorashear (``emit_onnx(...,
kv_cache=True)``, ``lorashear-emit --format onnx``) in an ONNX Runtime session and wraps it in
a ``transformers`` ``PreTrainedModel`` + ``GenerationMixin``: ``generate()`` (greedy, sampling,
beam search, stopping criteria, streamers) runs unchanged, and each of its forward calls is one
run of the session. The decoder's cache lives in a ``transformers.DynamicCache`` of torch
tensors that share memory with ONNX Runtime's numpy arrays: a ``present.{i}.key`` output
becomes cache layer ``i``'s keys without a copy and goes back in as
``past_key_values.{i}.key`` the same way, so beam search's reordering and
``GenerationMixin``'s bookkeeping are transformers' own. A scoring-only model (no past inputs,
``--no-kv-cache``) decodes too, recomputing the whole prefix each step.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig, PretrainedConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from lorashear.errors import ExecutionError, ModelLoadError
from lorashear.runtime.generation import CacheGeneration, decoder_config
from lorashear.runtime.kv_cache import (
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    cached_pairs,
    store_present,
)

#: ONNX tensor element types the decoder's inputs may have, as numpy dtypes.
_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                 "tensor(double)": np.float64, "tensor(int64)": np.int64}


@dataclass(frozen=True)
class PastEntry:
    """One cache entry of the decoder (one attention): its heads and head sizes."""

    index: int
    kv_heads: int
    key_dim: int
    value_dim: int
    dtype: Any  # numpy dtype

    def empty(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of no tokens: the past of a prefill."""
        return (np.empty((batch, self.kv_heads, 0, self.key_dim), dtype=self.dtype),
                np.empty((batch, self.kv_heads, 0, self.value_dim), dtype=self.dtype))


def resolve_onnx_path(path: str | os.PathLike) -> Path:
    """The ``.onnx`` file of ``path``: the file itself, or ``model.onnx`` in a directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise ModelLoadError(f"no ONNX model at {path}",
                             hint="emit one with `lorashear-emit IN.ir --format onnx -o DIR`")
    return path


class OnnxDecoder:
    """An ONNX Runtime session over a lorashear decoder, with its cache layout read off the
    session's inputs. ``threads`` sets ONNX Runtime's intra-op threads (default: torch's)."""

    def __init__(self, path: str | os.PathLike, *, providers: list[str] | None = None,
                 threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelLoadError("decoding an ONNX model needs the 'onnxruntime' package",
                                 hint="run `pip install onnxruntime`") from exc
        self.path = resolve_onnx_path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"ONNX Runtime cannot load {self.path}: {exc}") from exc
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in inputs:
            raise ModelLoadError(f"{self.path} is not a causal LM decoder: it has no input_ids input")
        self.has_attention_mask = "attention_mask" in inputs
        self.layout: list[PastEntry] = []
        while PAST_KEY.format(len(self.layout)) in inputs:
            i = len(self.layout)
            key, value = inputs[PAST_KEY.format(i)], inputs.get(PAST_VALUE.format(i))
            if value is None or not isinstance(key.shape[1], int) or not isinstance(key.shape[3], int) \
                    or not isinstance(value.shape[3], int):
                raise ModelLoadError(f"{self.path}: cache entry {i} is not [batch, kv_heads, past, "
                                     "head_dim] keys and values with fixed heads and head size")
            self.layout.append(PastEntry(i, key.shape[1], key.shape[3], value.shape[3],
                                         _NUMPY_DTYPES.get(key.type, np.float32)))
        self.output_names = ["logits"] + [name for i in range(len(self.layout))
                                          for name in (PRESENT_KEY.format(i), PRESENT_VALUE.format(i))]
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [name for name in self.output_names if name not in outputs]
        if missing:
            raise ModelLoadError(f"{self.path} has no output {missing[0]!r}")

    @property
    def cached(self) -> bool:
        """Whether the model takes past key values (decodes incrementally)."""
        return bool(self.layout)

    @property
    def dtype(self) -> torch.dtype:
        return torch.from_numpy(np.empty(0, self.layout[0].dtype)).dtype if self.layout else torch.float32

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
            past: list[tuple[np.ndarray, np.ndarray]] | None = None
            ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """One session run: the new tokens' logits and (for a cached model) every entry's keys
        and values of the past and new tokens. ``past`` ``None`` is a prefill."""
        batch = input_ids.shape[0]
        past = past if past is not None else [entry.empty(batch) for entry in self.layout]
        if len(past) != len(self.layout):
            raise ExecutionError(f"the cache has {len(past)} entries; {self.path.name} caches "
                                 f"{len(self.layout)} attentions")
        feed: dict[str, np.ndarray] = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64)}
        if self.has_attention_mask:
            if attention_mask is None:
                length = input_ids.shape[1] + (past[0][0].shape[2] if past else 0)
                attention_mask = np.ones((batch, length), dtype=np.int64)
            feed["attention_mask"] = np.ascontiguousarray(attention_mask, dtype=np.int64)
        for entry, (key, value) in zip(self.layout, past, strict=True):
            feed[PAST_KEY.format(entry.index)] = np.ascontiguousarray(key, dtype=entry.dtype)
            feed[PAST_VALUE.format(entry.index)] = np.ascontiguousarray(value, dtype=entry.dtype)
        outputs = self.session.run(self.output_names, feed)
        return outputs[0], list(zip(outputs[1::2], outputs[2::2], strict=True))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's numpy view (a copy only when it lives elsewhere)."""
    return tensor.detach().cpu().numpy()


def read_config(folder: Path) -> tuple[PretrainedConfig, GenerationConfig | None]:
    """The Hugging Face config (``config.json``) and generation config beside a decoder, or a
    bare config when there is none (the tokenizer then supplies the special tokens)."""
    data: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        try:
            data = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    config = decoder_config(data)
    generation = None
    if (folder / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(folder)
    return config, generation


class OnnxForGeneration(CacheGeneration):
    """An ONNX decoder as transformers' generation expects a model (see the module docstring)."""

    def __init__(self, decoder: OnnxDecoder, config: PretrainedConfig | None = None,
                 generation_config: GenerationConfig | None = None) -> None:
        if config is None:
            config, file_generation = read_config(decoder.path.parent)
            generation_config = generation_config or file_generation
        super().__init__(config)
        self.decoder = decoder
        self.generation_config = generation_config or GenerationConfig.from_model_config(self.config)
        self.cached = decoder.cached

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # ONNX Runtime's outputs come back as host arrays

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.dtype

    def _past(self, cache: Cache | None, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        empty = [entry.empty(batch) for entry in self.decoder.layout]
        if cache is None:
            return empty
        pairs = cached_pairs(cache, [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in empty])
        return [(_numpy(k), _numpy(v)) for k, v in pairs]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: Any = None, use_cache: bool | None = None, labels: torch.Tensor | None = None,
                past_key_values: Any = None, **_: Any) -> CausalLMOutputWithPast:
        """Logits of ``input_ids`` (the new tokens, for a cached decoder); the result's
        ``cache`` holds the past and new tokens' keys and values."""
        cache = cache if cache is not None else past_key_values
        ids = _numpy(input_ids)
        mask = _numpy(attention_mask) if attention_mask is not None else None
        if not self.cached or use_cache is False:  # the whole sequence, from an empty past
            logits, _ = self.decoder.run(ids, mask)
            return CausalLMOutputWithPast(logits=torch.from_numpy(logits))
        if cache is not None and not isinstance(cache, Cache):
            cache = DynamicCache([tuple(pair) for pair in cache])
        cache = cache if cache is not None else DynamicCache()
        past = self._past(cache, ids.shape[0])
        logits, presents = self.decoder.run(ids, mask, past)
        for i, ((old_key, _), (key, value)) in enumerate(zip(past, presents, strict=True)):
            store_present(cache, i, torch.from_numpy(key), torch.from_numpy(value), old_key.shape[2])
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                torch.from_numpy(logits)[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=torch.from_numpy(logits), cache=cache)


def onnx_generator(path: str | os.PathLike, *, providers: list[str] | None = None,
                   threads: int | None = None, config: PretrainedConfig | None = None,
                   generation_config: GenerationConfig | None = None) -> OnnxForGeneration:
    """The ONNX model at ``path`` (a ``.onnx`` file, or a directory with ``model.onnx``) ready
    for ``.generate(input_ids, max_new_tokens=..., do_sample=..., num_beams=...)``; the config
    defaults to the ``config.json`` beside it."""
    return OnnxForGeneration(OnnxDecoder(path, providers=providers, threads=threads), config,
                             generation_config)
