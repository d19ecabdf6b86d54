"""``generate()`` for IR models: transformers' own decoding loop over the executor.

:func:`generator` wraps an :class:`~lorashear.runtime.executor.IRModel` in a
``transformers`` ``PreTrainedModel`` + ``GenerationMixin`` whose ``forward`` is the IR
model's, so every decoding strategy transformers has (greedy, sampling, beam search,
stopping criteria, logits processors, streamers) runs unchanged on any emitted model, dense
or pruned, uniform or not. The model decodes over its KV-cache graph
(:mod:`lorashear.runtime.kv_cache`) in a ``DynamicCache`` of full layers (the graph's mask
already says which past positions each token sees, so the cache keeps all of them); a graph
the rewrite cannot cache decodes without one, recomputing the prefix each step.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache

from lorashear.ir.attributes import HFConfigAttr
from lorashear.runtime.executor import IRModel


def decoder_config(data: dict[str, Any]) -> PretrainedConfig:
    """A bare ``PretrainedConfig`` of a model's ``config.json`` contents, for generation's
    token ids and limits (no quantisation, no remote code, a decoder)."""
    data = {k: v for k, v in data.items() if k not in ("quantization_config", "auto_map")}
    config = PretrainedConfig.from_dict(data)
    config.is_encoder_decoder = False
    return config


def hf_config(model: IRModel) -> PretrainedConfig:
    """The model's Hugging Face config (from its ``hf.config`` attribute); a bare config when
    the module has none."""
    attr = model.ir.attributes.get("config")
    return decoder_config(dict(attr.config) if isinstance(attr, HFConfigAttr) else {})


class CacheGeneration(PreTrainedModel, GenerationMixin):
    """What a runtime's adapter to transformers' generation shares (the executor's here, ONNX
    Runtime's in :mod:`lorashear.runtime.onnx_generate`): a subclass sets ``cached`` (whether
    its model decodes over a KV cache) and defines ``forward``."""

    config_class = PretrainedConfig
    main_input_name = "input_ids"
    _supports_cache_class = True
    cached: bool

    def _supports_default_dynamic_cache(self) -> bool:
        return self.cached

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, **kwargs: Any):
        """``GenerationMixin.generate`` with a full-layer ``DynamicCache`` by default (a
        sliding-window cache layer would drop past keys the graph's mask expects); a model
        without a cache recomputes the prefix each step."""
        use_cache = kwargs.get("use_cache", self.generation_config.use_cache)
        if self.cached and use_cache is not False and kwargs.get("cache") is None \
                and kwargs.get("past_key_values") is None:
            kwargs["cache"] = DynamicCache()
        if not self.cached:
            kwargs["use_cache"] = False
        return super().generate(inputs, **kwargs)


class IRForGeneration(CacheGeneration):
    """An IR model as transformers' generation expects one (see the module docstring).

    Holds the IR model without registering it as a submodule, so it adds no parameters and
    shares the IR model's tensors, device and dtype."""

    def __init__(self, model: IRModel, config: PretrainedConfig | None = None,
                 generation_config: GenerationConfig | None = None) -> None:
        super().__init__(config or hf_config(model))
        object.__setattr__(self, "ir_model", model)
        self.generation_config = generation_config or GenerationConfig.from_model_config(self.config)
        self.cached = model.supports_cache()

    @property
    def device(self) -> torch.device:
        return self.ir_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.ir_model._float_dtype()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: Any = None, use_cache: bool | None = None, labels: torch.Tensor | None = None,
                logits_to_keep: int = 0, **_: Any):
        if not self.cached or use_cache is False:  # the plain graph over the whole prefix
            return self.ir_model(input_ids, attention_mask=attention_mask, labels=labels)
        return self.ir_model(input_ids, attention_mask=attention_mask, labels=labels, cache=cache,
                             use_cache=True, logits_to_keep=logits_to_keep)

    def generate(self, inputs: torch.Tensor | None = None, **kwargs: Any):
        """:meth:`CacheGeneration.generate` with the IR model in eval mode (dropout off)."""
        was_training = self.ir_model.training
        self.ir_model.eval()
        try:
            return super().generate(inputs, **kwargs)
        finally:
            self.ir_model.train(was_training)


def generator(model: IRModel, *, config: PretrainedConfig | None = None,
              generation_config: GenerationConfig | None = None) -> IRForGeneration:
    """``model`` ready for ``.generate(input_ids, max_new_tokens=..., do_sample=...)``."""
    return IRForGeneration(model, config, generation_config)
