"""The inputs and outputs shared by every LHSPG projection backend.

A removable group is spread over several 2-D weights: rows of some, columns of others. Each
weight says which group each of its rows and columns belongs to, so one
:class:`GroupedWeight` per weight (plus its optional LoRA factors) describes everything the
projection needs, whatever the model architecture.

Membership is a set: element ``(i, j)`` belongs to ``row_group[i]`` and to ``col_group[j]``;
when both ids are the same group the element is in that group once, not twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorashear.errors import KernelError

NO_GROUP = -1
"""Group id of a row or column that belongs to no removable group."""


@dataclass(frozen=True)
class GroupedWeight:
    """One base weight ``W`` (out x in), its group ids, and its LoRA factors if it has any.

    The projection updates ``weight``, ``lora_B`` and ``lora_A`` in place, so the caller's
    parameters change without copies of multi-gigabyte checkpoints.
    """

    weight: torch.Tensor
    """Base weight, shape (out, in), floating point; modified in place."""
    row_group: torch.Tensor
    """Integer group id of every output row (shape (out,)), or -1 when in no group."""
    col_group: torch.Tensor
    """Integer group id of every input column (shape (in,)), or -1 when in no group."""
    lora_B: torch.Tensor | None = None
    """LoRA up-projection, shape (out, r); rows of chosen row members are zeroed in place."""
    lora_A: torch.Tensor | None = None
    """LoRA down-projection, shape (r, in); columns of chosen column members are zeroed."""
    lora_scale: float = 1.0
    """The LoRA scaling ``s`` in ``D = s * B @ A`` (peft's ``lora_alpha / r``)."""

    def __post_init__(self) -> None:
        weight = self.weight
        if weight.dim() != 2 or not weight.is_floating_point():
            raise KernelError(f"weight must be a 2-D floating tensor, got {weight.dim()}-D "
                              f"{weight.dtype}")
        out_features, in_features = weight.shape
        for name, ids, length in (("row_group", self.row_group, out_features),
                                  ("col_group", self.col_group, in_features)):
            if ids.dim() != 1 or ids.numel() != length:
                raise KernelError(f"{name} must have shape ({length},) to match weight "
                                  f"{tuple(weight.shape)}, got {tuple(ids.shape)}")
            if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
                raise KernelError(f"{name} must hold integer group ids, got {ids.dtype}")
            if ids.device != weight.device:
                raise KernelError(f"{name} is on {ids.device} but weight is on {weight.device}")
        if (self.lora_B is None) != (self.lora_A is None):
            raise KernelError("lora_B and lora_A must be given together",
                              hint="pass both LoRA factors, or neither for a weight without LoRA")
        if self.lora_B is not None and self.lora_A is not None:
            lora_b, lora_a = self.lora_B, self.lora_A
            if (lora_b.dim() != 2 or lora_a.dim() != 2 or lora_b.shape[0] != out_features
                    or lora_a.shape[1] != in_features or lora_b.shape[1] != lora_a.shape[0]):
                raise KernelError(f"LoRA factors B {tuple(lora_b.shape)} and A "
                                  f"{tuple(lora_a.shape)} do not fit weight "
                                  f"{tuple(weight.shape)}",
                                  hint="expected B (out, r) and A (r, in)")
            if not (lora_b.is_floating_point() and lora_a.is_floating_point()):
                raise KernelError("LoRA factors must be floating point")
            if lora_b.device != weight.device or lora_a.device != weight.device:
                raise KernelError("LoRA factors must be on the weight's device")

    @property
    def has_lora(self) -> bool:
        """Whether this weight carries a LoRA update."""
        return self.lora_B is not None

    @property
    def lora_rank(self) -> int:
        """The LoRA rank r, 0 without LoRA."""
        return 0 if self.lora_B is None else int(self.lora_B.shape[1])


@dataclass(frozen=True)
class GroupProjectionStats:
    """Per-group statistics of one projection step, for the optimizer's adaptive lambda.

    Every tensor has one entry per group id; entries of groups that were not chosen are zero
    (``False`` for ``zeroed``).
    """

    sq_norm: torch.Tensor
    """float32 ``||W_g||^2`` over all elements of the group, before the step."""
    inner: torch.Tensor
    """float32 ``<x~_g, W_g>``: the half-space test's left-hand side."""
    zeroed: torch.Tensor
    """bool: the group was projected to exactly zero."""


def check_projection_inputs(weights: Sequence[GroupedWeight], num_groups: int,
                            chosen: torch.Tensor | None = None,
                            lambdas: torch.Tensor | None = None,
                            force: torch.Tensor | None = None) -> torch.device:
    """Check that the inputs of one call fit together; return their common device.

    Group-id ranges and lambda signs need the data, so they are checked with one
    device-to-host sync for the whole call rather than one per tensor.
    """
    if num_groups < 0:
        raise KernelError(f"num_groups must be >= 0, got {num_groups}")
    devices = {grouped.weight.device for grouped in weights}
    for name, per_group in (("chosen", chosen), ("lambdas", lambdas), ("force", force)):
        if per_group is None:
            continue
        if per_group.shape != (num_groups,):
            raise KernelError(f"{name} must have shape ({num_groups},), got "
                              f"{tuple(per_group.shape)}")
        devices.add(per_group.device)
    if len(devices) > 1:
        raise KernelError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    if chosen is not None and chosen.dtype != torch.bool:
        raise KernelError(f"chosen must be a bool mask, got {chosen.dtype}")
    if force is not None and force.dtype != torch.bool:
        raise KernelError(f"force must be a bool or a bool mask, got {force.dtype}")

    if lambdas is not None and not lambdas.is_floating_point():
        raise KernelError(f"lambdas must be floating point, got {lambdas.dtype}")
    no_value = torch.zeros((), dtype=torch.float64, device=device)
    lowest_ids = [ids.min().double() for grouped in weights
                  for ids in (grouped.row_group, grouped.col_group) if ids.numel()]
    highest_ids = [ids.max().double() for grouped in weights
                   for ids in (grouped.row_group, grouped.col_group) if ids.numel()]
    summary = torch.stack([
        torch.stack(lowest_ids).min() if lowest_ids else no_value - 1,
        torch.stack(highest_ids).max() if highest_ids else no_value - 1,
        lambdas.min().double() if lambdas is not None and lambdas.numel() else no_value,
    ])
    lowest_id, highest_id, lowest_lambda = summary.tolist()
    if lowest_id < NO_GROUP or highest_id >= num_groups:
        raise KernelError(f"group ids must lie in [-1, {num_groups - 1}], found ids from "
                          f"{lowest_id:g} to {highest_id:g}",
                          hint="pass num_groups = 1 + the largest group id")
    if not lowest_lambda >= 0:  # also catches NaN
        raise KernelError(f"lambdas must be >= 0, found {lowest_lambda:g}")
    return device


def as_group_vector(value: torch.Tensor | float | bool, num_groups: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """Broadcast a per-call scalar (one lambda, one force flag) to one entry per group.

    A 1-D tensor is returned as it is, so that :func:`check_projection_inputs` can report a
    wrong length, device or dtype instead of a silent conversion hiding it.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return value.to(device=device, dtype=dtype).expand(num_groups)
        return value
    return torch.full((num_groups,), value, dtype=dtype, device=device)


def half_space_decision(sq_norm: torch.Tensor, inner: torch.Tensor, chosen: torch.Tensor,
                        eps: float, force: torch.Tensor) -> torch.Tensor:
    """Which chosen groups the half-space projection zeroes.

    A group is zeroed when ``x~_g`` left the half-space ``<x, W_g> >= eps ||W_g||^2`` (the
    step crossed too far towards zero to keep the group's direction), when forced (end of a
    period), or when it is already zero (nothing left to keep).
    """
    return chosen & (force | (sq_norm <= 0) | (inner < eps * sq_norm))


def shrink_coefficients(sq_norm: torch.Tensor, lambdas: torch.Tensor,
                        chosen: torch.Tensor) -> torch.Tensor:
    """``lambda_g / ||W_g||`` for chosen groups with a nonzero norm, 0 elsewhere.

    A zero-norm group has ``W_g = 0``, so its shrink term ``lambda_g W / ||W_g||`` is taken as
    zero instead of 0/0.
    """
    norm = sq_norm.sqrt()
    active = chosen & (norm > 0)
    return torch.where(active, lambdas.float() / torch.where(active, norm, 1.0),
                       torch.zeros_like(norm))
