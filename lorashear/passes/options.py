"""Pass options that several passes share: one declaration each, so their text and
defaults cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Literal

from lorashear.analysis.allocation import AttnShare
from lorashear.analysis.placement import Placement
from lorashear.data.calibration import CalibrationOptions
from lorashear.passes.base import option
from lorashear.training.runtime import check_device_text, check_precision_text, resolve_placement

#: The ``layerwise`` option's type: true, false or auto.
Layerwise = bool | Literal["auto"]


def device_option(action: str = "train") -> Any:
    """``device``: ``action`` is what the pass does there (train; run the model)."""
    # run-only: a run killed on one device resumes on another (precision is not: bf16 trains
    # another model than fp32)
    return option("auto", f"where to {action}: auto (cuda if available, else cpu), cpu, cuda, cuda:N "
                  "(under torchrun, cuda means cuda:LOCAL_RANK)", run_only=True)


def precision_option() -> Any:
    return option("fp32", "fp32, or bf16/fp16 autocast of forward and loss on CUDA (bf16 also loads "
                  "the frozen base weights in bf16; fp16 scales the loss); CPU trains in fp32")


def run_precision_option() -> Any:
    """``precision`` of a pass that runs the model without training it."""
    return option("fp32", "fp32, or bf16/fp16 on CUDA: the frozen base weights load in that dtype "
                  "(LoRA factors and buffers keep theirs) and forwards run under autocast; "
                  "the CPU runs fp32")


def layerwise_option() -> Any:
    """``layerwise``: stream decoder layers through the device (models larger than it)."""
    # run-only: the layer-wise walk computes what the whole model computes
    return option("auto", "run the calibration batches through one decoder layer at a time, each "
                  "layer's weights read from its file when its turn comes and freed after, the "
                  "hidden states kept on the device (models larger than the device): true, false, "
                  "or auto (when the model's bytes exceed the device's free memory, or the "
                  "available RAM on the CPU)", run_only=True)


def shard_option() -> Any:
    """``shard`` of the training passes: replicate the model on every process, or shard it."""
    # run-only: the sharded run trains what the replicated one trains (up to the order of float
    # sums), and its checkpoints hold whole tensors, so either can resume the other's
    return option("none", "none: every process holds the whole model (data parallel under "
                  "torchrun); fsdp2: under torchrun, each process holds a row-chunk of every "
                  "parameter (FSDP2 per decoder layer; a layer is gathered only while it runs)",
                  run_only=True)


def grad_checkpoint_option() -> Any:
    # run-only: recomputing the activations gives the same gradients (dropout replays its RNG)
    return option(False, "recompute each decoder layer's activations in the backward pass "
                  "(less memory, about one more forward of compute)", run_only=True)


def warmup_option(default: int, why: str) -> Any:
    return option(default, "steps over which the learning rate rises linearly to lr; -1: a third "
                  f"of the steps, at most 50 ({why})")


def attn_share_option(default: AttnShare = "proportional") -> Any:
    """The ``attn-share`` option that ``prune`` and ``lhspg`` share."""
    return option(default, "share of the removed parameters taken from attention groups: a number "
                  "in [0, 1] (0: MLP and the other kinds only); proportional: each kind in "
                  "proportion to its parameters; auto: of proportional and 0, 0.05, ..., 1, the split "
                  "whose masked model has the least loss on the calibration text")


#: Documentation of the scoring options that ``saliency`` and ``prune`` share (``prune``
#: scores the groups itself when no earlier ``saliency`` did).
OPTION_DOCS = {
    "weights": "combined: coefficients of magnitude, avg-magnitude, cosine, taylor1, taylor2",
    "data": "taylor/wanda/obs: calibration text: a text/JSON/Parquet file (the source model's tokenizer), "
            "a .ids file of token ids, a cached source name, or a YAML data spec",
    "batches": "taylor/wanda/obs: calibration batches",
    "batch": "taylor/wanda/obs: windows per calibration batch",
    "seq_len": "taylor/wanda/obs: tokens per calibration window",
    "seed": "seed of the random metric and of the choice of calibration windows",
}


def placement_of(p: Any) -> Placement:
    """The resolved ``device``/``precision`` of a pass with :func:`device_option` and
    :func:`run_precision_option`."""
    return resolve_placement(p.name, p.device, p.precision)


def check_placement_text(p: Any) -> None:
    """Fail at construction on a device or precision text that means nothing."""
    check_device_text(p.name, p.device)
    check_precision_text(p.name, p.precision)


def calibration_options(p: Any) -> CalibrationOptions:
    """The calibration settings of a pass that has the shared scoring options."""
    return CalibrationOptions(p.data, p.batches, p.batch, p.seq_len, p.seed)
