"""Public entry points of the LHSPG group projection, with the backend chosen per call.

``backend="auto"`` runs the fused Triton kernels when Triton is importable and the tensors are
on CUDA, and the torch reference otherwise, so the package imports and runs without Triton.
``backend="triton"`` insists on Triton; on CPU tensors it needs ``TRITON_INTERPRET=1`` set
before Triton is imported (the interpreter, for tests). ``backend="torch"`` always runs the
reference.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Literal

import torch

from lorashear.errors import KernelError
from lorashear.kernels.group_projection_ref import (
    group_sq_norms_reference,
    project_groups_reference,
)
from lorashear.kernels.grouped_weight import (
    GroupedWeight,
    GroupProjectionStats,
    as_group_vector,
    check_projection_inputs,
)

Backend = Literal["auto", "torch", "triton"]
"""Which implementation runs: chosen from device and installation, the reference, or Triton."""

_BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """Whether Triton is installed (without importing it: importing it is slow)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or half-installed package
        return False


def _triton_backend() -> ModuleType:
    """Import the Triton kernels on first use; the import compiles nothing yet."""
    try:
        from lorashear.kernels import group_projection_triton
    except ImportError as error:
        raise KernelError(f"the Triton backend cannot be imported: {error}",
                          hint="pip install 'lorashear[gpu]', or use backend='torch'") from error
    return group_projection_triton


def select_backend(backend: Backend, device: torch.device) -> Literal["torch", "triton"]:
    """Resolve ``backend`` for tensors on ``device``; raise if the request cannot be met."""
    if backend not in _BACKENDS:
        raise KernelError(f"unknown kernel backend {backend!r}",
                          hint=f"choose one of {', '.join(_BACKENDS)}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise KernelError("backend='triton' was asked for but Triton is not installed",
                          hint="pip install 'lorashear[gpu]', or use backend='auto'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise KernelError(f"backend='triton' needs CUDA tensors, got {device}",
                          hint="set TRITON_INTERPRET=1 before importing triton to use its CPU "
                               "interpreter, or use backend='torch'")
    return "triton"


def _run_on(backend: Backend, device: torch.device) -> Literal["torch", "triton"]:
    """``select_backend``, falling back to the reference when ``auto`` finds Triton broken."""
    chosen_backend = select_backend(backend, device)
    if chosen_backend == "triton" and backend == "auto":
        try:
            _triton_backend()
        except KernelError as error:
            warnings.warn(f"{error}; using the torch reference", RuntimeWarning, stacklevel=3)
            return "torch"
    return chosen_backend


@torch.no_grad()
def project_groups(weights: Sequence[GroupedWeight], chosen: torch.Tensor,
                   lambdas: torch.Tensor | float, *, eps: float = 0.0,
                   force: torch.Tensor | bool = False,
                   backend: Backend = "auto") -> GroupProjectionStats:
    """One LHSPG half-space projection step over the ``chosen`` groups (DESIGN.md section 5).

    For every chosen group g: merge its LoRA part into ``W``, shrink it by
    ``lambda_g * W_g / ||W_g||``, and zero it when the result leaves the half-space
    ``<x~_g, W_g> >= eps * ||W_g||^2`` (or when ``force`` says so, or it is already zero). The
    weights and their LoRA factors are updated in place (under ``torch.no_grad``, so trainable
    parameters can be passed as they are); elements outside chosen groups are left
    bit-identical.

    Args:
        weights: every weight holding a slice of some group, with its group ids and LoRA.
        chosen: bool[num_groups], the groups this step projects; its length sets num_groups.
        lambdas: float[num_groups] (or one float for all), each >= 0.
        eps: the half-space margin, >= 0 in practice (0 is the plain half-space).
        force: zero every chosen group (True), or the chosen groups of a bool[num_groups] mask,
            whatever the test says: used at the end of a period.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see the module docstring).

    Returns:
        The per-group statistics the adaptive lambda of DHSPG needs.
    """
    if not isinstance(chosen, torch.Tensor) or chosen.dim() != 1:
        raise KernelError("chosen must be a 1-D bool tensor with one entry per group")
    num_groups, device = chosen.numel(), chosen.device
    lambda_vector = as_group_vector(lambdas, num_groups, torch.float32, device)
    force_vector = as_group_vector(force, num_groups, torch.bool, device)
    check_projection_inputs(weights, num_groups, chosen, lambda_vector, force_vector)
    if _run_on(backend, device) == "triton":
        return _triton_backend().project_groups_triton(weights, chosen, lambda_vector, eps,
                                                       force_vector)
    return project_groups_reference(weights, chosen, lambda_vector, eps, force_vector)


@torch.no_grad()
def group_sq_norms(weights: Sequence[GroupedWeight], num_groups: int, *,
                   backend: Backend = "auto") -> torch.Tensor:
    """float32 ``||W_g||^2`` of every group over the base weights (LoRA is not included).

    An element in two groups counts in both; a group with no element gets 0. Reads each weight
    once and changes nothing.
    """
    device = weights[0].weight.device if weights else torch.device("cpu")
    every_group = torch.ones(num_groups, dtype=torch.bool, device=device)
    check_projection_inputs(weights, num_groups, every_group)
    if _run_on(backend, device) == "triton":
        return _triton_backend().group_sq_norms_triton(weights, num_groups, every_group)
    return group_sq_norms_reference(weights, num_groups, every_group)


def group_norms(weights: Sequence[GroupedWeight], num_groups: int, *,
                backend: Backend = "auto") -> torch.Tensor:
    """float32 ``||W_g||`` of every group: the magnitude saliency of DESIGN.md section 4."""
    return group_sq_norms(weights, num_groups, backend=backend).sqrt()
