"""Complex tensors, lowered as real ones: a complex ``[..., n]`` is a real ``[..., n, 2]`` of
its real and imaginary parts, the layout ``torch.view_as_real`` gives it.

DeepSeek-V2's rotary embedding multiplies complex numbers: ``polar(1, angles)`` makes the
rotations, ``view_as_complex`` pairs the query's channels, a complex product rotates them and
``view_as_real`` unpairs them. In the real layout ``view_as_complex``/``view_as_real`` are the
identity, ``polar(r, t)`` is ``stack([r cos t, r sin t], -1)``, a complex product is
``(a c - b d, a d + b c)``, a product with a real tensor scales both parts, and ``unsqueeze``
shifts a negative axis past the parts. So the IR, its passes and ONNX see only real ops (the
IR's types and ONNX Runtime's kernels have no complex arithmetic to speak of). Any other op on
a complex value is refused, naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import fx

from lorashear.errors import LoweringError
from lorashear.ir.core import Op, Value
from lorashear.ir.types import TensorType, dtype_name

if TYPE_CHECKING:
    from lorashear.frontend.lower import _Lowering

_PART_DTYPES = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def is_complex_node(node: fx.Node) -> bool:
    """Whether ``node`` makes or reads a complex tensor."""
    def complex_val(n) -> bool:
        val = n.meta.get("val") if isinstance(n, fx.Node) else None
        return isinstance(val, torch.Tensor) and val.dtype.is_complex
    return complex_val(node) or any(complex_val(a) for a in node.all_input_nodes)


def _shape(node) -> tuple:
    return tuple(node.meta["val"].shape)


class _Emitter:
    def __init__(self, lowering: _Lowering, node: fx.Node) -> None:
        self.lowering, self.node, self.loc = lowering, node, lowering._loc(node)
        val = node.meta["val"]
        dtype = _PART_DTYPES.get(val.dtype, val.dtype) if isinstance(val, torch.Tensor) else torch.float32
        self.dtype = dtype_name(dtype)

    def op(self, kind: str, args: list, shape: tuple) -> Value:
        lowering = self.lowering
        value = Value(f"t{lowering.counter}", TensorType(self.dtype, tuple(lowering._dim(d) for d in shape)))
        lowering.counter += 1
        lowering.module.graph.ops.append(Op(kind, args, {}, [value], self.loc))
        return value

    def parts(self, z: Value, shape: tuple) -> tuple[Value, Value]:
        return self.op("select", [z, -1, 0], shape), self.op("select", [z, -1, 1], shape)


def lower_complex(lowering: _Lowering, node: fx.Node, name: str) -> None:
    """Lower ``node`` (overload ``name``), which makes or reads complex tensors, in the real
    layout (see the module docstring)."""
    e = _Emitter(lowering, node)
    arg = lowering._arg
    where = f"op aten.{name} at module {e.loc or 'top level'}"
    if name in ("view_as_complex.default", "view_as_real.default"):
        lowering.env[node] = arg(node.args[0], node)
        return
    out_shape = _shape(node)
    if name == "polar.default":
        radius, angle = node.args[:2]
        angles = _shape(angle)
        cos, sin = e.op("cos", [arg(angle, node)], angles), e.op("sin", [arg(angle, node)], angles)
        re = e.op("mul", [arg(radius, node), cos], out_shape)
        im = e.op("mul", [arg(radius, node), sin], out_shape)
        lowering.env[node] = e.op("stack", [[re, im], -1], (*out_shape, 2))
        return
    if name == "mul.Tensor":
        left, right = node.args[:2]
        complex_side = [isinstance(x, fx.Node) and x.meta["val"].dtype.is_complex for x in (left, right)]
        if all(complex_side):
            a, b = e.parts(arg(left, node), _shape(left))
            c, d = e.parts(arg(right, node), _shape(right))
            re = e.op("sub", [e.op("mul", [a, c], out_shape), e.op("mul", [b, d], out_shape)], out_shape)
            im = e.op("add", [e.op("mul", [a, d], out_shape), e.op("mul", [b, c], out_shape)], out_shape)
            lowering.env[node] = e.op("stack", [[re, im], -1], (*out_shape, 2))
            return
        z, other = (left, right) if complex_side[0] else (right, left)
        scale = arg(other, node)
        if isinstance(other, fx.Node):  # a real tensor scales both parts
            scale = e.op("unsqueeze", [scale, -1], (*_shape(other), 1))
        elif not isinstance(other, (int, float)) or isinstance(other, bool):
            raise LoweringError(f"{where} multiplies a complex tensor by {type(other).__name__}")
        lowering.env[node] = e.op("mul", [arg(z, node), scale], (*out_shape, 2))
        return
    if name == "unsqueeze.default":
        z, dim = node.args[:2]
        rank = len(_shape(z))
        lowering.env[node] = e.op("unsqueeze", [arg(z, node), dim % (rank + 1)], (*out_shape, 2))
        return
    raise LoweringError(f"{where} computes with complex numbers, which lorashear lowers only for "
                        "polar, products, unsqueeze and view_as_complex/view_as_real",
                        hint="rotary embeddings in complex form (DeepSeek-V2) are supported; "
                        "other complex arithmetic is not")
