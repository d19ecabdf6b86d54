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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lorashear.kernels.grouped_weight import (
    GroupedWeight,
    GroupProjectionStats,
    half_space_decision,
    shrink_coefficients,
)

GroupSumReduce = Callable[[torch.Tensor], None]
"""Sums a float32 per-group vector over the processes that each hold some rows of every
weight, in place (``torch.distributed.all_reduce``): the projection of sharded weights."""

TRIAL_CACHE_BYTES = 512 * 2**20
"""Trial points of restricted slices kept between passes 2 and 3 (a few hundred MB at most;
the rest are rebuilt, which costs a second ``B @ A`` per weight)."""


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
    col_member: torch.Tensor | None
    """bool (out, in): the element is in its column's chosen group and that group is not
    already its row's group (membership is a set: an element counts once per group). None
    when no column is chosen: the (out, in) mask is the costly part of a membership."""
    row_index: torch.Tensor
    """int64 indices of the chosen rows (``row_member``'s nonzeros)."""
    col_index: torch.Tensor
    """int64 indices of the chosen columns (``col_chosen``'s nonzeros)."""

    @property
    def touches_chosen_group(self) -> bool:
        """Whether any element lies in a chosen group (else the weight is skipped)."""
        return bool(self.row_index.numel() or self.col_index.numel())


def _membership(grouped: GroupedWeight, chosen: torch.Tensor) -> _Membership:
    row_raw = grouped.row_group.long()
    col_raw = grouped.col_group.long()
    row_ids, col_ids = row_raw.clamp(min=0), col_raw.clamp(min=0)
    row_member = (row_raw >= 0) & chosen[row_ids]
    col_chosen = (col_raw >= 0) & chosen[col_ids]
    col_index = torch.nonzero(col_chosen).flatten()
    col_member = None
    if col_index.numel():
        col_member = col_chosen[None, :] & (col_raw[None, :] != row_raw[:, None])
    return _Membership(row_ids, col_ids, row_member, col_chosen, col_member,
                       torch.nonzero(row_member).flatten(), col_index)


def _add_group_sums(per_element: torch.Tensor, members: _Membership,
                    into: torch.Tensor) -> None:
    """Add the sum of ``per_element`` over each chosen group's elements of one weight."""
    if members.row_index.numel():
        row_sums = per_element[members.row_index].sum(dim=1)
        into.index_add_(0, members.row_ids[members.row_index], row_sums)
    if members.col_member is not None:
        col_sums = torch.where(members.col_member, per_element, 0.0).sum(dim=0)
        into.index_add_(0, members.col_ids[members.col_index], col_sums[members.col_index])


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
    shrink = row_shrink[:, None]
    if members.col_member is not None:
        shrink = shrink + torch.where(members.col_member, coefficient[members.col_ids][None, :], 0.0)
    lora_update = _lora_update(grouped)
    merged = base if lora_update is None else base + lora_update
    return merged - shrink * base


def group_sq_norms_reference(weights: Sequence[GroupedWeight], num_groups: int,
                             chosen: torch.Tensor) -> torch.Tensor:
    """float32 ``||W_g||^2`` of every chosen group (0 for the others); base weights only."""
    sq_norm = torch.zeros(num_groups, dtype=torch.float32, device=chosen.device)
    for grouped in weights:
        members = _membership(grouped, chosen)
        if members.touches_chosen_group:
            _add_group_sums(grouped.weight.float().square(), members, sq_norm)
    return sq_norm


@dataclass(frozen=True)
class PreparedWeight:
    """One weight's share of a projection: what chosen groups touch, worked out once.

    When only rows (or only columns) of a weight are chosen, the projection needs just those
    rows (columns) and the matching slice of B (A): computing on the slice instead of the whole
    weight is what makes the CPU reference affordable inside a training step (LHSPG on
    attention and MLP groups touches row-only / column-only slices). Mixed weights (a chosen
    row group and a chosen column group) are handled whole.
    """

    grouped: GroupedWeight
    rows: torch.Tensor | None
    """Indices of the chosen rows when only rows are chosen, else None."""
    cols: torch.Tensor | None
    """Indices of the chosen columns when only columns are chosen, else None."""
    members: _Membership
    """Membership of the slice (of the whole weight when neither restriction applies)."""

    def view(self) -> GroupedWeight:
        """The slice with the current values: a copy when restricted, else the weight itself."""
        g = self.grouped
        if self.rows is not None:
            return GroupedWeight(g.weight[self.rows], g.row_group[self.rows], g.col_group,
                                 None if g.lora_B is None else g.lora_B[self.rows], g.lora_A,
                                 g.lora_scale)
        if self.cols is not None:
            return GroupedWeight(g.weight[:, self.cols], g.row_group, g.col_group[self.cols],
                                 g.lora_B, None if g.lora_A is None else g.lora_A[:, self.cols],
                                 g.lora_scale)
        return g

    def write_back(self, view: GroupedWeight) -> None:
        g = self.grouped
        if self.rows is not None:
            g.weight[self.rows] = view.weight
            if g.lora_B is not None:
                g.lora_B[self.rows] = view.lora_B
        elif self.cols is not None:
            g.weight[:, self.cols] = view.weight
            if g.lora_A is not None:
                g.lora_A[:, self.cols] = view.lora_A


def prepare_reference(weights: Sequence[GroupedWeight], chosen: torch.Tensor) -> list[PreparedWeight]:
    """The weights that chosen groups touch, each restricted to its chosen rows or columns."""
    prepared = []
    for grouped in weights:
        members = _membership(grouped, chosen)
        rows_chosen, cols_chosen = bool(members.row_index.numel()), bool(members.col_index.numel())
        if not (rows_chosen or cols_chosen):
            continue
        rows = members.row_index if rows_chosen and not cols_chosen else None
        cols = members.col_index if cols_chosen and not rows_chosen else None
        part = PreparedWeight(grouped, rows, cols, members)
        if rows is not None or cols is not None:
            part = PreparedWeight(grouped, rows, cols, _membership(part.view(), chosen))
        prepared.append(part)
    return prepared


def project_prepared_reference(prepared: Sequence[PreparedWeight], chosen: torch.Tensor,
                               lambdas: torch.Tensor, eps: float, force: torch.Tensor,
                               reduce: GroupSumReduce | None = None) -> GroupProjectionStats:
    """:func:`project_groups_reference` over weights prepared by :func:`prepare_reference`
    for the same ``chosen``: a training loop prepares once per set of chosen groups.

    ``reduce`` (sharded weights: each process holds some rows of every weight) sums a
    per-group vector over the processes in place; it is called on the norms after pass 1 and
    on the inner products after pass 2, so every process decides on the whole groups' sums
    while reading and writing only its own rows."""
    num_groups = chosen.numel()
    views = [part.view() for part in prepared]
    # Pass 1: the norms, which every shrink term below divides by.
    sq_norm = torch.zeros(num_groups, dtype=torch.float32, device=chosen.device)
    for part, view in zip(prepared, views):
        _add_group_sums(view.weight.float().square(), part.members, sq_norm)
    if reduce is not None:
        reduce(sq_norm)
    coefficient = shrink_coefficients(sq_norm, lambdas, chosen)

    # Pass 2: the trial point x~ and its inner product with W per group. The trial points of
    # restricted slices are kept for pass 3 up to a memory budget; whole weights rebuild theirs.
    inner = torch.zeros(num_groups, dtype=torch.float32, device=chosen.device)
    kept: list[torch.Tensor | None] = []
    budget = TRIAL_CACHE_BYTES
    for part, view in zip(prepared, views):
        trial = _trial_point(view, part.members, coefficient)
        _add_group_sums(trial * view.weight.float(), part.members, inner)
        restricted = part.rows is not None or part.cols is not None
        keep = restricted and trial.numel() * trial.element_size() <= budget
        budget -= trial.numel() * trial.element_size() if keep else 0
        kept.append(trial if keep else None)
    if reduce is not None:
        reduce(inner)

    zeroed = half_space_decision(sq_norm, inner, chosen, eps, force)

    # Pass 3: write W only where a chosen group lies, so every other element stays bit-identical.
    for part, view, trial in zip(prepared, views, kept):
        members = part.members
        if trial is None:
            trial = _trial_point(view, members, coefficient)
        row_zeroed = members.row_member & zeroed[members.row_ids]
        element_zeroed = row_zeroed[:, None]
        element_chosen = members.row_member[:, None]
        if members.col_member is not None:
            element_zeroed = element_zeroed | (members.col_member & zeroed[members.col_ids][None, :])
            element_chosen = element_chosen | members.col_member
        projected = torch.where(element_zeroed, 0.0, trial).to(view.weight.dtype)
        view.weight.copy_(torch.where(element_chosen, projected, view.weight))
        if view.lora_B is not None and view.lora_A is not None:
            view.lora_B.masked_fill_(members.row_member[:, None], 0.0)
            view.lora_A.masked_fill_(members.col_chosen[None, :], 0.0)
    for part, view in zip(prepared, views):
        part.write_back(view)

    return GroupProjectionStats(sq_norm=sq_norm, inner=torch.where(chosen, inner, 0.0),
                                zeroed=zeroed)


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
    return project_prepared_reference(prepare_reference(weights, chosen), chosen, lambdas, eps,
                                      force)
