"""Models outside the IR's scope are refused at lowering with one clear error (issue #22,
item 4): state-space and recurrent layers, and encoder-decoders; never a traceback, never a
model whose every channel is pinned."""

from __future__ import annotations

import pytest
import torch

from lorashear.errors import LoweringError, UnsupportedModelError
from lorashear.frontend.lower import lower
from lorashear.frontend.pretrained import lower_pretrained


def _build(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_mamba_is_refused_as_a_state_space_model():
    from transformers import MambaConfig

    model = _build(MambaConfig(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2))
    with pytest.raises(UnsupportedModelError, match=r"model type 'mamba' is a state-space/recurrent "
                       r"model: module backbone\.layers\.0\.mixer \(MambaMixer\) .*A_log"):
        lower(model)


def test_a_hybrid_with_attention_layers_is_refused_too(tmp_path):
    """Jamba interleaves attention and Mamba layers: refused from a saved directory as well,
    also with ``--meta``."""
    from transformers import JambaConfig

    config = JambaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2,
                         attn_layer_offset=1, expert_layer_period=4, mamba_d_state=4, mamba_expand=2,
                         num_experts=2, num_experts_per_tok=1, use_mamba_kernels=False)
    _build(config).save_pretrained(tmp_path)
    for meta in (False, True):
        with pytest.raises(UnsupportedModelError, match="model type 'jamba' is a state-space"):
            lower_pretrained(tmp_path, meta=meta)


def test_rwkv_is_refused_as_a_recurrent_model():
    from transformers import RwkvConfig

    model = _build(RwkvConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                              intermediate_size=64, context_length=64))
    with pytest.raises(UnsupportedModelError, match="model type 'rwkv' .* RWKV time-mixing"):
        lower(model)


def test_an_encoder_decoder_is_refused():
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                        decoder_ffn_dim=48, max_position_embeddings=64)
    model = BartForConditionalGeneration(config).eval()
    with pytest.raises(UnsupportedModelError, match="model type 'bart' is an encoder-decoder model"):
        lower(model)


def test_the_refusal_is_a_lowering_error():
    assert issubclass(UnsupportedModelError, LoweringError)
