"""Running ops: the one place that turns IR arguments into a torch call.

Shared by the executor (real tensors, autograd) and the verifier (meta tensors, shapes only),
so what the verifier checks is exactly what runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lorashear.errors import VerificationError
from lorashear.ir.core import DTypeArg, Op, Param, Value
from lorashear.ir.ops import op_def
from lorashear.ir.types import torch_dtype


def resolve_arg(arg: Any, env: dict[int, Any], param_fn: Callable[[Param], torch.Tensor]) -> Any:
    """Substitute values (from ``env``, keyed by ``id(value)``) and params into an argument."""
    if isinstance(arg, Value):
        return env[id(arg)]
    if isinstance(arg, Param):
        return param_fn(arg)
    if isinstance(arg, DTypeArg):
        return torch_dtype(arg.name)
    if isinstance(arg, list):
        return [resolve_arg(a, env, param_fn) for a in arg]
    return arg


def run_op(op: Op, env: dict[int, Any], param_fn: Callable[[Param], torch.Tensor], *,
           device: torch.device, training: bool = False) -> None:
    """Execute one op, storing its results in ``env``."""
    definition = op_def(op.kind)
    if definition is None:
        raise VerificationError(f"unknown op kind {op.kind!r} at {op.loc or 'top level'}")
    args = [resolve_arg(a, env, param_fn) for a in op.args]
    kwargs = {k: resolve_arg(v, env, param_fn) for k, v in op.kwargs.items()}
    if definition.creates_tensor:
        kwargs["device"] = device
    if definition.training_aware:
        kwargs["training"] = training
    out = definition.fn(*args, **kwargs)
    if len(op.results) == 1 and definition.num_results == 1:
        env[id(op.results[0])] = out
    else:
        if not isinstance(out, (tuple, list)) or len(out) != len(op.results):
            raise VerificationError(
                f"op {op.kind} at {op.loc or 'top level'} produced "
                f"{len(out) if isinstance(out, (tuple, list)) else 1} results, the IR declares {len(op.results)}")
        for r, o in zip(op.results, out):
            env[id(r)] = o
