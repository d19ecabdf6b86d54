"""Fused Triton implementation of the LHSPG half-space projection.

Same semantics as :mod:`lorashear.kernels.group_projection_ref` (read its docstring first); this
module only changes how the work is scheduled so that every weight is streamed through the chip
as few times as the math allows:

1. ``_group_sums_kernel`` reads each tile of ``W`` once, rebuilds the LoRA tile
   ``D = s * B @ A`` on the fly from the ``B`` rows and ``A`` columns of that tile (a small
   ``tl.dot`` of inner size r; the full ``B @ A`` never exists in memory), and accumulates per
   group ``S_g = ||W_g||^2`` and ``P_g = <(W + D)_g, W_g>`` with atomics after reducing the tile
   along rows (for row groups) and columns (for column groups).
2. The host turns these into the shrink coefficients ``c_g = lambda_g / ||W_g||`` and the
   half-space test. ``<x~_g, W_g> = P_g - c_g S_g - R_g``, where ``R_g`` is the shrink of the
   *other* chosen group of elements that lie in two chosen groups (a chosen row group and a
   different chosen column group of the same weight). ``R`` needs the norms first, so only
   weights that have both chosen rows and chosen columns get an extra ``W``-only pass,
   ``_overlap_correction_kernel``, that reads just those overlapping elements.
3. ``_project_kernel`` reads ``W`` again, rebuilds ``D``, and writes ``x~`` or 0 in place, once,
   to the elements of chosen groups only. ``B`` rows and ``A`` columns are then zeroed by torch
   (they are (out + in) * r values, negligible next to ``W``).

Memory traffic (memory-bound by design: the limit is HBM bandwidth). Per element of ``W`` that
lies in a chosen group, with ``w`` the element size (2 for bf16, 4 for fp32): pass 1 reads ``w``
bytes, pass 3 reads ``w`` and writes ``w``, so ``3w`` bytes (6 B for bf16, 12 B for fp32), plus
``w`` for elements in two chosen groups. Elements outside chosen groups cost almost nothing:
loads and stores are masked per element and a weight with no chosen member launches nothing
(the hardware still moves whole 32-byte sectors, so an isolated chosen column of a row-major
weight costs one sector per row). On top of that passes 1 and 3 each read ``B`` and ``A`` from
HBM once ((out + in) * r elements; the repeated tile reads hit L2), and every pass reads 4 bytes
of group id per row and column. The two reads of ``W`` are inherent: ``x~`` divides by the norm
of the whole group, which spans many tiles and several weights.

Sums use float32 atomics, so their rounding (and a half-space decision sitting exactly on the
threshold) can differ from run to run in the last bits. LoRA tiles in bf16/fp16 go through the
tensor cores with float32 accumulation (products of 16-bit floats are exact in float32); float32
factors use the IEEE-exact dot instead of TF32 so results match the reference (at a large rank
that CUDA-core dot, r multiply-adds per element, can become the limit instead of bandwidth).

Set ``TRITON_INTERPRET=1`` before this module is first imported to run the kernels on the CPU
through Triton's interpreter (about 10^4 times slower than torch: tests only).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from lorashear.errors import KernelError
from lorashear.kernels.grouped_weight import (
    GroupedWeight,
    GroupProjectionStats,
    half_space_decision,
    shrink_coefficients,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether the kernels of this process were built for Triton's CPU interpreter (fixed at import:
Triton decides it when ``@triton.jit`` runs)."""

DEFAULT_BLOCK_M = 64
"""Rows of ``W`` per program. With ``DEFAULT_BLOCK_N`` a tile of 8192 elements: large enough to
hide memory latency, and the LoRA rebuild reuses each ``B`` row over 128 columns."""
DEFAULT_BLOCK_N = 128
"""Columns of ``W`` per program (the contiguous axis of a row-major weight)."""
DEFAULT_NUM_WARPS = 8

_MIN_DOT_SIZE = 16
"""``tl.dot`` needs every dimension of its operands to be at least 16."""


@triton.jit
def _tile_indices(stride_wm, stride_wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The rows and columns of ``W`` this program's tile covers, and their element offsets."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_offsets = rows.to(tl.int64)[:, None] * stride_wm + cols.to(tl.int64)[None, :] * stride_wn
    return rows, cols, w_offsets


@triton.jit
def _tile_membership(row_group_ptr, col_group_ptr, chosen_ptr, rows, cols, n_rows, n_cols):
    """Group ids of a tile's rows and columns and which elements lie in chosen groups.

    ``col_member`` is per element: an element whose column group equals its row group is in
    that group once, through its row.
    """
    row_in = rows < n_rows
    col_in = cols < n_cols
    row_id = tl.load(row_group_ptr + rows, mask=row_in, other=-1)
    col_id = tl.load(col_group_ptr + cols, mask=col_in, other=-1)
    row_member = tl.load(chosen_ptr + row_id, mask=row_id >= 0, other=0) != 0
    col_chosen = tl.load(chosen_ptr + col_id, mask=col_id >= 0, other=0) != 0
    col_member = col_chosen[None, :] & (col_id[None, :] != row_id[:, None]) & row_in[:, None]
    element_chosen = (row_member[:, None] & col_in[None, :]) | col_member
    return row_id, col_id, row_member, col_chosen, col_member, element_chosen


@triton.jit
def _lora_tile(b_ptr, stride_bm, stride_bk, a_ptr, stride_ak, stride_an, rows, cols, n_rows,
               n_cols, rank, lora_scale, BLOCK_R: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """``s * B[rows, :] @ A[:, cols]`` in float32, padded with zeros past the rank and edges."""
    ranks = tl.arange(0, BLOCK_R)
    rank_in = ranks < rank
    b_tile = tl.load(b_ptr + rows.to(tl.int64)[:, None] * stride_bm + ranks[None, :] * stride_bk,
                     mask=(rows < n_rows)[:, None] & rank_in[None, :], other=0.0)
    a_tile = tl.load(a_ptr + ranks[:, None] * stride_ak + cols.to(tl.int64)[None, :] * stride_an,
                     mask=rank_in[:, None] & (cols < n_cols)[None, :], other=0.0)
    if DOT_IN_FP32:
        update = tl.dot(b_tile.to(tl.float32), a_tile.to(tl.float32), input_precision="ieee")
    else:
        update = tl.dot(b_tile, a_tile)
    return update * lora_scale


@triton.jit
def _scatter_tile_sums(values, row_id, row_member, col_id, col_chosen, col_member, sums_ptr):
    """Add a tile's per-element ``values`` into the sums of the groups holding them.

    Reducing the tile first leaves one atomic per row and per column instead of one per element.
    ``values`` must be 0 wherever an element is not in a chosen group.
    """
    tl.atomic_add(sums_ptr + row_id, tl.sum(values, axis=1), mask=row_member, sem="relaxed")
    col_values = tl.where(col_member, values, 0.0)
    tl.atomic_add(sums_ptr + col_id, tl.sum(col_values, axis=0), mask=col_chosen, sem="relaxed")


@triton.jit
def _group_sums_kernel(w_ptr, stride_wm, stride_wn, b_ptr, stride_bm, stride_bk, a_ptr,
                       stride_ak, stride_an, row_group_ptr, col_group_ptr, chosen_ptr,
                       sq_norm_ptr, merged_inner_ptr, n_rows, n_cols, rank, lora_scale,
                       WITH_INNER: tl.constexpr, HAS_LORA: tl.constexpr,
                       DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_R: tl.constexpr):
    """Pass 1: ``S_g += sum W^2`` and (``WITH_INNER``) ``P_g += sum (W + D) * W``."""
    rows, cols, w_offsets = _tile_indices(stride_wm, stride_wn, BLOCK_M, BLOCK_N)
    row_id, col_id, row_member, col_chosen, col_member, element_chosen = _tile_membership(
        row_group_ptr, col_group_ptr, chosen_ptr, rows, cols, n_rows, n_cols)
    base = tl.load(w_ptr + w_offsets, mask=element_chosen, other=0.0).to(tl.float32)
    squares = base * base
    _scatter_tile_sums(squares, row_id, row_member, col_id, col_chosen, col_member, sq_norm_ptr)
    if WITH_INNER:
        merged_times_base = squares
        if HAS_LORA:
            update = _lora_tile(b_ptr, stride_bm, stride_bk, a_ptr, stride_ak, stride_an, rows,
                                cols, n_rows, n_cols, rank, lora_scale, BLOCK_R, DOT_IN_FP32)
            merged_times_base = (base + update) * base
        _scatter_tile_sums(merged_times_base, row_id, row_member, col_id, col_chosen, col_member,
                           merged_inner_ptr)


@triton.jit
def _overlap_correction_kernel(w_ptr, stride_wm, stride_wn, row_group_ptr, col_group_ptr,
                               chosen_ptr, coefficient_ptr, correction_ptr, n_rows, n_cols,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pass 2: ``R_g += sum W^2 * c_h`` over elements of g that also lie in chosen group h."""
    rows, cols, w_offsets = _tile_indices(stride_wm, stride_wn, BLOCK_M, BLOCK_N)
    row_id, col_id, row_member, col_chosen, col_member, element_chosen = _tile_membership(
        row_group_ptr, col_group_ptr, chosen_ptr, rows, cols, n_rows, n_cols)
    in_two_groups = row_member[:, None] & col_member
    base = tl.load(w_ptr + w_offsets, mask=in_two_groups, other=0.0).to(tl.float32)
    squares = base * base
    row_coefficient = tl.load(coefficient_ptr + row_id, mask=row_member, other=0.0)
    col_coefficient = tl.load(coefficient_ptr + col_id, mask=col_chosen, other=0.0)
    tl.atomic_add(correction_ptr + row_id, tl.sum(squares * col_coefficient[None, :], axis=1),
                  mask=row_member, sem="relaxed")
    tl.atomic_add(correction_ptr + col_id, tl.sum(squares * row_coefficient[:, None], axis=0),
                  mask=col_chosen, sem="relaxed")


@triton.jit
def _project_kernel(w_ptr, stride_wm, stride_wn, b_ptr, stride_bm, stride_bk, a_ptr, stride_ak,
                    stride_an, row_group_ptr, col_group_ptr, chosen_ptr, coefficient_ptr,
                    zeroed_ptr, n_rows, n_cols, rank, lora_scale, HAS_LORA: tl.constexpr,
                    DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    """Pass 3: write ``x~`` (or 0 in zeroed groups) over the chosen elements of ``W``."""
    rows, cols, w_offsets = _tile_indices(stride_wm, stride_wn, BLOCK_M, BLOCK_N)
    row_id, col_id, row_member, col_chosen, col_member, element_chosen = _tile_membership(
        row_group_ptr, col_group_ptr, chosen_ptr, rows, cols, n_rows, n_cols)
    w_pointers = w_ptr + w_offsets
    base = tl.load(w_pointers, mask=element_chosen, other=0.0).to(tl.float32)
    row_coefficient = tl.load(coefficient_ptr + row_id, mask=row_member, other=0.0)
    col_coefficient = tl.load(coefficient_ptr + col_id, mask=col_chosen, other=0.0)
    shrink = row_coefficient[:, None] + tl.where(col_member, col_coefficient[None, :], 0.0)
    merged = base
    if HAS_LORA:
        merged = base + _lora_tile(b_ptr, stride_bm, stride_bk, a_ptr, stride_ak, stride_an, rows,
                                   cols, n_rows, n_cols, rank, lora_scale, BLOCK_R, DOT_IN_FP32)
    trial = merged - shrink * base
    row_zeroed = tl.load(zeroed_ptr + row_id, mask=row_member, other=0) != 0
    col_zeroed = tl.load(zeroed_ptr + col_id, mask=col_chosen, other=0) != 0
    element_zeroed = row_zeroed[:, None] | (col_member & col_zeroed[None, :])
    projected = tl.where(element_zeroed, 0.0, trial)
    tl.store(w_pointers, projected.to(w_ptr.dtype.element_ty), mask=element_chosen)


class _Launch:
    """Launch arguments of one weight: tensors made kernel-ready, strides, grid, block sizes."""

    def __init__(self, grouped: GroupedWeight, block_m: int, block_n: int) -> None:
        weight = grouped.weight
        self.weight = weight
        self.row_group = grouped.row_group.to(torch.int32).contiguous()
        self.col_group = grouped.col_group.to(torch.int32).contiguous()
        self.n_rows, self.n_cols = weight.shape
        self.block_m, self.block_n = block_m, block_n
        self.grid = (triton.cdiv(self.n_rows, block_m), triton.cdiv(self.n_cols, block_n))
        self.has_lora = grouped.lora_B is not None and grouped.lora_A is not None
        self.rank = grouped.lora_rank
        self.block_r = max(_MIN_DOT_SIZE, triton.next_power_of_2(max(self.rank, 1)))
        self.lora_scale = float(grouped.lora_scale)
        if grouped.lora_B is not None and grouped.lora_A is not None:
            lora_b, lora_a = grouped.lora_B, grouped.lora_A
            # The interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton
            # issue 11584, "not supported yet"), so under it the factors go through float32,
            # which gives the same products: 16-bit products are exact in float32.
            self.dot_in_fp32 = INTERPRETED or not (
                lora_b.dtype == lora_a.dtype and lora_b.dtype in (torch.bfloat16, torch.float16))
            self.lora_args = (lora_b, lora_b.stride(0), lora_b.stride(1),
                              lora_a, lora_a.stride(0), lora_a.stride(1))
        else:
            # Kernels compiled with HAS_LORA=False never read these; W stands in as a pointer.
            self.dot_in_fp32 = True
            self.lora_args = (weight, 0, 0, weight, 0, 0)

    @property
    def weight_args(self) -> tuple:
        return (self.weight, self.weight.stride(0), self.weight.stride(1))


def _check_launchable(weights: Sequence[GroupedWeight], block_m: int, block_n: int) -> None:
    if block_m < _MIN_DOT_SIZE or block_n < _MIN_DOT_SIZE:
        raise KernelError(f"block sizes must be >= {_MIN_DOT_SIZE}, got {block_m}x{block_n}")
    for grouped in weights:
        if grouped.weight.device.type == "cpu" and not INTERPRETED:
            raise KernelError("the Triton kernels need CUDA tensors",
                              hint="set TRITON_INTERPRET=1 before importing triton to run them "
                                   "on the CPU, or use backend='torch'")


def _chosen_members_per_weight(launches: Sequence[_Launch],
                               chosen: torch.Tensor) -> list[tuple[bool, bool]]:
    """(has chosen rows, has chosen columns) for every weight, with one host sync in all."""
    if not launches:
        return []
    flags = []
    for launch in launches:
        for ids in (launch.row_group, launch.col_group):
            flags.append(((ids >= 0) & chosen[ids.clamp(min=0).long()]).any())
    values = torch.stack(flags).tolist()
    return [(values[2 * index], values[2 * index + 1]) for index in range(len(launches))]


def group_sq_norms_triton(weights: Sequence[GroupedWeight], num_groups: int,
                          chosen: torch.Tensor, *, block_m: int = DEFAULT_BLOCK_M,
                          block_n: int = DEFAULT_BLOCK_N) -> torch.Tensor:
    """float32 ``||W_g||^2`` of every chosen group (0 for the others); reads each ``W`` once."""
    _check_launchable(weights, block_m, block_n)
    sq_norm = torch.zeros(num_groups, dtype=torch.float32, device=chosen.device)
    chosen_bytes = chosen.to(torch.int8)
    launches = [_Launch(grouped, block_m, block_n) for grouped in weights]
    for launch, (has_rows, has_cols) in zip(
            launches, _chosen_members_per_weight(launches, chosen), strict=True):
        if not (has_rows or has_cols):
            continue
        _group_sums_kernel[launch.grid](
            *launch.weight_args, *launch.lora_args, launch.row_group, launch.col_group,
            chosen_bytes, sq_norm, sq_norm, launch.n_rows, launch.n_cols, launch.rank,
            launch.lora_scale, WITH_INNER=False, HAS_LORA=False, DOT_IN_FP32=True,
            BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_R=launch.block_r,
            num_warps=DEFAULT_NUM_WARPS)
    return sq_norm


class PreparedTriton:
    """The launches of one projection over a fixed ``chosen``: built once, with the only host
    sync (which weights hold chosen rows or columns), so that running it syncs nothing and
    can be captured in a CUDA graph."""

    def __init__(self, weights: Sequence[GroupedWeight], chosen: torch.Tensor, *,
                 block_m: int = DEFAULT_BLOCK_M, block_n: int = DEFAULT_BLOCK_N) -> None:
        _check_launchable(weights, block_m, block_n)
        self.chosen_bytes = chosen.to(torch.int8)
        launches = [_Launch(grouped, block_m, block_n) for grouped in weights]
        members = _chosen_members_per_weight(launches, chosen)
        self.active = [(launch, has_rows, has_cols)
                       for launch, (has_rows, has_cols) in zip(launches, members, strict=True)
                       if has_rows or has_cols]
        self.lora_masks = []  # weights with no chosen row or column have nothing to clear
        for grouped, launch, (has_rows, has_cols) in zip(weights, launches, members, strict=True):
            if (has_rows or has_cols) and grouped.lora_B is not None and grouped.lora_A is not None:
                row_member = (launch.row_group >= 0) & chosen[launch.row_group.clamp(min=0).long()]
                col_chosen = (launch.col_group >= 0) & chosen[launch.col_group.clamp(min=0).long()]
                self.lora_masks.append((grouped, row_member[:, None], col_chosen[None, :]))

    def run(self, chosen: torch.Tensor, lambdas: torch.Tensor, eps: float,
            force: torch.Tensor, reduce: Callable[[torch.Tensor], None] | None = None
            ) -> GroupProjectionStats:
        """One step; ``reduce`` sums the per-group partial sums over the processes of sharded
        weights (as in the reference)."""
        num_groups = chosen.numel()
        device = chosen.device
        chosen_bytes = self.chosen_bytes
        sq_norm = torch.zeros(num_groups, dtype=torch.float32, device=device)
        merged_inner = torch.zeros(num_groups, dtype=torch.float32, device=device)
        for launch, _, _ in self.active:
            _group_sums_kernel[launch.grid](
                *launch.weight_args, *launch.lora_args, launch.row_group, launch.col_group,
                chosen_bytes, sq_norm, merged_inner, launch.n_rows, launch.n_cols, launch.rank,
                launch.lora_scale, WITH_INNER=True, HAS_LORA=launch.has_lora,
                DOT_IN_FP32=launch.dot_in_fp32, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
                BLOCK_R=launch.block_r, num_warps=DEFAULT_NUM_WARPS)
        if reduce is not None:
            reduce(sq_norm)
            reduce(merged_inner)
        coefficient = shrink_coefficients(sq_norm, lambdas, chosen)

        correction = torch.zeros(num_groups, dtype=torch.float32, device=device)
        for launch, has_rows, has_cols in self.active:
            if has_rows and has_cols:
                _overlap_correction_kernel[launch.grid](
                    *launch.weight_args, launch.row_group, launch.col_group, chosen_bytes,
                    coefficient, correction, launch.n_rows, launch.n_cols,
                    BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, num_warps=DEFAULT_NUM_WARPS)
        if reduce is not None:
            reduce(correction)
        inner = torch.where(chosen, merged_inner - coefficient * sq_norm - correction, 0.0)
        zeroed = half_space_decision(sq_norm, inner, chosen, eps, force)

        zeroed_bytes = zeroed.to(torch.int8)
        for launch, _, _ in self.active:
            _project_kernel[launch.grid](
                *launch.weight_args, *launch.lora_args, launch.row_group, launch.col_group,
                chosen_bytes, coefficient, zeroed_bytes, launch.n_rows, launch.n_cols,
                launch.rank, launch.lora_scale, HAS_LORA=launch.has_lora,
                DOT_IN_FP32=launch.dot_in_fp32, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
                BLOCK_R=launch.block_r, num_warps=DEFAULT_NUM_WARPS)

        # The LoRA factors are cleared only after every W has been rewritten from them.
        for grouped, row_member, col_chosen in self.lora_masks:
            grouped.lora_B.masked_fill_(row_member, 0.0)
            grouped.lora_A.masked_fill_(col_chosen, 0.0)
        return GroupProjectionStats(sq_norm=sq_norm, inner=inner, zeroed=zeroed)


def project_groups_triton(weights: Sequence[GroupedWeight], chosen: torch.Tensor,
                          lambdas: torch.Tensor, eps: float, force: torch.Tensor, *,
                          block_m: int = DEFAULT_BLOCK_M,
                          block_n: int = DEFAULT_BLOCK_N) -> GroupProjectionStats:
    """One LHSPG projection step over the chosen groups, in place, with the fused kernels.

    Arguments are already normalised as for
    :func:`~lorashear.kernels.group_projection_ref.project_groups_reference`.
    """
    prepared = PreparedTriton(weights, chosen, block_m=block_m, block_n=block_n)
    return prepared.run(chosen, lambdas, eps, force)
