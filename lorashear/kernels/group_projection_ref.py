"""Torch reference of the LHSPG half-space projection (DESIGN.md section 5).

Written for clarity, not speed: it materialises ``W`` in float32, the full ``D = s * B @ A`` and
``x~`` per weight, and reduces over group ids with ``index_add_`` (no Python loop over groups).
It runs wherever torch runs (CPU, CUDA, float32 or bfloat16 weights; sums are float32) and is
the ground truth the fused Triton kernel is tested against.

For a set of chosen groups, each with ``lambda_g >= 0``::

    x~      = W + D - sum over chosen groups g holding the element of lambda_g * W / ||W_g||
    zero_g  = <x~_g, W_g> < eps * ||W_g||^2   (or forced, or ||W_g|| == 0)
    W      := 0 on elements of a zeroed chosen group, x~ on other elements of chosen groups
    B rows of chosen row members := 0, A columns of chosen column members := 0

The LoRA part of every element of a chosen group is merged into ``W``, which is why its ``B`` rows
and ``A`` columns are cleared: ``W + s * B @ A`` keeps the value ``x~`` there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorashear.kernels.grouped_weight import (
    GroupedWeight,
    GroupProjectionStats,
    half_space_decision,
    shrink_coefficients,
)


@dataclass(frozen=True)
class _Membership:
    """Which elements of one weight belong to which chosen group."""

    row_ids: torch.Tensor
    """int64 row group ids with -1 replaced by 0, safe for indexing (use with the masks)."""
    col_ids: torch.Tensor
    """int64 column group ids with -1 replaced by 0."""
    row_member: torch.Tensor
    """bool (out,): the row belongs to a chosen group."""
    col_chosen: torch.Tensor
    """bool (in,): the column belongs to a chosen group."""
    col_member: torch.Tensor
    """bool (out, in): the element is in its column's chosen group and that group is not
    already its row's group (membership is a set: an element counts once per group)."""


def _membership(grouped: GroupedWeight, chosen: torch.Tensor) -> _Membership:
    row_raw = grouped.row_group.long()
    col_raw = grouped.col_group.long()
    row_ids, col_ids = row_raw.clamp(min=0), col_raw.clamp(min=0)
    row_member = (row_raw >= 0) & chosen[row_ids]
    col_chosen = (col_raw >= 0) & chosen[col_ids]
    col_member = col_chosen[None, :] & (col_raw[None, :] != row_raw[:, None])
    return _Membership(row_ids, col_ids, row_member, col_chosen, col_member)


def _touches_chosen_group(members: _Membership) -> bool:
    """Whether any element of the weight lies in a chosen group (else the weight is skipped)."""
    return bool(members.row_member.any() or members.col_chosen.any())


def _add_group_sums(per_element: torch.Tensor, members: _Membership,
                    into: torch.Tensor) -> None:
    """Add the sum of ``per_element`` over each chosen group's elements of one weight."""
    row_sums = per_element.sum(dim=1)
    into.index_add_(0, members.row_ids[members.row_member], row_sums[members.row_member])
    col_sums = torch.where(members.col_member, per_element, 0.0).sum(dim=0)
    into.index_add_(0, members.col_ids[members.col_chosen], col_sums[members.col_chosen])


def _lora_update(grouped: GroupedWeight) -> torch.Tensor | None:
    """``D = s * B @ A`` in float32, or None without LoRA."""
    if grouped.lora_B is None or grouped.lora_A is None:
        return None
    return (grouped.lora_B.float() @ grouped.lora_A.float()) * grouped.lora_scale


def _trial_point(grouped: GroupedWeight, members: _Membership,
                 coefficient: torch.Tensor) -> torch.Tensor:
    """float32 ``x~ = W + D - (sum of c_g over the element's chosen groups) * W``."""
    base = grouped.weight.float()
    row_shrink = torch.where(members.row_member, coefficient[members.row_ids], 0.0)
    col_shrink = torch.where(members.col_member, coefficient[members.col_ids][None, :], 0.0)
    shrink = row_shrink[:, None] + col_shrink
    lora_update = _lora_update(grouped)
    merged = base if lora_update is None else base + lora_update
    return merged - shrink * base


def group_sq_norms_reference(weights: Sequence[GroupedWeight], num_groups: int,
                             chosen: torch.Tensor) -> torch.Tensor:
    """float32 ``||W_g||^2`` of every chosen group (0 for the others); base weights only."""
    sq_norm = torch.zeros(num_groups, dtype=torch.float32, device=chosen.device)
    for grouped in weights:
        members = _membership(grouped, chosen)
        if _touches_chosen_group(members):
            _add_group_sums(grouped.weight.float().square(), members, sq_norm)
    return sq_norm


def _restrict(grouped: GroupedWeight, chosen: torch.Tensor):
    """The part of a weight that chosen groups touch, and how to write it back.

    When only rows (or only columns) of a weight are chosen, the projection needs just those
    rows (columns) and the matching slice of B (A): computing on the slice instead of the whole
    weight is what makes the CPU reference affordable inside a training step (LHSPG on
    attention and MLP groups touches 1-D or row-only / column-only slices). Mixed weights
    (a chosen row group and a chosen column group) are handled whole. Returns
    ``(view, write_back)`` with ``write_back`` None when ``view`` is the weight itself.
    """
    members = _membership(grouped, chosen)
    rows_chosen, cols_chosen = bool(members.row_member.any()), bool(members.col_chosen.any())
    if rows_chosen == cols_chosen:
        return grouped, None
    if rows_chosen:
        rows = torch.nonzero(members.row_member).flatten()
        view = GroupedWeight(grouped.weight[rows], grouped.row_group[rows], grouped.col_group,
                             None if grouped.lora_B is None else grouped.lora_B[rows],
                             grouped.lora_A, grouped.lora_scale)

        def write_back() -> None:
            grouped.weight[rows] = view.weight
            if grouped.lora_B is not None:
                grouped.lora_B[rows] = view.lora_B
        return view, write_back
    cols = torch.nonzero(members.col_chosen).flatten()
    view = GroupedWeight(grouped.weight[:, cols], grouped.row_group, grouped.col_group[cols],
                         grouped.lora_B, None if grouped.lora_A is None else grouped.lora_A[:, cols],
                         grouped.lora_scale)

    def write_back() -> None:
        grouped.weight[:, cols] = view.weight
        if grouped.lora_A is not None:
            grouped.lora_A[:, cols] = view.lora_A
    return view, write_back


def project_groups_reference(weights: Sequence[GroupedWeight], chosen: torch.Tensor,
                             lambdas: torch.Tensor, eps: float,
                             force: torch.Tensor) -> GroupProjectionStats:
    """One LHSPG projection step over the chosen groups, in place; returns group statistics.

    Arguments are already normalised: ``chosen`` and ``force`` are bool[num_groups],
    ``lambdas`` float[num_groups], all on the weights' device (see ``project_groups`` for the
    checked public entry point). Each pass handles one weight at a time and ``x~`` is rebuilt
    in the last pass instead of kept, so the temporaries stay the size of the largest weight
    even when the groups span a whole model (hidden channels do).
    """
    num_groups = chosen.numel()
    restricted = [_restrict(grouped, chosen) for grouped in weights]
    weights = [view for view, _ in restricted]
    # Pass 1: the norms, which every shrink term below divides by.
    sq_norm = group_sq_norms_reference(weights, num_groups, chosen)
    coefficient = shrink_coefficients(sq_norm, lambdas, chosen)

    # Pass 2: the trial point x~ and its inner product with W per group.
    inner = torch.zeros(num_groups, dtype=torch.float32, device=chosen.device)
    for grouped in weights:
        members = _membership(grouped, chosen)
        if _touches_chosen_group(members):
            trial = _trial_point(grouped, members, coefficient)
            _add_group_sums(trial * grouped.weight.float(), members, inner)

    zeroed = half_space_decision(sq_norm, inner, chosen, eps, force)

    # Pass 3: write W only where a chosen group lies, so every other element stays bit-identical.
    for grouped in weights:
        members = _membership(grouped, chosen)
        if not _touches_chosen_group(members):
            continue
        trial = _trial_point(grouped, members, coefficient)
        row_zeroed = members.row_member & zeroed[members.row_ids]
        col_zeroed = members.col_member & zeroed[members.col_ids][None, :]
        element_zeroed = row_zeroed[:, None] | col_zeroed
        element_chosen = members.row_member[:, None] | members.col_member
        projected = torch.where(element_zeroed, 0.0, trial).to(grouped.weight.dtype)
        grouped.weight.copy_(torch.where(element_chosen, projected, grouped.weight))
        if grouped.lora_B is not None and grouped.lora_A is not None:
            grouped.lora_B.masked_fill_(members.row_member[:, None], 0.0)
            grouped.lora_A.masked_fill_(members.col_chosen[None, :], 0.0)
    for _, write_back in restricted:
        if write_back is not None:
            write_back()

    return GroupProjectionStats(sq_norm=sq_norm, inner=torch.where(chosen, inner, 0.0),
                                zeroed=zeroed)
