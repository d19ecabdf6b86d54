"""The IR verifier: structural invariants, then shapes by meta execution.

Structure: every use has an earlier def, every value is defined once, every param reference
names a param of the module, every op kind exists. Shapes: each op runs on `meta` tensors
(torch's own shape functions, no data) with the symbolic sizes bound to small distinct
primes, and its result types must equal the declared ones. A verifier written against the
real kernels cannot disagree with the executor about what an op does.
"""

from __future__ import annotations

import torch

from lorashear.errors import VerificationError, first_line
from lorashear.ir.core import Module, Op, Param
from lorashear.ir.interpret import run_op
from lorashear.ir.ops import op_def
from lorashear.ir.types import SymIntType, TensorType, evaluate_dim, torch_dtype

_PRIMES = (3, 5, 7, 11, 13, 17, 19, 23)


def _where(op: Op) -> str:
    return f"op {op.kind} defining %{op.results[0].name if op.results else '?'}" + (
        f" (module {op.loc})" if op.loc else "")


def verify_structure(module: Module) -> None:
    """Check defs/uses, unique names, param references and known op kinds."""
    defined: set[int] = set()
    names: set[str] = set()
    for v in module.graph.inputs:
        if v.name in names:
            raise VerificationError(f"value %{v.name} is defined twice")
        names.add(v.name)
        defined.add(id(v))
    for op in module.graph.ops:
        if op_def(op.kind) is None:
            raise VerificationError(f"unknown op kind {op.kind!r} in {_where(op)}")
        for v in op.operands():
            if id(v) not in defined:
                raise VerificationError(f"{_where(op)} uses %{v.name} before it is defined")
        for p in op.params():
            if module.params.get(p.name) is not p:
                raise VerificationError(f"{_where(op)} references @{p.name}, which is not a "
                                        "parameter of this module")
        for r in op.results:
            if r.name in names:
                raise VerificationError(f"value %{r.name} is defined twice")
            if r.producer is not op:
                raise VerificationError(f"value %{r.name} does not record {_where(op)} as its producer")
            names.add(r.name)
            defined.add(id(r))
    if not module.graph.outputs:
        raise VerificationError("the graph has no outputs")
    for v in module.graph.outputs:
        if id(v) not in defined:
            raise VerificationError(f"graph output %{v.name} is never defined")


def symbol_bindings(module: Module) -> dict[str, int]:
    """Distinct small primes for the symbolic sizes of the graph inputs."""
    bindings: dict[str, int] = {}
    for v in module.graph.inputs:
        if isinstance(v.type, TensorType):
            for d in v.type.shape:
                if isinstance(d, str) and d not in bindings and d.isidentifier():
                    bindings[d] = _PRIMES[len(bindings) % len(_PRIMES)] + 8 * (len(bindings) // len(_PRIMES))
    return bindings


def _meta_input(ty, bindings) -> object:
    if isinstance(ty, SymIntType):
        raise VerificationError("symbolic-integer graph inputs are not supported")
    shape = [evaluate_dim(d, bindings) for d in ty.shape]
    dtype = torch_dtype(ty.dtype)
    if dtype in (torch.int64, torch.int32):
        # index inputs must be valid indices even on meta: zeros are
        return torch.zeros(shape, dtype=dtype, device="meta")
    return torch.empty(shape, dtype=dtype, device="meta")


def verify_shapes(module: Module) -> None:
    """Run every op on meta tensors and compare result types with the declared ones."""
    try:
        _verify_shapes(module)
    except ValueError as exc:  # a symbolic size no graph input binds, a malformed size
        raise VerificationError(str(exc)) from None


def _verify_shapes(module: Module) -> None:
    bindings = symbol_bindings(module)
    env: dict[int, object] = {}
    for v in module.graph.inputs:
        env[id(v)] = _meta_input(v.type, bindings)
    meta_params: dict[str, torch.Tensor] = {}

    def param_fn(p: Param) -> torch.Tensor:
        t = meta_params.get(p.name)
        if t is None:
            t = meta_params[p.name] = torch.empty(p.type.shape, dtype=torch_dtype(p.type.dtype), device="meta")
        return t

    for op in module.graph.ops:
        try:
            run_op(op, env, param_fn, device=torch.device("meta"))
        except VerificationError:
            raise
        except Exception as exc:  # torch's shape functions say why the op is ill-typed
            msg = first_line(exc)
            raise VerificationError(f"{_where(op)} is ill-typed: {msg}") from exc
        for r in op.results:
            got = env[id(r)]
            if isinstance(r.type, SymIntType):
                if not isinstance(got, int):
                    raise VerificationError(f"{_where(op)}: %{r.name} is declared sym but the op "
                                            f"produces {type(got).__name__}")
                continue
            if not isinstance(got, torch.Tensor):
                raise VerificationError(f"{_where(op)}: %{r.name} is declared {r.type} but the op "
                                        f"produces {type(got).__name__}")
            want = tuple(evaluate_dim(d, bindings) for d in r.type.shape)
            if tuple(got.shape) != want or got.dtype != torch_dtype(r.type.dtype):
                raise VerificationError(
                    f"{_where(op)}: %{r.name} is declared {r.type} but the op gives "
                    f"{tuple(got.shape)} {got.dtype} (with sizes {bindings})")


def verify(module: Module, *, shapes: bool = True) -> None:
    """Verify ``module``; raise :class:`VerificationError` naming the first broken invariant."""
    verify_structure(module)
    for p in module.params.values():
        if not isinstance(p.type, TensorType) or not p.type.is_static:
            raise VerificationError(f"parameter @{p.name} has a non-static type {p.type}")
    if shapes:
        verify_shapes(module)
