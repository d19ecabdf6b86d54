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
    PreparedOp(op)(env, param_fn, device, training)


_VALUE, _PARAM, _NESTED = 0, 1, 2


class PreparedOp:
    """One op with its argument resolution worked out once: calling it does what
    :func:`run_op` does (the same function on the same arguments) without inspecting the
    arguments again, which is most of the per-op cost of running a small batch."""

    __slots__ = ("op", "fn", "args", "kwargs", "slots", "creates_tensor", "training_aware",
                 "single", "result_ids")

    def __init__(self, op: Op) -> None:
        definition = op_def(op.kind)
        if definition is None:
            raise VerificationError(f"unknown op kind {op.kind!r} at {op.loc or 'top level'}")
        self.op = op
        self.fn = definition.fn
        self.creates_tensor = definition.creates_tensor
        self.training_aware = definition.training_aware
        self.single = len(op.results) == 1 and definition.num_results == 1
        self.result_ids = [id(r) for r in op.results]
        #: where values and params go: (position or keyword, kind, key or nested argument)
        self.slots: list[tuple[int | str, int, Any]] = []
        self.args = [self._constant(i, a) for i, a in enumerate(op.args)]
        self.kwargs = {k: self._constant(k, a) for k, a in op.kwargs.items()}

    def _constant(self, where: int | str, arg: Any) -> Any:
        if isinstance(arg, Value):
            self.slots.append((where, _VALUE, id(arg)))
            return None
        if isinstance(arg, Param):
            self.slots.append((where, _PARAM, arg))
            return None
        if isinstance(arg, list) and any(isinstance(a, (Value, Param, list)) for a in arg):
            self.slots.append((where, _NESTED, arg))
            return None
        return resolve_arg(arg, {}, _no_param)

    def __call__(self, env: dict[int, Any], param_fn: Callable[[Param], torch.Tensor],
                 device: torch.device, training: bool = False) -> None:
        args, kwargs = self.args, self.kwargs
        if self.slots:
            args, kwargs = list(args), dict(kwargs)
            for where, kind, key in self.slots:
                value = env[key] if kind == _VALUE else param_fn(key) if kind == _PARAM \
                    else resolve_arg(key, env, param_fn)
                if isinstance(where, int):
                    args[where] = value
                else:
                    kwargs[where] = value
        if self.creates_tensor:
            kwargs = {**kwargs, "device": device}
        if self.training_aware:
            kwargs = {**kwargs, "training": training}
        out = self.fn(*args, **kwargs)
        if self.single:
            env[self.result_ids[0]] = out
            return
        op = self.op
        if not isinstance(out, (tuple, list)) or len(out) != len(op.results):
            raise VerificationError(
                f"op {op.kind} at {op.loc or 'top level'} produced "
                f"{len(out) if isinstance(out, (tuple, list)) else 1} results, the IR declares {len(op.results)}")
        for key, o in zip(self.result_ids, out):
            env[key] = o


def _no_param(p: Param) -> torch.Tensor:
    raise AssertionError(f"@{p.name} in a constant argument")
