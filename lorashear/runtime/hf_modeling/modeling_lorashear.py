"""Causal LMs whose decoder layers differ in width (written by lorashear; needs only torch and
transformers).

Each class is the stock ``*ForCausalLM`` of its family: embeddings, rotary positions, masks,
cache, final norm, head and ``generate()`` are transformers' own. Only the decoder layers
differ: layer ``i`` is the stock decoder layer built from ``config.layer_config(i)``, the
family's configuration with that layer's MLP width and query/key-value head counts. The
checkpoint keeps the stock parameter names.
"""

from __future__ import annotations

from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from .configuration_lorashear import (
    LorashearLlamaConfig,
    LorashearMistralConfig,
    LorashearQwen2Config,
)

try:  # Qwen3 arrived in transformers 4.51
    from transformers import Qwen3ForCausalLM

    from .configuration_lorashear import LorashearQwen3Config
except ImportError:
    Qwen3ForCausalLM = None


def build_per_layer(model) -> None:
    """Replace every decoder layer of ``model`` by the stock layer of its own widths."""
    layers = model.model.layers
    for index, layer in enumerate(layers):
        layers[index] = type(layer)(model.config.layer_config(index), index)


class LorashearLlamaForCausalLM(LlamaForCausalLM):
    config_class = LorashearLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        build_per_layer(self)
        self.post_init()


class LorashearMistralForCausalLM(MistralForCausalLM):
    config_class = LorashearMistralConfig

    def __init__(self, config):
        super().__init__(config)
        build_per_layer(self)
        self.post_init()


class LorashearQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = LorashearQwen2Config

    def __init__(self, config):
        super().__init__(config)
        build_per_layer(self)
        self.post_init()


if Qwen3ForCausalLM is not None:
    class LorashearQwen3ForCausalLM(Qwen3ForCausalLM):
        config_class = LorashearQwen3Config

        def __init__(self, config):
            super().__init__(config)
            build_per_layer(self)
            self.post_init()
