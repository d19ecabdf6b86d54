"""Layer-wise calibration: a model larger than the device, run one decoder layer at a time.

As Wanda and SparseGPT do on one GPU: every calibration batch's values at the current layer
boundary (the residual stream, the rotary tables, the mask) stay on the device, and the graph's
segments (:func:`~lorashear.runtime.executor.layer_segments`: one per decoder layer, and the
runs between them) come in one at a time. A segment's parameters are read from their files
when its turn comes (:func:`~lorashear.analysis.placement.read_stored`: plain reads, no memory
map left behind), every batch goes through it, and they are freed before the next segment. The
peak is one segment's weights plus the batches' boundary values, not the model.

Every op runs on the same inputs as in a whole-model forward, through the same ``run_op``, so
what a walk measures equals the whole model's: bit for bit on one device and thread count,
except where a float64 sum over a weight used by two ops is taken in another order.

- :class:`LayerWalk`: the segments, the values live at each boundary, one segment's run;
- :func:`variant_losses`: the mean LM loss of the model and of variants of it with some
  parameters edited (``knowledge``'s zeroed families), each variant run only from the first
  segment that reads an edited parameter, all in one walk; :func:`layerwise_masked_loss_fn`,
  ``prune``'s ``attn-share=auto`` measure, is one such walk per split;
- the linear-input walk of :mod:`lorashear.analysis.saliency` (wanda, ``reconstruct``'s grams)
  takes ``layerwise=True``.

The gradient metric (``taylor``) runs a layer-by-layer forward that keeps every batch's
values at each boundary, then a layer-by-layer backward
(:func:`lorashear.analysis.saliency.layerwise_gradient_scores`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lorashear.analysis.groups import GroupsAttr
from lorashear.analysis.masking import keep_masks, validate_removal
from lorashear.analysis.placement import Placement
from lorashear.errors import PassError
from lorashear.ir.core import Module, Op, Param
from lorashear.ir.interpret import run_op
from lorashear.runtime.executor import Segment, layer_segments

#: An in-place edit of (a copy of) one loaded parameter tensor.
Edit = Callable[[torch.Tensor], None]


def use_layerwise(pass_name: str, layerwise: bool | str, module: Module, placement: Placement) -> bool:
    """Whether a pass's ``layerwise`` option means a layer-wise walk: ``auto`` when the
    module's parameters in the run dtype take more than the device has free."""
    if layerwise == "auto":
        return placement.param_bytes(module) > placement.free_bytes()
    if not isinstance(layerwise, bool):
        raise PassError(f"{pass_name}: layerwise={layerwise!r} is not one of auto, true, false")
    return layerwise


def input_env(module: Module, ids: torch.Tensor) -> dict[int, Any]:
    """The graph inputs of one batch of token ids (calibration feeds ``input_ids`` only)."""
    env: dict[int, Any] = {}
    for v in module.graph.inputs:
        if v.name == "input_ids":
            env[id(v)] = ids
        elif v.name == "attention_mask":
            env[id(v)] = torch.ones_like(ids)
        else:
            raise PassError(f"the graph needs input {v.name!r}; calibration feeds only input_ids")
    return env


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The executor's LM loss (next-token cross entropy in float32)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


@dataclass
class LayerWalk:
    """A module's segments with what each needs: its ops (with their index in the graph),
    the parameters it reads, and the last op that reads each value (so a value is freed as soon
    as it is dead, as the whole-model walk frees it)."""

    module: Module
    placement: Placement
    segments: list[Segment]
    indexed: list[list[tuple[int, Op]]]
    last_use: dict[int, int]
    keep: set[int]

    @classmethod
    def of(cls, module: Module, placement: Placement) -> LayerWalk:
        segments = layer_segments(module)
        indexed, index = [], 0
        for segment in segments:
            indexed.append([(index + i, op) for i, op in enumerate(segment.ops)])
            index += len(segment.ops)
        last_use: dict[int, int] = {}
        for index, op in enumerate(module.graph.ops):
            for v in op.operands():
                last_use[id(v)] = index
        return cls(module, placement, segments, indexed, last_use, {id(v) for v in module.graph.outputs})

    def live_sets(self) -> list[set[int]]:
        """``live[k]``: ids of the values that segment ``k`` or a later one reads and that
        an earlier segment (or the graph's inputs) made: what a boundary must hold."""
        made_in = {id(v): -1 for v in self.module.graph.inputs}
        for k, segment in enumerate(self.segments):
            made_in.update({id(r): k for op in segment.ops for r in op.results})
        live: list[set[int]] = [set() for _ in self.segments]
        reads_after: set[int] = {id(v) for v in self.module.graph.outputs}
        for k in reversed(range(len(self.segments))):
            reads_after |= set(self.segments[k].inputs)
            live[k] = {v for v in reads_after if made_in.get(v, -1) < k}
        return live

    def param_names(self, k: int) -> list[str]:
        """The parameters segment ``k`` reads, in order of first use."""
        return list(dict.fromkeys(p.name for op in self.segments[k].ops for p in op.params()))

    def first_reader(self) -> dict[str, int]:
        """Parameter name -> the first segment that reads it."""
        first: dict[str, int] = {}
        for k in range(len(self.segments)):
            for name in self.param_names(k):
                first.setdefault(name, k)
        return first

    def load(self, k: int) -> dict[str, torch.Tensor]:
        """Segment ``k``'s parameters on the device, read from their storage now."""
        load = self.placement.param_loader(self.module, by_reference=True)
        params = {p.name: p for op in self.segments[k].ops for p in op.params()}
        return {name: load(param) for name, param in params.items()}

    def run(self, k: int, env: dict[int, Any], tensors: Mapping[str, torch.Tensor],
            visit: Callable[[Op, dict[int, Any]], None] | None = None) -> None:
        """Run segment ``k`` on ``env`` (one batch's live values), freeing dead values;
        ``visit(op, env)`` sees each op's results before its dead inputs go."""
        device = self.placement.device

        def param(p: Param) -> torch.Tensor:
            return tensors[p.name]

        for index, op in self.indexed[k]:
            run_op(op, env, param, device=device)
            if visit is not None:
                visit(op, env)
            for v in op.operands():
                if self.last_use.get(id(v)) == index and id(v) not in self.keep:
                    env.pop(id(v), None)


def variant_losses(module: Module, batches: Iterable[torch.Tensor], placement: Placement,
                   variants: Mapping[Any, Mapping[str, Edit]], *, base: bool = True
                   ) -> tuple[float | None, dict[Any, float]]:
    """(mean LM loss of the model, mean loss of each variant) over ``batches``, in one
    layer-wise walk. A variant edits some parameters in place (``name -> edit``) and is run
    only from the first segment that reads one of them, starting from the model's values at
    that boundary; its edits are applied to copies of each segment's loaded tensors. A
    variant that edits nothing any op reads has the model's loss.
    ``base=False`` skips the model's own loss where no variant needs its values (all start
    at the first segment); the first value is then None."""
    walk = LayerWalk.of(module, placement)
    batches = [placement.to_device(b) for b in batches]
    if not batches:
        raise PassError("a layer-wise loss needs at least one calibration batch")
    first = walk.first_reader()
    count = len(walk.segments)
    start = {key: min((first[n] for n in edits if n in first), default=count)
             for key, edits in variants.items()}
    needs_base = base or any(s > 0 for s in start.values())
    output = id(module.graph.outputs[0])
    base_envs = [input_env(module, b) for b in batches] if needs_base else []
    base_losses: list[float] = []
    flight: dict[Any, list[dict[int, Any]]] = {}
    losses: dict[Any, list[float]] = {key: [] for key in variants}
    with torch.no_grad(), placement.autocast():
        for k in range(count):
            tensors = walk.load(k)
            for key in variants:
                if start[key] == k:  # the model's values at this boundary, shared by reference
                    flight[key] = ([dict(env) for env in base_envs] if needs_base
                                   else [input_env(module, b) for b in batches])
            for key, envs in flight.items():
                edited = dict(tensors)
                for name, edit in variants[key].items():
                    if name in tensors:  # a copy: the loaded tensor may be the module's own data
                        edited[name] = tensors[name].clone()
                        edit(edited[name])
                for env, batch in zip(envs, batches, strict=True):
                    walk.run(k, env, edited)
                    if output in env:
                        losses[key].append(float(lm_loss(env.pop(output), batch)))
                del edited
            if needs_base:
                for env, batch in zip(base_envs, batches, strict=True):
                    walk.run(k, env, tensors)
                    if output in env:
                        base_losses.append(float(lm_loss(env.pop(output), batch)))
            del tensors
    model_loss = sum(base_losses) / len(batches) if needs_base else None
    result = {}
    for key in variants:
        if start[key] == count:
            result[key] = model_loss
        else:
            result[key] = sum(losses[key]) / len(batches)
    return model_loss, result


def zero_edit(tensor: torch.Tensor) -> None:
    """The edit that zeroes a parameter (a family removed whole)."""
    tensor.zero_()


def keep_edit(keep: torch.Tensor, axis: int) -> Edit:
    """The edit that zeroes the slices of ``axis`` outside the bool mask ``keep``."""

    def edit(tensor: torch.Tensor) -> None:
        shape = [1] * tensor.dim()
        shape[axis] = -1
        tensor.mul_(keep.view(shape).to(device=tensor.device, dtype=tensor.dtype))
    return edit


def layerwise_masked_loss_fn(module: Module, groups: GroupsAttr, batches: Iterable[torch.Tensor],
                             placement: Placement) -> Callable[[dict[int, tuple[int, ...]]], float]:
    """:func:`~lorashear.analysis.allocation.masked_loss_fn` layer-wise: ``loss_of(removed)``
    is the mean LM loss with those units zeroed, one walk through the layers per call."""
    batches = list(batches)

    def loss_of(removed: dict[int, tuple[int, ...]]) -> float:
        validate_removal(groups, removed)
        edits = {name: keep_edit(keep, axis)
                 for (name, axis), keep in keep_masks(module, groups, removed).items()}
        return variant_losses(module, batches, placement, {"split": edits}, base=False)[1]["split"]
    return loss_of

