"""The translation table: one function per IR op kind, emitting the ONNX nodes it stands for.

Each translation receives the builder, the IR op and the op's arguments bound by name
(:meth:`~lorashear.ir.core.Op.bound_args`), and returns the ONNX value(s) of
the op's result(s). Element types follow the IR: arithmetic runs in the IR result type,
comparisons in torch's promoted operand type, because ONNX does not promote.

Every IR kind has a translation or is listed with :func:`no_translation` and the reason
(``tests/analysis/test_op_coverage.py`` checks it); :func:`~lorashear.runtime.onnx_emit.emit_onnx`
reports a kind without one as unsupported, naming the op, its module path and that reason. Shape and indexing ops live in
:mod:`lorashear.runtime.onnx_shape_ops`, attention (``sdpa``) in
:mod:`lorashear.runtime.onnx_attention`; both register into the same table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import onnx_ir as ir
import torch

from lorashear.ir.core import Op
from lorashear.ir.ops import RuleTable
from lorashear.ir.types import torch_dtype
from lorashear.runtime.onnx_builder import (
    OnnxGraphBuilder,
    normalize_axis,
    promoted_dtype,
    rank_of,
)

Translation = Callable[[OnnxGraphBuilder, Op, dict[str, Any]], "ir.Value | list[ir.Value]"]

#: IR op kind -> the function that emits its ONNX nodes.
TRANSLATIONS: RuleTable[Translation] = RuleTable("an ONNX translation")
translates = TRANSLATIONS.register


#: IR op kinds deliberately left without an ONNX translation -> why.
NO_TRANSLATION: dict[str, str] = {}


def no_translation(*kinds: str, reason: str) -> None:
    """Record that ``kinds`` have no ONNX translation, and why (the emission error says so)."""
    for kind in kinds:
        if kind in TRANSLATIONS:
            raise ValueError(f"op kind {kind!r} has an ONNX translation")
        NO_TRANSLATION[kind] = reason


def result_dtype(op: Op, index: int = 0) -> str:
    return op.results[index].type.dtype


def result_rank(op: Op, index: int = 0) -> int:
    return op.results[index].type.rank


def _axes(dims: Any, rank: int) -> list[int] | None:
    """Reduction axes as non-negative ints; ``None`` means all axes."""
    if dims is None:
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    return [normalize_axis(d, rank) for d in dims] or None


# --- our own kinds and symbolic integers ------------------------------------------------------
@translates("cast")
def _cast(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    return b.tensor(a["x"], a["dtype"].name)


@translates("dropout")
def _dropout(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    return b.tensor(a["x"])  # inference: identity


@translates("dim")
def _dim(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    axis = normalize_axis(a["axis"], rank_of(a["x"]))
    return b.op("Shape", b.value(a["x"]), start=axis, end=axis + 1)


def _sym_binary(onnx_op: str) -> Translation:
    def translate(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
        left, right = (b.sym_vector(x) for x in op.args)
        return b.op(onnx_op, left, right)
    return translate


for _kind, _onnx_op in (("sym.add", "Add"), ("sym.sub", "Sub"), ("sym.mul", "Mul"), ("sym.max", "Max"),
                        ("sym.min", "Min")):
    translates(_kind)(_sym_binary(_onnx_op))


@translates("sym.floordiv")
def _sym_floordiv(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    # ONNX integer Div truncates; Python floors. (x - x mod y) / y is exact for both signs.
    x, y = (b.sym_vector(v) for v in op.args)
    return b.op("Div", b.op("Sub", x, b.op("Mod", x, y, fmod=0)), y)


@translates("sym.mod")
def _sym_mod(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    x, y = (b.sym_vector(v) for v in op.args)
    return b.op("Mod", x, y, fmod=0)  # fmod=0: the sign of the divisor, like Python


@translates("sym.neg")
def _sym_neg(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    return b.op("Neg", b.sym_vector(op.args[0]))


# --- elementwise ------------------------------------------------------------------------------
def _unary(onnx_op: str) -> Translation:
    def translate(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
        return b.op(onnx_op, b.tensor(a["self"], result_dtype(op)))
    return translate


for _kind, _onnx_op in (("neg", "Neg"), ("sqrt", "Sqrt"), ("exp", "Exp"), ("log", "Log"),
                        ("abs", "Abs"), ("reciprocal", "Reciprocal"), ("cos", "Cos"),
                        ("sin", "Sin"), ("tanh", "Tanh"), ("sigmoid", "Sigmoid"),
                        ("relu", "Relu"), ("erf", "Erf"), ("floor", "Floor")):
    translates(_kind)(_unary(_onnx_op))


@translates("rsqrt")
def _rsqrt(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    return b.op("Reciprocal", b.op("Sqrt", b.tensor(a["self"], result_dtype(op))))


@translates("silu")
def _silu(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    x = b.tensor(a["self"], result_dtype(op))
    return b.op("Mul", x, b.op("Sigmoid", x))


@translates("square")
def _square(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    x = b.tensor(a["self"], result_dtype(op))
    return b.op("Mul", x, x)


@translates("log1p")
def _log1p(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype = result_dtype(op)
    return b.op("Log", b.op("Add", b.tensor(a["self"], dtype), b.const(1.0, dtype)))


@translates("expm1")
def _expm1(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype = result_dtype(op)
    return b.op("Sub", b.op("Exp", b.tensor(a["self"], dtype)), b.const(1.0, dtype))


@translates("softplus")
def _softplus(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    """``log(1 + exp(beta x)) / beta``, and ``x`` itself where ``beta x > threshold`` (torch's
    linear region, which also keeps ``exp`` from overflowing)."""
    dtype = result_dtype(op)
    x = b.tensor(a["self"], dtype)
    beta, threshold = float(a["beta"]), float(a["threshold"])
    scaled = b.op("Mul", x, b.const(beta, dtype)) if beta != 1.0 else x
    smooth = b.op("Softplus", scaled)
    if beta != 1.0:
        smooth = b.op("Div", smooth, b.const(beta, dtype))
    return b.op("Where", b.op("Greater", scaled, b.const(threshold, dtype)), x, smooth)


@translates("gelu")
def _gelu(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype = result_dtype(op)
    x = b.tensor(a["self"], dtype)
    if a["approximate"] == "tanh":
        cube = b.op("Mul", b.op("Mul", x, x), x)
        inner = b.op("Add", x, b.op("Mul", cube, b.const(0.044715, dtype)))
        gate = b.op("Tanh", b.op("Mul", inner, b.const(math.sqrt(2 / math.pi), dtype)))
    else:
        gate = b.op("Erf", b.op("Mul", x, b.const(1 / math.sqrt(2), dtype)))
    half_x = b.op("Mul", x, b.const(0.5, dtype))
    return b.op("Mul", half_x, b.op("Add", gate, b.const(1.0, dtype)))


#: torch's arithmetic on booleans, as ONNX's logic ops (Reformer multiplies masks).
_BOOL_ARITHMETIC = {"Mul": "And", "Add": "Or", "Max": "Or", "Min": "And"}


def _binary(onnx_op: str, *, reverse: bool = False) -> Translation:
    """``self OP other`` (or ``other OP self``) in the result type; ``alpha`` scales ``other``."""
    def translate(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
        dtype = result_dtype(op)
        left, right = b.tensor(a["self"], dtype), b.tensor(a["other"], dtype)
        alpha = a.get("alpha", 1)
        if reverse:
            left, right = right, left
        if alpha != 1:  # add/sub scale `other`; rsub (reverse) scales `self`
            right = b.op("Mul", right, b.const(alpha, dtype))
        if dtype == "bool" and onnx_op in _BOOL_ARITHMETIC:  # ONNX arithmetic takes no booleans
            return b.op(_BOOL_ARITHMETIC[onnx_op], left, right)
        return b.op(onnx_op, left, right)
    return translate


for _kind, _onnx_op in (("add", "Add"), ("add.scalar", "Add"), ("sub", "Sub"), ("mul", "Mul"),
                        ("mul.scalar", "Mul"), ("div", "Div"), ("minimum", "Min"),
                        ("maximum", "Max")):
    translates(_kind)(_binary(_onnx_op))
translates("rsub")(_binary("Sub", reverse=True))


@translates("pow", "pow.tensor")
def _pow(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype = result_dtype(op)
    base = b.tensor(a["self"], dtype)
    if a["exponent"] == 2:  # exact and cheaper than Pow
        return b.op("Mul", base, base)
    return b.op("Pow", base, b.tensor(a["exponent"], dtype))


@translates("div.mode")
def _div_mode(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype, mode = result_dtype(op), a["rounding_mode"]
    x, y = b.tensor(a["self"], dtype), b.tensor(a["other"], dtype)
    floating = dtype in ("f64", "f32", "f16", "bf16")
    if mode is None:
        return b.op("Div", x, y)
    if mode == "trunc":  # integer Div already truncates
        return _trunc(b, b.op("Div", x, y), dtype) if floating else b.op("Div", x, y)
    return _floor_divide(b, x, y, dtype)


def _floor_divide(b: OnnxGraphBuilder, x: ir.Value, y: ir.Value, dtype: str) -> ir.Value:
    """``x // y`` rounded toward minus infinity, as torch's (ONNX's integer Div truncates)."""
    if dtype in ("f64", "f32", "f16", "bf16"):
        return b.op("Floor", b.op("Div", x, y))
    return b.op("Div", b.op("Sub", x, b.op("Mod", x, y, fmod=0)), y)


def _trunc(b: OnnxGraphBuilder, x: ir.Value, dtype: str) -> ir.Value:
    """Round toward zero: floor for positives, ceil for negatives."""
    negative = b.op("Less", x, b.const(0, dtype))
    return b.op("Where", negative, b.op("Ceil", x), b.op("Floor", x))


@translates("clamp")
def _clamp(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype = result_dtype(op)
    low = None if a["min"] is None else b.tensor(a["min"], dtype)
    high = None if a["max"] is None else b.tensor(a["max"], dtype)
    return b.op("Clip", b.tensor(a["self"], dtype), low, high)


@translates("pow.scalar")
def _pow_scalar(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    """``scalar ** tensor`` (ALiBi's slopes ``2 ** -k``)."""
    dtype = result_dtype(op)
    return b.op("Pow", b.const(a["self"], dtype), b.tensor(a["exponent"], dtype))


@translates("where", "where.scalar_other", "where.scalar_self", "where.scalar")
def _where(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype = result_dtype(op)
    return b.op("Where", b.tensor(a["condition"], "bool"), b.tensor(a["self"], dtype),
                b.tensor(a["other"], dtype))


@translates("masked_fill", "masked_fill.tensor")
def _masked_fill(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype = result_dtype(op)
    return b.op("Where", b.tensor(a["mask"], "bool"), b.tensor(a["value"], dtype),
                b.tensor(a["self"], dtype))


# --- comparisons and logic --------------------------------------------------------------------
def _compare(onnx_op: str, *, negate: bool = False) -> Translation:
    def translate(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
        dtype = promoted_dtype(a["self"], a["other"])
        out = b.op(onnx_op, b.tensor(a["self"], dtype), b.tensor(a["other"], dtype))
        return b.op("Not", out) if negate else out
    return translate


for _kinds, _onnx_op, _negate in ((("eq", "eq.scalar"), "Equal", False),
                                  (("ne", "ne.scalar"), "Equal", True),
                                  (("lt", "lt.scalar"), "Less", False),
                                  (("le", "le.scalar"), "LessOrEqual", False),
                                  (("gt", "gt.scalar"), "Greater", False),
                                  (("ge", "ge.scalar"), "GreaterOrEqual", False)):
    translates(*_kinds)(_compare(_onnx_op, negate=_negate))


def _bitwise(bool_op: str, int_op: str) -> Translation:
    """``&``/``|``/``~``: logical on bool tensors, bitwise on integers."""
    def translate(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
        dtype = result_dtype(op)
        operands = [b.tensor(a[name], dtype) for name in ("self", "other") if name in a]
        return b.op(bool_op if dtype == "bool" else int_op, *operands)
    return translate


translates("and")(_bitwise("And", "BitwiseAnd"))
translates("or")(_bitwise("Or", "BitwiseOr"))
translates("not")(_bitwise("Not", "BitwiseNot"))


def _logical(onnx_op: str) -> Translation:
    def translate(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
        operands = [b.tensor(a[name], "bool") for name in ("self", "other") if name in a]
        return b.op(onnx_op, *operands)
    return translate


translates("logical_and")(_logical("And"))
translates("logical_or")(_logical("Or"))
translates("logical_not")(_logical("Not"))


# --- reductions and normalisation -------------------------------------------------------------
def _reduce(onnx_op: str) -> Translation:
    def translate(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
        x = b.tensor(a["self"], result_dtype(op))
        axes = _axes(a.get("dim"), rank_of(a["self"]))
        inputs = [x] if axes is None else [x, b.ints(axes)]
        return b.op(onnx_op, *inputs, keepdims=int(bool(a.get("keepdim", False))))
    return translate


translates("mean")(_reduce("ReduceMean"))
translates("sum")(_reduce("ReduceSum"))
translates("amax")(_reduce("ReduceMax"))
translates("max")(_reduce("ReduceMax"))
translates("logsumexp")(_reduce("ReduceLogSumExp"))
translates("min")(_reduce("ReduceMin"))


@translates("max.dim")
def _max_dim(b: OnnxGraphBuilder, op: Op, a: dict) -> list[ir.Value]:
    """The maximum over ``dim`` and its first index (as torch returns)."""
    x = b.tensor(a["self"], result_dtype(op))
    axis = _axes(a["dim"], rank_of(a["self"]))
    keepdims = int(bool(a["keepdim"]))
    values = b.op("ReduceMax", x, b.ints(axis), keepdims=keepdims)
    indices = b.op("ArgMax", x, axis=axis[0], keepdims=keepdims, select_last_index=0)
    return [values, b.cast(indices, result_dtype(op, 1))]


def _reduce_bool(onnx_op: str) -> Translation:
    """``any``/``all`` as max/min over 0/1 integers (opset 18 reductions take no bool)."""
    def translate(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
        x = b.cast(b.tensor(a["self"], "bool"), "i32")
        axes = _axes(a.get("dim"), rank_of(a["self"]))
        inputs = [x] if axes is None else [x, b.ints(axes)]
        reduced = b.op(onnx_op, *inputs, keepdims=int(bool(a.get("keepdim", False))))
        return b.cast(reduced, result_dtype(op))
    return translate


translates("any")(_reduce_bool("ReduceMax"))
translates("all")(_reduce_bool("ReduceMin"))


@translates("softmax", "softmax.internal", "log_softmax", "log_softmax.int")
def _softmax(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    onnx_op = "LogSoftmax" if op.kind.startswith("log_") else "Softmax"
    return b.op(onnx_op, b.tensor(a["self"], result_dtype(op)), axis=a["dim"])


@translates("cumsum")
def _cumsum(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    return b.op("CumSum", b.tensor(a["self"], result_dtype(op)), b.const(a["dim"], "i64"))


@translates("layer_norm")
def _layer_norm(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype, shape = result_dtype(op), [int(s) for s in a["normalized_shape"]]
    scale = b.const(1.0, dtype) if a["weight"] is None else b.tensor(a["weight"], dtype)
    if a["weight"] is None:
        scale = b.op("Expand", scale, b.ints(shape))
    # no bias: the input is left out, not given empty (ONNX Runtime's layer-norm fusion
    # crashes on an empty trailing input)
    inputs = [b.tensor(a["input"], dtype), scale] + ([] if a["bias"] is None else [b.tensor(a["bias"], dtype)])
    return b.op("LayerNormalization", *inputs, axis=-len(shape), epsilon=float(a["eps"]))


@translates("rms_norm")
def _rms_norm(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype = result_dtype(op)
    eps = a["eps"] if a["eps"] is not None else torch.finfo(torch_dtype(dtype)).eps
    x = b.tensor(a["input"], dtype)
    axes = list(range(-len(a["normalized_shape"]), 0))
    mean_square = b.op("ReduceMean", b.op("Mul", x, x), b.ints(axes), keepdims=1)
    inv_rms = b.op("Reciprocal", b.op("Sqrt", b.op("Add", mean_square, b.const(float(eps), dtype))))
    out = b.op("Mul", x, inv_rms)
    return out if a["weight"] is None else b.op("Mul", out, b.tensor(a["weight"], dtype))


# --- linear algebra ---------------------------------------------------------------------------
def linear(b: OnnxGraphBuilder, x: ir.Value, weight: ir.Value, bias: ir.Value | None) -> ir.Value:
    """``x @ W^T + b`` with W in its checkpoint layout ([out, in]), so its name survives."""
    out = b.op("MatMul", x, b.op("Transpose", weight, perm=[1, 0]))
    return out if bias is None else b.op("Add", out, bias)


@translates("linear")
def _linear(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype = result_dtype(op)
    bias = None if a["bias"] is None else b.tensor(a["bias"], dtype)
    return linear(b, b.tensor(a["input"], dtype), b.tensor(a["weight"], dtype), bias)


@translates("lora_linear")
def _lora_linear(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype = result_dtype(op)
    x = b.tensor(a["x"], dtype)
    bias = None if a["bias"] is None else b.tensor(a["bias"], dtype)
    base = linear(b, x, b.tensor(a["weight"], dtype), bias)
    down = linear(b, x, b.tensor(a["lora_A"], dtype), None)
    up = linear(b, down, b.tensor(a["lora_B"], dtype), None)
    return b.op("Add", base, b.op("Mul", up, b.const(float(a["scaling"]), dtype)))


@translates("matmul", "bmm", "mm")
def _matmul(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype = result_dtype(op)
    other = a["other"] if "other" in a else a["mat2"]
    return b.op("MatMul", b.tensor(a["self"], dtype), b.tensor(other, dtype))


@translates("addmm", "baddbmm")
def _addmm(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype = result_dtype(op)
    left, right = ("mat1", "mat2") if op.kind == "addmm" else ("batch1", "batch2")
    product = b.op("MatMul", b.tensor(a[left], dtype), b.tensor(a[right], dtype))
    if a["alpha"] != 1:
        product = b.op("Mul", product, b.const(a["alpha"], dtype))
    if a["beta"] == 0:
        return product
    addend = b.tensor(a["self"], dtype)
    if a["beta"] != 1:
        addend = b.op("Mul", addend, b.const(a["beta"], dtype))
    return b.op("Add", addend, product)


@translates("embedding")
def _embedding(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    return b.op("Gather", b.tensor(a["weight"]), b.tensor(a["indices"]), axis=0)


# --- tensors made from scratch ----------------------------------------------------------------
def _fill(b: OnnxGraphBuilder, op: Op, value: Any, shape: ir.Value) -> ir.Value:
    return b.op("Expand", b.tensor(value, result_dtype(op)), shape)


@translates("full", "ones", "zeros", "empty", "new_ones", "new_zeros", "new_full")
def _full(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    fill = 1 if op.kind in ("ones", "new_ones") else a.get("fill_value", 0)
    return _fill(b, op, fill, b.shape_vector(list(a["size"])))


@translates("ones_like", "zeros_like", "full_like")
def _full_like(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    fill = {"ones_like": 1, "zeros_like": 0}.get(op.kind, a.get("fill_value"))
    return _fill(b, op, fill, b.op("Shape", b.value(a["self"])))


@translates("scalar_tensor")
def _scalar_tensor(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    return b.tensor(a["s"], result_dtype(op))


@translates("arange", "arange.start", "arange.start_step")
def _arange(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype = result_dtype(op)
    start, end, step = a.get("start", 0), a["end"], a.get("step", 1)

    def scalar(x: Any) -> ir.Value:
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return b.const(x, dtype)
        return b.tensor(x, dtype)

    return b.op("Range", scalar(start), scalar(end), scalar(step))



# --- ops of the conformance sweep's decoders (issue #22) ------------------------------------------
@translates("eye")
def _eye(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    n = b.sym_vector(a["n"])
    square = b.op("ConstantOfShape", b.op("Concat", n, n, axis=0))
    return b.cast(b.op("EyeLike", square), result_dtype(op))


@translates("pad", "pad.constant")
def _pad(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    mode = a.get("mode", "constant")
    if mode != "constant":
        from lorashear.errors import EmissionError

        raise EmissionError(f"padding mode {mode!r} has no translation (only constant padding)")
    rank = rank_of(a["self"])
    amounts = list(a["pad"])
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(amounts) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = amounts[2 * i], amounts[2 * i + 1]
    dtype = result_dtype(op)
    value = a["value"] if a["value"] is not None else 0
    return b.op("Pad", b.tensor(a["self"], dtype), b.shape_vector(begins + ends), b.const(value, dtype),
                mode="constant")


@translates("einsum")
def _einsum(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype = result_dtype(op)
    return b.op("Einsum", *(b.tensor(t, dtype) for t in a["tensors"]), equation=a["equation"].replace(" ", ""))


@translates("conv1d")
def _conv1d(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype = result_dtype(op)
    padding = a["padding"]
    if isinstance(padding, str):
        from lorashear.errors import EmissionError

        raise EmissionError(f"convolution padding {padding!r} has no translation (give it as sizes)")
    single = rank_of(a["input"]) == 2
    x = b.tensor(a["input"], dtype)
    if single:
        x = b.op("Unsqueeze", x, b.ints([0]))
    pads = list(padding) if isinstance(padding, list) else [padding]
    inputs = [x, b.tensor(a["weight"], dtype)]
    if a["bias"] is not None:
        inputs.append(b.tensor(a["bias"], dtype))
    out = b.op("Conv", *inputs, group=int(a["groups"]), strides=list(a["stride"]), dilations=list(a["dilation"]),
               pads=pads + pads)
    return b.op("Squeeze", out, b.ints([0])) if single else out


@translates("clamp_max", "clamp_min")
def _clamp_one_side(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype = result_dtype(op)
    bound = a["max"] if op.kind == "clamp_max" else a["min"]
    return b.op("Min" if op.kind == "clamp_max" else "Max", b.tensor(a["self"], dtype), b.tensor(bound, dtype))


@translates("log_sigmoid")
def _log_sigmoid(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    """``min(x, 0) - log(1 + exp(-|x|))``: torch's stable form (``-softplus(-x)`` overflows
    for very negative x)."""
    dtype = result_dtype(op)
    x = b.tensor(a["self"], dtype)
    tail = b.op("Log", b.op("Add", b.const(1, dtype), b.op("Exp", b.op("Neg", b.op("Abs", x)))))
    return b.op("Sub", b.op("Min", x, b.const(0, dtype)), tail)


@translates("floor_divide")
def _floor_divide_op(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    dtype = result_dtype(op)
    return _floor_divide(b, b.tensor(a["self"], dtype), b.tensor(a["other"], dtype), dtype)


@translates("linalg_vector_norm")
def _vector_norm(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    """``(sum |x|^ord)^(1/ord)`` over ``dim``: ``ReduceL2``/``ReduceL1``, the infinity norms as
    ``ReduceMax``/``ReduceMin`` of ``|x|``, other orders spelled out."""
    dtype = result_dtype(op)
    x = b.tensor(a["self"], dtype)
    axes = _axes(a["dim"], rank_of(a["self"]))
    keep = int(bool(a["keepdim"]))
    order = float(a["ord"])

    def reduce(onnx_op: str, value: ir.Value) -> ir.Value:
        return b.op(onnx_op, value, *([] if axes is None else [b.ints(axes)]), keepdims=keep)

    if order == 2:
        return reduce("ReduceL2", x)
    if order == 1:
        return reduce("ReduceL1", x)
    if math.isinf(order):
        return reduce("ReduceMax" if order > 0 else "ReduceMin", b.op("Abs", x))
    if order == 0:
        return reduce("ReduceSum", b.cast(b.op("Not", b.op("Equal", x, b.const(0, dtype))), dtype))
    powered = b.op("Pow", b.op("Abs", x), b.const(order, dtype))
    return b.op("Pow", reduce("ReduceSum", powered), b.const(1.0 / order, dtype))


#: Giles' single-precision approximation of erfinv (M. Giles, "Approximating the erfinv
#: function", GPU Computing Gems, 2011): polynomial coefficients in w = -log(1 - x^2), for
#: w < 5 (in w - 2.5) and otherwise (in sqrt(w) - 3), highest degree first.
_ERFINV_CENTRAL = (2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
                   -0.00125372503, -0.00417768164, 0.246640727, 1.50140941)
_ERFINV_TAIL = (-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
                -0.0076224613, 0.00943887047, 1.00167406, 2.83297682)


@translates("erfinv")
def _erfinv(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    """``erfinv(x) = x * p(w)``, ``w = -log((1 - x)(1 + x))``, with Giles' two polynomials
    (relative error about 1e-7 in float32; ONNX has no erfinv); computed in float32 at least."""
    dtype = result_dtype(op)
    work = "f64" if dtype == "f64" else "f32"
    x = b.tensor(a["self"], work)
    one = b.const(1, work)
    w = b.op("Neg", b.op("Log", b.op("Mul", b.op("Sub", one, x), b.op("Add", one, x))))

    def poly(t: ir.Value, coefficients: tuple[float, ...]) -> ir.Value:
        p = b.const(coefficients[0], work)
        for c in coefficients[1:]:
            p = b.op("Add", b.const(c, work), b.op("Mul", p, t))
        return p

    central = poly(b.op("Sub", w, b.const(2.5, work)), _ERFINV_CENTRAL)
    tail = poly(b.op("Sub", b.op("Sqrt", w), b.const(3.0, work)), _ERFINV_TAIL)
    p = b.op("Where", b.op("Less", w, b.const(5.0, work)), central, tail)
    return b.cast(b.op("Mul", p, x), dtype)


@translates("std")
def _std(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    """``sqrt(sum((x - mean)^2) / (n - 1 if unbiased else n))`` over ``dim``, ``n`` counted as
    the sum of ones over those axes (sizes may be symbolic)."""
    dtype = result_dtype(op)
    x = b.tensor(a["self"], dtype)
    axes = _axes(a["dim"], rank_of(a["self"]))
    keep = int(bool(a["keepdim"]))

    def reduce(onnx_op: str, value: ir.Value, keepdims: int) -> ir.Value:
        return b.op(onnx_op, value, *([] if axes is None else [b.ints(axes)]), keepdims=keepdims)

    centred = b.op("Sub", x, reduce("ReduceMean", x, 1))
    squares = reduce("ReduceSum", b.op("Mul", centred, centred), keep)
    count = reduce("ReduceSum", b.op("Expand", b.const(1, dtype), b.op("Shape", x)), keep)
    if a["unbiased"]:
        count = b.op("Sub", count, b.const(1, dtype))
    return b.op("Sqrt", b.op("Div", squares, count))
