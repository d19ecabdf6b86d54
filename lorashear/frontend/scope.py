"""What lowering refuses up front: models whose layers are outside the IR's scope.

The dimension-coupling analysis models decoders built of attention, MLPs and norms. A
state-space or linear-recurrent layer (Mamba's selective scan, a gated delta rule, RWKV's
time mixing, RG-LRU, an LSTM) carries a state along the sequence that no op of the IR
expresses, and an encoder-decoder has two stacks and cross-attention. Such a model is
refused with one :class:`~lorashear.errors.UnsupportedModelError` naming the model type, the
construct and the module, before tracing (which would fail deep inside, or worse, trace a
scan into a graph whose every channel is pinned, so that pruning removes nothing).
"""

from __future__ import annotations

from torch import nn

from lorashear.errors import UnsupportedModelError

#: Parameter names that only recurrent layers have, and the construct each names.
RECURRENT_PARAMETERS: dict[str, str] = {
    "A_log": "a state-space or linear-recurrent layer (a selective scan or gated delta rule "
             "with state decay A_log)",
    "time_decay": "an RWKV time-mixing layer (a linear recurrence with time_decay)",
    "recurrent_param": "an RG-LRU recurrent layer (recurrent_param)",
}

_HINT = ("lorashear prunes decoders built of attention, MLPs and norms; prune this model's "
         "attention and MLP layers with a tool that models its recurrence")


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def refuse_out_of_scope(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` for an encoder-decoder or a model with a
    state-space or recurrent layer; return for anything else."""
    config = getattr(model, "config", None)
    model_type = _model_type(model)
    if getattr(config, "is_encoder_decoder", False) and callable(getattr(model, "get_encoder", None)):
        raise UnsupportedModelError(f"model type {model_type!r} is an encoder-decoder model "
                                    f"({type(model).__name__}): only decoder-only causal LMs are lowered",
                                    hint="lower its decoder alone (the ...ForCausalLM class) if it has one")
    for path, module in model.named_modules():
        if isinstance(module, nn.RNNBase) or "lstm" in type(module).__name__.lower():
            raise UnsupportedModelError(f"model type {model_type!r} is a recurrent model: module "
                                        f"{path or 'top level'} ({type(module).__name__}) is an LSTM/RNN "
                                        "layer, which the IR does not express", hint=_HINT)
        for name, _ in module.named_parameters(recurse=False):
            construct = RECURRENT_PARAMETERS.get(name)
            if construct is not None:
                raise UnsupportedModelError(
                    f"model type {model_type!r} is a state-space/recurrent model: module {path} "
                    f"({type(module).__name__}) is {construct}, which the IR does not express",
                    hint=_HINT)
