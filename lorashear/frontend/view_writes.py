"""In-place writes through views, lowered as values: ``base[.., idx] = src`` becomes a new
``base`` with that part replaced.

The IR's values are immutable, so an in-place op whose target is a view of another tensor (a
chain of ``select``/``slice``/``permute``/``reshape``... down to a tensor the forward computed)
is lowered as: the view's new value (the op's functional twin on the view, or for ``copy_`` the
source broadcast and cast to the view's shape), then each tensor of the chain rebuilt from its
own old value and its view's new one (``slice_scatter``, ``select_scatter``, or the inverse of a
permutation or reshape), and every node of the chain bound to its new value, so what the trace
reads after the write sees it, as PyTorch's aliasing does. Cohere-Compass's multimodal rotary
overwrites strided slices of its frequencies (``freqs_thw[..., 1:length:3] = ...``), Gemma 3n's
AltUp adds into a permuted product and into a slice (``corrected[1:] += first``).

Refused: a chain through a view with no inverse here (``expand``, ``unfold``, a ``split``'s
piece), a base that is an input or a parameter, and another view of the chain's tensors made
before the write and read after it (it would have to change too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import fx

from lorashear.errors import LoweringError
from lorashear.frontend.node_forms import is_view
from lorashear.ir.core import DTypeArg, Op, Value
from lorashear.ir.ops import ATEN_OPS
from lorashear.ir.types import dtype_name

if TYPE_CHECKING:
    from lorashear.frontend.lower import _Lowering


def _opname(node: fx.Node) -> str | None:
    target = node.target
    return getattr(target, "_opname", None) and f"{target._opname}.{target._overloadname}"


def _emit_value(lowering: _Lowering, like: fx.Node, kind: str, args: list, loc: str) -> Value:
    """One op of ``kind`` whose result has the type of ``like``'s value."""
    value = lowering._new_value(like.meta["val"])
    lowering.module.graph.ops.append(Op(kind, args, {}, [value], loc))
    return value


def _select_back(lowering, view, parent_value, new, loc):
    _, dim, index = view.args[:3]
    return _emit_value(lowering, view.args[0], "select_scatter", [parent_value, new, dim, lowering._arg(index, view)], loc)


def _slice_back(lowering, view, parent_value, new, loc):
    dim, start, end, step = (list(view.args[1:]) + [0, None, None, 1][len(view.args) - 1:])[:4]
    args = [parent_value, new, dim, lowering._arg(start, view), lowering._arg(end, view), lowering._arg(step, view)]
    return _emit_value(lowering, view.args[0], "slice_scatter", args, loc)


def _permute_back(lowering, view, parent_value, new, loc):
    dims = [d % len(view.args[1]) for d in view.args[1]]
    inverse = [dims.index(k) for k in range(len(dims))]
    return _emit_value(lowering, view.args[0], "permute", [new, inverse], loc)


def _transpose_back(lowering, view, parent_value, new, loc):
    return _emit_value(lowering, view.args[0], "transpose", [new, view.args[1], view.args[2]], loc)


def _t_back(lowering, view, parent_value, new, loc):
    return _emit_value(lowering, view.args[0], "t", [new], loc)


def _unsqueeze_back(lowering, view, parent_value, new, loc):
    rank = len(view.meta["val"].shape)
    return _emit_value(lowering, view.args[0], "squeeze.dims", [new, [view.args[1] % rank]], loc)


def _reshape_back(lowering, view, parent_value, new, loc):
    return _emit_value(lowering, view.args[0], "reshape", [new, lowering._sizes_of(view, view.args[0])], loc)


def _same_back(lowering, view, parent_value, new, loc):
    return new


#: View overloads whose write can be carried back to the viewed tensor, and how.
WRITE_BACK: dict[str, Callable] = {
    "select.int": _select_back, "slice.Tensor": _slice_back, "permute.default": _permute_back,
    "transpose.int": _transpose_back, "t.default": _t_back, "unsqueeze.default": _unsqueeze_back,
    "view.default": _reshape_back, "_unsafe_view.default": _reshape_back, "reshape.default": _reshape_back,
    "alias.default": _same_back, "detach.default": _same_back,
}


def write_through_view(lowering: _Lowering, node: fx.Node, name: str) -> None:
    """Lower the in-place op ``node`` (overload ``name``) whose target is a view (see the module
    docstring)."""
    loc = lowering._loc(node)
    where = f"in-place op aten.{name} at module {loc or 'top level'}"
    chain: list[fx.Node] = []
    tensor = node.args[0]
    while isinstance(tensor, fx.Node) and tensor.op == "call_function" and is_view(tensor):
        if _opname(tensor) not in WRITE_BACK:
            raise LoweringError(f"{where} writes into a view ({tensor.name}, aten.{_opname(tensor)}) that the "
                                "IR cannot write back to the tensor it views")
        chain.append(tensor)
        tensor = tensor.args[0]
    base = tensor
    if not isinstance(base, fx.Node) or base.op != "call_function":
        raise LoweringError(f"{where} writes through a view into an input or a parameter ({getattr(base, 'name', base)}), "
                            "which the IR's values cannot express")
    order = lowering._node_order(node.graph)
    for held, next_in_chain in zip([base, *chain[::-1]], [*chain[::-1], node]):
        for user in held.users:
            if user is next_in_chain or user is node or not (is_view(user) and user.args[0] is held):
                continue
            if order[user] < order[node] and any(order[u] > order[node] for u in user.users):
                raise LoweringError(f"{where} writes into {held.name}, whose view {user.name} made before the "
                                    "write is read after it")
    new = _written_value(lowering, node, name, chain[0], loc, where)
    parents = [*chain[1:], base]
    for view, parent in zip(chain, parents):
        lowering.env[view] = new
        new = WRITE_BACK[_opname(view)](lowering, view, lowering.env[parent], new, loc)
    lowering.env[base] = new
    lowering.env[node] = lowering.env[chain[0]]


def _written_value(lowering: _Lowering, node: fx.Node, name: str, target: fx.Node, loc: str,
                   where: str) -> Value:
    """The target view's value after the in-place op."""
    packet, _, overload = name.partition(".")
    old = lowering.env[target]
    want = target.meta["val"]
    if packet == "copy_":
        src_node = node.args[1]
        src = lowering._arg(src_node, node)
        have = src_node.meta["val"] if isinstance(src_node, fx.Node) else None
        if have is None:
            raise LoweringError(f"{where} copies a non-tensor")
        if tuple(have.shape) != tuple(want.shape):
            value = lowering._new_value(want.to(have.dtype))
            lowering.module.graph.ops.append(Op("expand", [src, lowering._sizes_of(node, target)], {}, [value], loc))
            src = value
        if have.dtype != want.dtype:
            value = lowering._new_value(want)
            lowering.module.graph.ops.append(Op("cast", [src, DTypeArg(dtype_name(want.dtype))], {}, [value], loc))
            src = value
        return src
    kind = ATEN_OPS.get(f"{packet[:-1]}.{overload}")
    if kind is None:
        raise LoweringError(f"unsupported op aten.{name} at module {loc or 'top level'}",
                            hint="add its functional twin to lorashear/ir/ops.py if it is a plain tensor op")
    args = [old, *(lowering._arg(a, node) for a in node.args[1:])]
    kwargs = {k: lowering._arg(v, node) for k, v in node.kwargs.items()}
    value = lowering._new_value(node.meta["val"])
    lowering.module.graph.ops.append(Op(kind, args, kwargs, [value], loc))
    return value
