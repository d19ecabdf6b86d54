"""ATen nodes that the lowering spells with other IR kinds, or handles by more than a table
lookup: in-place writes and views, ``x.T`` and the ``*_as`` forms, buffers filled slice by slice,
Python scalars made into tensors while tracing on ``meta``, and the higher-order regions
(gradient mode, autocast) inlined in place of their op."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from lorashear.errors import LoweringError
from lorashear.ir.core import DTypeArg, Op
from lorashear.ir.types import dtype_name

if TYPE_CHECKING:
    from lorashear.frontend.lower import _Lowering


def is_inplace(name: str) -> bool:
    packet = name.partition(".")[0]
    return packet.endswith("_") and not packet.startswith("_")


#: ATen view ops: an in-place write into their result changes their input too.
VIEW_PACKETS = frozenset({"view", "_unsafe_view", "reshape", "transpose", "permute", "t", "expand",
                           "unsqueeze", "squeeze", "slice", "select", "narrow", "as_strided", "alias",
                           "detach", "split", "chunk", "unbind", "diagonal", "view_as", "expand_as",
                           "numpy_T", "unfold", "unflatten", "flatten", "movedim", "split_with_sizes"})


def is_view(node: fx.Node) -> bool:
    if node.target is operator.getitem:
        return is_view(node.args[0]) if isinstance(node.args[0], fx.Node) else False
    return getattr(node.target, "_opname", None) in VIEW_PACKETS


#: ATen overloads that only check a condition at run time (export's guards, a model's ``assert``).
ASSERTIONS = frozenset({"_assert_scalar.default", "_assert_async.msg", "_assert_tensor_metadata.default",
                        "sym_constrain_range.default", "sym_constrain_range_for_size.default"})


def assertion_only(graph: fx.Graph) -> set[fx.Node]:
    """The nodes whose results are unused or only feed assertions, directly or through other
    such nodes (XLM's ``assert lengths.max().item() <= slen``: a data-dependent ``item`` and a
    comparison that the IR has no ops for; Gemma 3n's ``torch.distributions.Normal`` checks its
    arguments with ``_is_all_true`` and drops the answer). An inference forward computes the
    same without them; assertions were checked while tracing. In-place ops are never among
    them (they write a tensor that is read later)."""
    found: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if node.op != "call_function":
            continue
        name = _opname(node)
        if name is not None and is_inplace(name):
            continue
        if all(_is_assertion(user) or user in found for user in node.users):
            found.add(node)
    return found


def _opname(node: fx.Node) -> str | None:
    target = node.target
    return getattr(target, "_opname", None) and f"{target._opname}.{target._overloadname}"


def _is_assertion(node: fx.Node) -> bool:
    return _opname(node) in ASSERTIONS


def numpy_t(lowering: _Lowering, node: fx.Node) -> None:
    """``x.T``: every axis reversed, as a ``permute``."""
    rank = len(node.args[0].meta["val"].shape)
    lowering._emit(node, "permute", [lowering._arg(node.args[0], node), list(range(rank))[::-1]], {})


def shaped_as(kind: str) -> Callable[[_Lowering, fx.Node], None]:
    """``x.view_as(y)``/``x.reshape_as(y)``/``x.expand_as(y)`` as ``reshape``/``expand`` to
    ``y``'s sizes."""
    def lower_as(lowering: _Lowering, node: fx.Node) -> None:
        x = lowering._arg(node.args[0], node)
        lowering._emit(node, kind, [x, lowering._sizes_of(node, node.args[1])], {})
    return lower_as


def filled_buffer(lowering: _Lowering, node: fx.Node) -> None:
    """``buf = x.new_empty(sizes)`` then ``buf[.., a:b].copy_(src)`` for slices that tile one
    axis of ``buf`` in order (MiniCPM3's and DeepSeek's latent attention assemble their keys
    so): the buffer is the ``concat`` of the sources along that axis, each broadcast and cast
    to its slice, emitted where the last copy is. The slices and copies emit nothing of their
    own. Any other use of the empty buffer is refused (its values would be undefined)."""
    where = f"aten.new_empty at module {lowering._loc(node) or 'top level'}"
    order = lowering._node_order(node.graph)
    pieces = []
    for user in node.users:
        if getattr(user.target, "_opname", None) != "slice" or user.args[0] is not node:
            continue
        copies = [u for u in user.users if getattr(u.target, "_opname", None) == "copy_" and u.args[0] is user]
        if len(user.users) != 1 or len(copies) != 1:
            raise LoweringError(f"{where}: a slice of the new buffer is used other than as a copy's target")
        dim, start, end = (list(user.args[1:]) + [0, None, None])[:3]
        pieces.append((order[copies[0]], dim, start, end, user, copies[0]))
    shape = node.meta["val"].shape
    pieces.sort(key=lambda p: p[4].args[2] if len(p[4].args) > 2 else 0)
    dims = {p[1] % len(shape) for p in pieces}
    readers = [u for u in node.users if all(u is not p[4] for p in pieces)]
    last = max((p[0] for p in pieces), default=-1)
    length = shape[dims.pop()] if len(dims) == 1 else None
    covered = 0
    for _, _, start, _end, piece, _ in pieces:
        if not isinstance(start, int) or start != covered:
            covered = -1
            break
        covered = piece.meta["val"].shape[pieces[0][1]]
        covered = start + int(covered) if isinstance(covered, int) else -1
    if not pieces or length is None or not isinstance(length, int) or covered != length \
            or any(order[r] < last for r in readers) or len(pieces) + len(readers) != len(node.users):
        raise LoweringError(f"{where}: the new buffer is not filled whole by copies into slices of one "
                            "axis before it is read", hint="only buffers assembled piece by piece are supported")
    dim = pieces[0][1]

    def skip(_lowering: _Lowering, _node: fx.Node) -> None:
        pass

    def assemble(lowering: _Lowering, copy: fx.Node) -> None:
        parts = []
        for _, _, _, _, piece, piece_copy in pieces:
            src = lowering._arg(piece_copy.args[1], piece_copy)
            want, have = piece.meta["val"], piece_copy.args[1].meta["val"]
            if tuple(have.shape) != tuple(want.shape):
                value = lowering._new_value(want.to(have.dtype))
                sizes = lowering._sizes_of(piece_copy, piece)
                lowering.module.graph.ops.append(Op("expand", [src, sizes], {}, [value], lowering._loc(piece_copy)))
                src = value
            if have.dtype != want.dtype:
                value = lowering._new_value(want)
                lowering.module.graph.ops.append(Op("cast", [src, DTypeArg(dtype_name(want.dtype))], {}, [value],
                                                    lowering._loc(piece_copy)))
                src = value
            parts.append(src)
        lowering._emit(node, "concat", [parts, dim], {})
        lowering.env[copy] = lowering.env[node]

    for _, _, _, _, piece, piece_copy in pieces:
        lowering.deferred[piece] = skip
        lowering.deferred[piece_copy] = assemble if order[piece_copy] == last else skip


@contextlib.contextmanager
def scalar_constants_off_meta():
    """While tracing, ``torch.tensor(x, device=meta)`` of a Python number makes a 0-d tensor
    on the CPU instead (GPT-Neo's mask value is ``torch.tensor(finfo.min, device=weights'
    device)``): traced without weights, a constant on ``meta`` has no value; a 0-d CPU tensor
    mixes with tensors of any device, and becomes a constant of the IR."""
    original = torch.tensor

    def tensor(data, *args, **kwargs):
        device = kwargs.get("device")
        if isinstance(data, (bool, int, float)) and device is not None and torch.device(device).type == "meta":
            kwargs["device"] = "cpu"
        return original(data, *args, **kwargs)

    torch.tensor = tensor
    try:
        yield
    finally:
        torch.tensor = original


def grad_region(node: fx.Node) -> tuple[fx.Node, list]:
    """``wrap_with_set_grad_enabled(enabled, region, *operands)``: gradients do not change
    what an inference forward computes."""
    return node.args[1], list(node.args[2:])


def autocast_region(node: fx.Node) -> tuple[fx.Node, list]:
    """``wrap_with_autocast(device, dtype, enabled, cache, region, *operands)``, inlined only
    when autocast is off there (a region that changes dtypes would compute otherwise)."""
    if node.args[2]:
        raise LoweringError("an autocast region that is enabled changes dtypes inside the forward, "
                            "which the IR does not carry", hint="lower the model with autocast disabled")
    return node.args[4], list(node.args[5:])


def squeeze_all(lowering: _Lowering, node: fx.Node) -> None:
    """``x.squeeze()``: the axes of size 1 in the trace (a symbolic size is never 1 there), as
    ``squeeze.dims`` naming them, so a later size 1 (a batch of one, a channel axis pruned to
    one) is not squeezed where the traced model did not squeeze it."""
    shape = node.args[0].meta["val"].shape
    dims = [k for k, d in enumerate(shape) if isinstance(d, int) and d == 1]
    lowering._emit(node, "squeeze.dims", [lowering._arg(node.args[0], node), dims], {})


def cat(lowering: _Lowering, node: fx.Node) -> None:
    """``torch.cat`` as ``concat``, leaving out the 1-D empty tensors that ``cat`` skips beside
    tensors of a higher rank (XLM's cache starts from them): the IR's ``concat`` (and ONNX's)
    takes operands of one rank, and the coupling analysis then sees only real operands."""
    rank = len(node.meta["val"].shape)
    tensors, rest = node.args[0], list(node.args[1:])
    kept = [t for t in tensors if not (rank > 1 and isinstance(t, fx.Node)
                                       and tuple(t.meta["val"].shape) == (0,))]
    if len(kept) == 1 and len(kept) != len(tensors):
        lowering.env[node] = lowering._arg(kept[0], node)
        return
    kwargs = {k: lowering._arg(v, node) for k, v in node.kwargs.items()}
    lowering._emit(node, "concat", [lowering._arg(kept, node), *(lowering._arg(a, node) for a in rest)], kwargs)


def broadcast_tensors(lowering: _Lowering, node: fx.Node) -> None:
    """``torch.broadcast_tensors(*xs)`` (Gemma 3n's Laurel/AltUp): each ``x`` ``expand``ed to the
    common shape, a symbolic size read (``dim``) from an input that has it on that axis."""
    tensors = list(node.args[0])
    shape = node.meta["val"][0].shape
    rank = len(shape)
    sizes: list = []
    for k, d in enumerate(shape):
        if isinstance(d, int) or (isinstance(d, torch.SymInt) and d.node.expr.is_number):
            sizes.append(int(d))
            continue
        for t in tensors:
            t_shape = t.meta["val"].shape
            axis = k - (rank - len(t_shape))
            if axis >= 0 and isinstance(t_shape[axis], torch.SymInt) and t_shape[axis].node.expr == d.node.expr:
                value = lowering._new_value(d)
                lowering.module.graph.ops.append(Op("dim", [lowering._arg(t, node), axis], {}, [value],
                                                    lowering._loc(node)))
                sizes.append(value)
                break
        else:
            raise LoweringError(f"aten.broadcast_tensors at module {lowering._loc(node) or 'top level'}: "
                                f"no input has the size {d} of axis {k}")
    results = []
    for t, want in zip(tensors, node.meta["val"]):
        x = lowering._arg(t, node)
        if tuple(t.meta["val"].shape) == tuple(want.shape):
            results.append(x)
            continue
        value = lowering._new_value(want)
        lowering.module.graph.ops.append(Op("expand", [x, list(sizes)], {}, [value], lowering._loc(node)))
        results.append(value)
    lowering.env[node] = results


#: Higher-order ops whose region is lowered in place of the op.
INLINED_REGIONS: dict[Any, Callable[[fx.Node], tuple[fx.Node, list]]] = {
    torch.ops.higher_order.wrap_with_set_grad_enabled: grad_region,
    torch.ops.higher_order.wrap_with_autocast: autocast_region,
}


#: ATen overloads spelled with other IR kinds (they add no computation of their own).
SPELLED_AS: dict[str, Callable[[_Lowering, fx.Node], None]] = {
    "new_empty.default": filled_buffer,
    "numpy_T.default": numpy_t,
    "squeeze.default": squeeze_all,
    "cat.default": cat,
    "broadcast_tensors.default": broadcast_tensors,
    "view_as.default": shaped_as("reshape"),
    "reshape_as.default": shaped_as("reshape"),
    "expand_as.default": shaped_as("expand"),
}
