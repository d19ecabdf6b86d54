"""ONNX translations of Mixture-of-Experts routing (:mod:`lorashear.frontend.moe`): the
router's ``topk``, the ``scatter`` of its weights into a ``[tokens, experts]`` matrix, and the
``scatter.value`` of a scalar that marks the chosen expert groups (DeepSeek-V3's routing)."""

from __future__ import annotations

import onnx_ir as ir

from lorashear.ir.core import Op
from lorashear.runtime.onnx_builder import OnnxGraphBuilder, normalize_axis, rank_of
from lorashear.runtime.onnx_ops import result_dtype, translates


@translates("topk")
def _topk(b: OnnxGraphBuilder, op: Op, a: dict) -> list[ir.Value]:
    """The ``k`` largest (or smallest) along ``dim`` and their indices, as ``TopK``; ``k`` may
    be a symbolic size (DeepSeek-V3.2's indexer keeps ``min(index_topk, S)`` keys)."""
    axis = normalize_axis(a["dim"], rank_of(a["self"]))
    values, indices = b.op_multi("TopK", b.tensor(a["self"]), b.sym_vector(a["k"]), num_outputs=2,
                                 axis=axis, largest=int(bool(a["largest"])), sorted=int(bool(a["sorted"])))
    return [values, b.cast(indices, result_dtype(op, 1))]


@translates("scatter", "scatter_add")
def _scatter(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    """``self`` with ``src``'s elements written (``scatter``) or added (``scatter_add``) at
    ``index`` along ``dim``, as ``ScatterElements``."""
    axis = normalize_axis(a["dim"], rank_of(a["self"]))
    add = {"reduction": "add"} if op.kind == "scatter_add" else {}
    return b.op("ScatterElements", b.tensor(a["self"], result_dtype(op)), b.tensor(a["index"], "i64"),
                b.tensor(a["src"], result_dtype(op)), axis=axis, **add)


@translates("scatter.value")
def _scatter_value(b: OnnxGraphBuilder, op: Op, a: dict) -> ir.Value:
    """``self`` with the scalar ``value`` written at ``index`` along ``dim``, as
    ``ScatterElements`` of the scalar expanded to the index's shape."""
    axis = normalize_axis(a["dim"], rank_of(a["self"]))
    dtype = result_dtype(op)
    index = b.tensor(a["index"], "i64")
    src = b.op("Expand", b.const(a["value"], dtype), b.op("Shape", index))
    return b.op("ScatterElements", b.tensor(a["self"], dtype), index, src, axis=axis)
