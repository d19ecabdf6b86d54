"""Zeroing and slicing parameters by group units: the two sides of the pruning invariant."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from lorashear.analysis.groups import GroupsAttr
from lorashear.errors import PassError
from lorashear.ir.core import Module
from lorashear.ir.storage import DataStorage


def validate_removal(groups: GroupsAttr, removed: dict[int, tuple[int, ...]]) -> None:
    for family_id, units in removed.items():
        if not 0 <= family_id < len(groups.families):
            raise PassError(f"prune mask names family {family_id}, but discover found "
                            f"{len(groups.families)}")
        family = groups.families[family_id]
        bad = [u for u in units if not 0 <= u < family.size]
        if bad:
            raise PassError(f"prune mask removes unit {bad[0]} of family {family_id} "
                            f"({family.kind}, layer {family.layer}), which has {family.size}")
        if len(set(units)) >= family.size:
            raise PassError(f"cannot remove all {family.size} groups of family {family_id} "
                            f"({family.kind}, layer {family.layer})")


def keep_masks(module: Module, groups: GroupsAttr,
               removed: dict[int, tuple[int, ...]]) -> dict[tuple[str, int], torch.Tensor]:
    """Boolean keep mask per (param, axis) touched by a removal."""
    masks: dict[tuple[str, int], torch.Tensor] = {}
    for family_id, units in removed.items():
        if not units:
            continue
        family = groups.families[family_id]
        drop = torch.as_tensor(sorted(units), dtype=torch.long)
        for m in family.members:
            length = module.params[m.param].type.shape[m.axis]
            keep = ~torch.isin(m.unit_of(length, family.size), drop)
            key = (m.param, m.axis)
            masks[key] = masks[key] & keep if key in masks else keep
    return masks


def zero_groups(module: Module, groups: GroupsAttr, removed: dict[int, tuple[int, ...]]) -> int:
    """Set every parameter slice of the removed units to zero (the masked model). Returns
    the number of parameters touched."""
    validate_removal(groups, removed)
    touched = 0
    by_param: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for (name, axis), keep in keep_masks(module, groups, removed).items():
        by_param.setdefault(name, []).append((axis, keep))
    for name, axes in by_param.items():
        param = module.params[name]
        tensor = param.storage.load().clone()
        for axis, keep in axes:
            shape = [1] * tensor.dim()
            shape[axis] = -1
            tensor = tensor * keep.view(shape).to(tensor.dtype)
        param.storage = DataStorage(tensor)
        touched += 1
    return touched


@contextlib.contextmanager
def units_zeroed(model: Any, module: Module, groups: GroupsAttr,
                 removed: dict[int, tuple[int, ...]]) -> Iterator[None]:
    """Zero the removed units' slices in the live tensors of ``model`` (an executor model:
    ``model.tensor(name)``) for the duration of the block, then restore them bit-exactly.
    A cheap look at the masked model without copying the module."""
    validate_removal(groups, removed)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for (name, axis), keep in keep_masks(module, groups, removed).items():
                tensor = model.tensor(name)
                saved.append((tensor, tensor.detach().clone()))
                shape = [1] * tensor.dim()
                shape[axis] = -1
                tensor.mul_(keep.view(shape).to(device=tensor.device, dtype=tensor.dtype))
        yield
    finally:
        with torch.no_grad():
            for tensor, original in reversed(saved):
                tensor.copy_(original)
