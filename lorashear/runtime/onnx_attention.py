"""``sdpa`` in ONNX: torch's ``scaled_dot_product_attention`` decomposed into standard ops.

Semantics follow torch exactly (inference, so ``dropout_p`` is ignored):
- ``scale`` defaults to ``1/sqrt(E)``, E the head size;
- a boolean ``attn_mask`` says which keys take part (False -> -inf before the softmax), a
  floating one is added to the scores;
- ``is_causal`` keeps key j for query i when ``j <= i`` (top-left aligned, as torch);
- ``enable_gqa`` repeats each key/value head ``Hq/Hkv`` times (``repeat_interleave``);
- a query row whose keys are all masked out yields zeros, as torch's safe softmax does,
  never NaN: left-padded rows are fully masked, and a NaN there would reach the valid
  positions through the next layer's ``probabilities @ V`` (0 * NaN = NaN).
"""

from __future__ import annotations

import math

import onnx_ir as ir

from lorashear.errors import EmissionError
from lorashear.ir.core import Op, Value
from lorashear.runtime.onnx_builder import OnnxGraphBuilder, rank_of
from lorashear.runtime.onnx_ops import result_dtype, translates


def _repeat_heads(b: OnnxGraphBuilder, x: ir.Value, x_ir: Value, repeats: int) -> ir.Value:
    """``x.repeat_interleave(repeats, dim=-3)``: [..., H, S, E] -> [..., H*repeats, S, E]."""
    if repeats == 1:
        return x
    rank, heads = rank_of(x_ir), x_ir.type.shape[-3]
    grown = b.op("Expand", b.op("Unsqueeze", x, b.ints([rank - 2])), b.ints([repeats, 1, 1]))
    shape = b.op("Concat", b.op("Shape", x, start=0, end=rank - 3), b.ints([heads * repeats]),
                 b.op("Shape", x, start=rank - 2), axis=0)
    return b.op("Reshape", grown, shape)


def _causal_mask(b: OnnxGraphBuilder, q: ir.Value, k: ir.Value, rank: int) -> ir.Value:
    """``tril(ones(L, S))`` as booleans: key j visible to query i iff j <= i."""
    length = b.op("Squeeze", b.op("Shape", q, start=rank - 2, end=rank - 1), b.ints([0]))
    source = b.op("Squeeze", b.op("Shape", k, start=rank - 2, end=rank - 1), b.ints([0]))
    zero, one = b.const(0, "i64"), b.const(1, "i64")
    rows = b.op("Unsqueeze", b.op("Range", zero, length, one), b.ints([1]))
    cols = b.op("Range", zero, source, one)
    return b.op("LessOrEqual", cols, rows)


@translates("sdpa")
def _sdpa(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    q_ir, k_ir, v_ir, mask_ir = a["query"], a["key"], a["value"], a["attn_mask"]
    dtype, rank = result_dtype(op), rank_of(q_ir)
    head_size = q_ir.type.shape[-1]
    if a["scale"] is None and not isinstance(head_size, int):
        raise EmissionError(f"sdpa needs a static head size for its default scale, got {q_ir.type}")
    scale = float(a["scale"]) if a["scale"] is not None else 1.0 / math.sqrt(head_size)
    q, k, v = (b.tensor(t, dtype) for t in (q_ir, k_ir, v_ir))
    if a["enable_gqa"]:
        q_heads, kv_heads = q_ir.type.shape[-3], k_ir.type.shape[-3]
        if not (isinstance(q_heads, int) and isinstance(kv_heads, int)) or q_heads % kv_heads:
            raise EmissionError(f"sdpa with enable_gqa needs static head counts with Hq % Hkv == 0, "
                                f"got query {q_ir.type}, key {k_ir.type}")
        k = _repeat_heads(b, k, k_ir, q_heads // kv_heads)
        v = _repeat_heads(b, v, v_ir, q_heads // kv_heads)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    scores = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=perm)), b.const(scale, dtype))

    keep = _causal_mask(b, q, k, rank) if a["is_causal"] else None
    row_alive = None  # only an explicit mask can empty a row (a causal row keeps key 0)
    if mask_ir is not None and mask_ir.type.dtype == "bool":
        mask = b.tensor(mask_ir)
        keep = mask if keep is None else b.op("And", keep, mask)
        row_alive = b.cast(b.op("ReduceMax", b.cast(keep, "i32"), b.ints([-1]), keepdims=1), "bool")
    elif mask_ir is not None:
        additive = b.tensor(mask_ir, dtype)
        if keep is not None:
            additive = b.op("Where", keep, additive, b.const(-math.inf, dtype))
            keep = None
        scores = b.op("Add", scores, additive)
        row_max = b.op("ReduceMax", additive, b.ints([-1]), keepdims=1)
        row_alive = b.op("Greater", row_max, b.const(-math.inf, dtype))
    if keep is not None:
        scores = b.op("Where", keep, scores, b.const(-math.inf, dtype))
    probabilities = b.op("Softmax", scores, axis=-1)
    if row_alive is not None:
        probabilities = b.op("Where", row_alive, probabilities, b.const(0.0, dtype))
    return b.op("MatMul", probabilities, v)
