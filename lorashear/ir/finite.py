"""Refusing NaN and Inf weights at lowering time, where the bad tensor can still be named.

A NaN in one weight makes every loss NaN, and the first sign used to be a training pass
giving up hours later with advice about the calibration data. Lowering instead reads each
weight it binds once (one tensor at a time, so no more than one tensor is in memory) and
counts its non-finite elements. Meta lowering reads nothing and scans nothing.
"""

from __future__ import annotations

import torch

from lorashear.errors import ModelLoadError
from lorashear.ir.core import Module, Param
from lorashear.ir.storage import FileStorage
from lorashear.ir.types import torch_dtype

#: Elements counted per step, so the scan's boolean mask stays small beside a huge embedding.
_STEP = 1 << 24

ALLOW_HINT = ("the checkpoint is damaged or its training diverged; --allow-nonfinite "
              "(allow_nonfinite=True) lowers it anyway")


def count_nonfinite(tensor: torch.Tensor) -> int:
    """How many elements of ``tensor`` are NaN or +-Inf (0 for integer tensors).

    A NaN or Inf anywhere makes the sum NaN or Inf (IEEE arithmetic propagates both), so one
    summation, at memory speed, clears a healthy tensor; only a non-finite sum (a bad element,
    or finite values summing past the type's range) pays for the exact count."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return 0
    narrow = tensor.dtype in (torch.float16, torch.bfloat16)  # their sums overflow early
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32) if narrow else tensor.sum())):
        return 0
    flat = tensor.reshape(-1)
    return sum(int(torch.count_nonzero(flat[i:i + _STEP].isfinite().logical_not()))
               for i in range(0, flat.numel(), _STEP))


def refuse_nonfinite(module: Module) -> None:
    """Raise :class:`ModelLoadError` naming the first parameter holding NaN or Inf (as the
    IR's element type: a large fp32 value lowered as f16 becomes Inf), with its count."""
    bad: list[tuple[Param, int, int]] = []
    for p in module.params.values():
        if not p.storage.has_data:
            continue
        tensor = p.storage.load()
        want = torch_dtype(p.type.dtype)
        if tensor.is_floating_point() and want.is_floating_point \
                and torch.finfo(want).max < torch.finfo(tensor.dtype).max:
            tensor = tensor.to(want)  # only a narrower type can turn a finite value into Inf
        count = count_nonfinite(tensor)
        if count:
            bad.append((p, count, tensor.numel()))
    if not bad:
        return
    p, count, numel = bad[0]
    if isinstance(p.storage, FileStorage):
        what = f"tensor {p.storage.key!r} of {p.storage.path}"
    else:
        what = f"parameter @{p.name}"
    more = f"; {len(bad) - 1} more tensors hold some too" if len(bad) > 1 else ""
    values = "value" if count == 1 else "values"
    raise ModelLoadError(f"{what} holds {count:,} non-finite {values} (NaN or Inf) among "
                         f"{numel:,} as {p.type.dtype}{more}", hint=ALLOW_HINT)
