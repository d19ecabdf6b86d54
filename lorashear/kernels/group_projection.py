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
    GroupSumReduce,
    group_sq_norms_reference,
    prepare_reference,
    project_groups_reference,
    project_prepared_reference,
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


class ProjectionPlan:
    """LHSPG's projection of one fixed set of chosen groups: prepared once, run every step.

    A training loop projects the same groups after every optimizer step of a period. Which
    rows and columns of each weight the chosen groups hold, the kernel launch set-up and the
    input checks (with their host syncs) depend only on the groups, so the plan does them once
    and :meth:`step` does only the arithmetic. ``done`` names groups that are already exactly
    zero (earlier periods): training moves their LoRA rows and columns, so each step clears
    those again, but their base weights stay zero and are not read. With ``cuda_graph=True``
    (Triton backend on CUDA) the step is captured once as a CUDA graph and then replayed: one
    host call instead of three launches per weight and a dozen small torch ops, which at a
    135M model's 210 weights cost more than the kernels themselves (``bench/RESULTS.md``,
    "Ablations and component measurements": "LHSPG projection per call on a GPU"). The graph
    path is off by default until it has been measured on a GPU (``bench/gpu_check.py`` checks
    it against eager runs).

    Sharded weights (``shard=fsdp2``: each process holds some rows of every weight, and the
    ``weights`` given are those rows with their group ids): ``reduce`` sums a per-group vector
    over the processes in place, and the plan calls it on the partial group sums (norms,
    inner products of the trial point with the base slice) between the kernel passes, so
    every process takes the same decisions while no whole weight is ever gathered.

    Results equal :func:`project_groups` over ``chosen | done`` (``done`` groups report zero
    norms and ``zeroed``). The returned statistics live in the plan's buffers when a CUDA
    graph runs: read them before the next :meth:`step`.
    """

    def __init__(self, weights: Sequence[GroupedWeight], chosen: torch.Tensor, *,
                 done: torch.Tensor | None = None, backend: Backend = "auto",
                 cuda_graph: bool = False, reduce: GroupSumReduce | None = None) -> None:
        if not isinstance(chosen, torch.Tensor) or chosen.dim() != 1:
            raise KernelError("chosen must be a 1-D bool tensor with one entry per group")
        if cuda_graph and reduce is not None:
            raise KernelError("a projection whose group sums are reduced over processes cannot "
                              "be captured as a CUDA graph", hint="cuda_graph=False")
        self._reduce = reduce
        num_groups, device = chosen.numel(), chosen.device
        done = torch.zeros_like(chosen) if done is None else done
        check_projection_inputs(weights, num_groups, chosen, force=done)
        self.chosen, self.done = chosen.clone(), done & ~chosen
        self.backend = _run_on(backend, device)
        if self.backend == "triton":
            self._prepared = _triton_backend().PreparedTriton(weights, self.chosen)
        else:
            self._prepared = prepare_reference(weights, self.chosen)
        self._clear = []  # (B, rows, A, columns) of done groups, per weight with LoRA
        for grouped in weights:
            if grouped.lora_B is None or grouped.lora_A is None:
                continue
            rows = torch.nonzero((grouped.row_group >= 0)
                                 & self.done[grouped.row_group.clamp(min=0).long()]).flatten()
            cols = torch.nonzero((grouped.col_group >= 0)
                                 & self.done[grouped.col_group.clamp(min=0).long()]).flatten()
            if rows.numel() or cols.numel():
                self._clear.append((grouped.lora_B, rows, grouped.lora_A, cols))
        self._lambdas = torch.zeros(num_groups, dtype=torch.float32, device=device)
        self._force = torch.zeros(num_groups, dtype=torch.bool, device=device)
        self._use_graph = cuda_graph and self.backend == "triton" and device.type == "cuda"
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_eps: float | None = None
        self._graph_stats: GroupProjectionStats | None = None
        self._eager_runs = 0

    @torch.no_grad()
    def step(self, lambdas: torch.Tensor | float, *, eps: float = 0.0,
             force: torch.Tensor | bool = False) -> GroupProjectionStats:
        """One projection step, in place (arguments as for :func:`project_groups`)."""
        num_groups, device = self.chosen.numel(), self.chosen.device
        self._lambdas.copy_(as_group_vector(lambdas, num_groups, torch.float32, device))
        self._force.copy_(as_group_vector(force, num_groups, torch.bool, device))
        if not self._use_graph:
            return self._run(eps)
        if self._graph is not None and self._graph_eps == eps:
            self._graph.replay()
            return self._graph_stats
        if self._eager_runs == 0:  # the first run compiles the kernels, outside any capture
            self._eager_runs += 1
            return self._run(eps)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                stats = self._run(eps)
        except RuntimeError as error:  # a driver or build without graph capture: run eagerly
            warnings.warn(f"CUDA graph capture of the projection failed ({error}); "
                          "running it eagerly", RuntimeWarning, stacklevel=2)
            self._use_graph = False
            return self._run(eps)
        self._graph, self._graph_eps, self._graph_stats = graph, eps, stats
        graph.replay()  # capturing records the work without doing it
        return stats

    def _run(self, eps: float) -> GroupProjectionStats:
        for lora_b, rows, lora_a, cols in self._clear:
            lora_b.index_fill_(0, rows, 0.0)
            lora_a.index_fill_(1, cols, 0.0)
        if self.backend == "triton":
            stats = self._prepared.run(self.chosen, self._lambdas, eps, self._force,
                                       self._reduce)
        else:
            stats = project_prepared_reference(self._prepared, self.chosen, self._lambdas, eps,
                                               self._force, self._reduce)
        return GroupProjectionStats(sq_norm=stats.sq_norm, inner=stats.inner,
                                    zeroed=stats.zeroed | self.done)


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
