"""The state of one IR -> ONNX translation: value mapping, constants, dtypes, shape vectors.

:class:`OnnxGraphBuilder` owns the ``onnx_ir`` graph being built and answers the questions
every op translation asks: which ONNX value stands for this IR argument, as which element
type (torch's type promotion, decided from the IR types, since ONNX does not promote), and
how a list of (possibly symbolic) sizes becomes a 1-D ``int64`` shape tensor.

Conventions:
- a symbolic integer of the IR (``dim``, ``sym.*``) is an ``int64[1]`` tensor, the form
  ``Concat``/``Reshape``/``Slice`` take; :meth:`OnnxGraphBuilder.sym_scalar` gives its 0-D
  form for ``Range`` and elementwise use;
- parameters become initializers under their IR names, loaded lazily when the model is
  saved, so a checkpoint is streamed to disk rather than copied into memory;
- small constants are ``Constant`` nodes, so the initializers are exactly the parameters.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor

from lorashear.errors import EmissionError
from lorashear.ir.core import DTypeArg, Param, Value
from lorashear.ir.types import SymIntType, TensorType, dtype_name, torch_dtype

#: IR element type name -> ONNX element type.
ONNX_DTYPES: dict[str, ir.DataType] = {
    "f64": ir.DataType.DOUBLE, "f32": ir.DataType.FLOAT, "f16": ir.DataType.FLOAT16,
    "bf16": ir.DataType.BFLOAT16, "i64": ir.DataType.INT64, "i32": ir.DataType.INT32,
    "i16": ir.DataType.INT16, "i8": ir.DataType.INT8, "u8": ir.DataType.UINT8,
    "bool": ir.DataType.BOOL, "c64": ir.DataType.COMPLEX64,
}

#: Stand-in for "to the end" in ``Slice`` (torch clamps out-of-range bounds, so does ONNX).
INT64_MAX = 2**63 - 1


def onnx_dtype(name: str) -> ir.DataType:
    """The ONNX element type of an IR element type name."""
    try:
        return ONNX_DTYPES[name]
    except KeyError:
        raise EmissionError(f"element type {name!r} has no ONNX equivalent") from None


def onnx_shape(shape: tuple) -> ir.Shape:
    """An ONNX shape from an IR shape; symbolic sizes (``B``, ``S+1``) become named dims."""
    return ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(str(d)) for d in shape])


class OnnxGraphBuilder:
    """Builds one ONNX graph from one IR graph (see the module docstring)."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.graph = ir.Graph([], [], nodes=[], opset_imports={"": opset}, name="lorashear")
        self.tape = ir.tape.Tape(self.graph)
        self.env: dict[int, ir.Value] = {}
        self._initializers: dict[str, ir.Value] = {}
        self._constants: dict[tuple, ir.Value] = {}
        self._sym_scalars: dict[int, ir.Value] = {}
        # ids of ONNX values already named after an IR value (identity ops reuse a value)
        self.named: set[int] = set()
        self._loc = ""
        self._node_count = 0

    # --- nodes --------------------------------------------------------------------------------
    def at(self, loc: str) -> None:
        """Name the nodes created from now on after module path ``loc``."""
        self._loc = loc

    def _name(self, op_type: str) -> str:
        self._node_count += 1
        scope = "/" + self._loc.replace(".", "/") if self._loc else ""
        return f"{scope}/{op_type}_{self._node_count}"

    def op(self, op_type: str, *inputs: ir.Value | None, **attributes: Any) -> ir.Value:
        """Append one single-output node."""
        return self.tape.op(op_type, list(inputs), attributes or None, name=self._name(op_type))

    def op_multi(self, op_type: str, *inputs: ir.Value | None, num_outputs: int,
                 **attributes: Any) -> list[ir.Value]:
        """Append one node with ``num_outputs`` outputs."""
        return list(self.tape.op_multi_out(op_type, list(inputs), attributes or None,
                                           num_outputs=num_outputs, name=self._name(op_type)))

    # --- constants ----------------------------------------------------------------------------
    def const(self, data: Any, dtype: str) -> ir.Value:
        """A constant tensor of IR element type ``dtype`` (deduplicated)."""
        tensor = TorchTensor(torch.tensor(data, dtype=torch_dtype(dtype)))
        key = (dtype, tuple(tensor.shape.numpy()), tensor.tobytes())
        value = self._constants.get(key)
        if value is None:
            value = self.op("Constant", value=tensor)
            self._constants[key] = value
        return value

    def ints(self, values: list[int]) -> ir.Value:
        """A 1-D ``int64`` constant (axes, shapes, slice bounds)."""
        return self.const([int(v) for v in values], "i64")

    # --- arguments ----------------------------------------------------------------------------
    def register_param(self, param: Param) -> ir.Value:
        """The initializer of ``param``, created on first use under the parameter's name."""
        value = self._initializers.get(param.name)
        if value is None:
            dtype = torch_dtype(param.type.dtype)

            def load(p: Param = param, want: torch.dtype = dtype) -> TorchTensor:
                return TorchTensor(p.storage.load().to("cpu", want).contiguous(), name=p.name)

            lazy = ir.LazyTensor(load, onnx_dtype(param.type.dtype), onnx_shape(param.type.shape),
                                 name=param.name)
            value = self.tape.initializer(lazy, name=param.name)
            self._initializers[param.name] = value
        return value

    def value(self, arg: Value | Param) -> ir.Value:
        """The ONNX value of an IR value or parameter (symbolic integers as ``int64[1]``)."""
        if isinstance(arg, Param):
            return self.register_param(arg)
        try:
            return self.env[id(arg)]
        except KeyError:
            raise EmissionError(f"value %{arg.name} is used before it is defined") from None

    def sym_scalar(self, arg: Value | int) -> ir.Value:
        """A symbolic or literal integer as a 0-D ``int64`` tensor."""
        if isinstance(arg, int):
            return self.const(arg, "i64")
        scalar = self._sym_scalars.get(id(arg))
        if scalar is None:
            scalar = self.op("Squeeze", self.value(arg), self.ints([0]))
            self._sym_scalars[id(arg)] = scalar
        return scalar

    def sym_vector(self, arg: Value | int) -> ir.Value:
        """A symbolic or literal integer as an ``int64[1]`` tensor."""
        return self.ints([arg]) if isinstance(arg, int) else self.value(arg)

    def shape_vector(self, sizes: list) -> ir.Value:
        """A list of literal and symbolic sizes as one 1-D ``int64`` tensor."""
        if all(isinstance(s, int) for s in sizes):
            return self.ints(sizes)
        parts: list[ir.Value] = []
        literals: list[int] = []
        for size in sizes:
            if isinstance(size, int):
                literals.append(size)
                continue
            if literals:
                parts.append(self.ints(literals))
                literals = []
            parts.append(self.sym_vector(size))
        if literals:
            parts.append(self.ints(literals))
        return self.op("Concat", *parts, axis=0)

    def tensor(self, arg: Any, dtype: str | None = None) -> ir.Value:
        """An IR argument (value, parameter, symbolic or Python scalar) as a tensor of ``dtype``.

        ``dtype=None`` keeps the argument's own type; scalars then need a ``dtype``.
        """
        if isinstance(arg, Value) and isinstance(arg.type, SymIntType):
            out, have = self.sym_scalar(arg), "i64"
        elif isinstance(arg, (Value, Param)):
            out, have = self.value(arg), arg.type.dtype
        elif isinstance(arg, (bool, int, float)):
            if dtype is None:
                raise EmissionError(f"scalar {arg!r} needs an element type")
            return self.const(arg, dtype)
        else:
            raise EmissionError(f"expected a tensor or a scalar, got {arg!r}")
        return out if dtype is None or dtype == have else self.cast(out, dtype)

    def cast(self, value: ir.Value, dtype: str) -> ir.Value:
        return self.op("Cast", value, to=onnx_dtype(dtype))


# --- type facts from the IR ---------------------------------------------------------------------
def dtype_of(arg: Any) -> str | None:
    """The IR element type of a tensor argument; ``None`` for Python scalars."""
    if isinstance(arg, Value) and isinstance(arg.type, SymIntType):
        return "i64"
    if isinstance(arg, (Value, Param)):
        return arg.type.dtype
    if isinstance(arg, DTypeArg):
        return arg.name
    return None


def rank_of(arg: Value | Param) -> int:
    """The rank of a tensor argument, from its IR type."""
    if not isinstance(arg.type, TensorType):
        raise EmissionError(f"%{arg.name} is not a tensor")
    return arg.type.rank


def normalize_axis(axis: int, rank: int) -> int:
    """A non-negative axis (torch allows negative ones)."""
    return axis + rank if axis < 0 else axis


def _promotion_stand_in(arg: Any) -> Any:
    """A value with the same type-promotion category as ``arg`` for :func:`torch.result_type`."""
    if isinstance(arg, Value) and isinstance(arg.type, SymIntType):
        return 1
    if isinstance(arg, (Value, Param)):
        return torch.empty([1] * arg.type.rank, dtype=torch_dtype(arg.type.dtype), device="meta")
    if isinstance(arg, (bool, int, float)):
        return arg
    raise EmissionError(f"cannot type-promote argument {arg!r}")


def promoted_dtype(a: Any, b: Any) -> str:
    """torch's result element type of a binary op on ``a`` and ``b`` (tensors or scalars)."""
    return dtype_name(torch.result_type(_promotion_stand_in(a), _promotion_stand_in(b)))
