"""Configurations of a pruned model whose decoder layers differ in width (written by lorashear).

Each class is the stock configuration of its family plus three per-layer lists, read from the
weights when the model was written:

- ``layer_intermediate_sizes``: the MLP width of every layer;
- ``layer_num_attention_heads`` / ``layer_num_key_value_heads``: the query and key/value heads
  of every layer (pruning removes whole key/value groups, with their query heads).

The top-level ``intermediate_size``, ``num_attention_heads`` and ``num_key_value_heads`` hold the
widest layer's values and ``head_dim`` is explicit, so code that reads only the stock keys sees
an upper bound. ``layer_config(i)`` is the stock configuration that layer ``i`` is built from.
This file imports only transformers: it is loaded with ``trust_remote_code=True``.
"""

from __future__ import annotations

import copy

from transformers import LlamaConfig, MistralConfig, Qwen2Config

try:  # Qwen3 arrived in transformers 4.51
    from transformers import Qwen3Config
except ImportError:
    Qwen3Config = None

PER_LAYER_FIELDS = {
    "layer_intermediate_sizes": "intermediate_size",
    "layer_num_attention_heads": "num_attention_heads",
    "layer_num_key_value_heads": "num_key_value_heads",
}


class PerLayerWidths:
    """What the per-layer configurations share: the stock config of one layer."""

    def layer_config(self, layer: int):
        """A copy of this configuration with layer ``layer``'s widths in the stock keys. Its
        attention implementation stays the model's own: ``set_attn_implementation`` after
        loading reaches every layer."""
        config = copy.deepcopy(self)
        for per_layer, key in PER_LAYER_FIELDS.items():
            values = getattr(self, per_layer, None)
            if values is not None:
                setattr(config, key, int(values[layer]))
        config.__class__ = _layer_class(type(self))
        config.model_config = self
        return config


_LAYER_CLASSES: dict[type, type] = {}


def _layer_class(cls: type) -> type:
    """``cls`` whose attention implementation is read from (and written to) ``model_config``."""
    if cls not in _LAYER_CLASSES:
        def get(self):
            return self.model_config._attn_implementation

        def set_(self, value):
            self.model_config._attn_implementation = value

        _LAYER_CLASSES[cls] = type(f"{cls.__name__}Layer", (cls,),
                                   {"_attn_implementation": property(get, set_)})
    return _LAYER_CLASSES[cls]


class LorashearLlamaConfig(PerLayerWidths, LlamaConfig):
    model_type = "lorashear_llama"


class LorashearMistralConfig(PerLayerWidths, MistralConfig):
    model_type = "lorashear_mistral"


class LorashearQwen2Config(PerLayerWidths, Qwen2Config):
    model_type = "lorashear_qwen2"


if Qwen3Config is not None:
    class LorashearQwen3Config(PerLayerWidths, Qwen3Config):
        model_type = "lorashear_qwen3"
