"""`compress`: slice the removed groups out of every weight, producing a smaller dense IR.

The two-pass dependency traversal, in factor form: the coupling analysis already maps every
axis of every value and parameter to its factors, so pass 1 (output slices per group) and
pass 2 (each consumer's input slices) are one walk over the parameters' axes, and every
value's new shape follows from its factors' new sizes. Shape literals (reshape, expand) are
rewritten from the new result shapes; a mean over a shrunk axis keeps its original divisor
(sum / N), which keeps RMSNorm exact, so the compressed model equals the masked one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lorashear.analysis.coupling import CouplingResult, DimensionCoupling
from lorashear.analysis.groups import GroupsAttr, PruneMaskAttr
from lorashear.analysis.manager import AnalysisManager
from lorashear.analysis.masking import keep_masks, validate_removal
from lorashear.errors import PassError
from lorashear.ir.attributes import HFConfigAttr
from lorashear.ir.core import Module, Op, Param, Value
from lorashear.ir.storage import DataStorage, MetaStorage
from lorashear.ir.types import TensorType
from lorashear.passes.base import ModulePass, PassResult
from lorashear.passes.discover import groups_from_coupling
from lorashear.passes.registry import register_pass

_SHAPE_ARG_OPS = frozenset({"reshape", "expand"})


def compress_module(module: Module, groups: GroupsAttr, removed: dict[int, tuple[int, ...]],
                    am: AnalysisManager | None = None) -> dict[str, int]:
    """Remove the given units from ``module`` in place; returns statistics. The coupling comes
    from ``am`` (a pass's manager: cached if discover computed it) or a fresh manager."""
    validate_removal(groups, removed)
    coupling = (am or AnalysisManager(module)).get(DimensionCoupling)
    if groups_from_coupling(coupling).families != groups.families:
        raise PassError("the module changed since `discover` found its groups",
                        hint="run discover again before prune/compress")
    fs = coupling.factors
    new_size: dict[int, int] = {}
    for family_id, units in removed.items():
        if units:
            leaf = coupling.families[family_id][0]
            new_size[leaf] = coupling.families[family_id][3] - len(set(units))
    before = module.num_parameters()

    # parameters: slice every axis a removed family runs along
    for (name, axis), keep in keep_masks(module, groups, removed).items():
        param = module.params[name]
        index = torch.nonzero(keep).flatten()
        shape = list(param.type.shape)
        shape[axis] = int(index.numel())
        if param.storage.has_data:
            param.storage = DataStorage(param.storage.load().index_select(axis, index).contiguous())
        else:
            param.storage = MetaStorage()
        param.type = TensorType(param.type.dtype, tuple(shape))
    for param in module.params.values():
        if id(param) in coupling.axes:
            _check_factors(coupling, param, new_size)

    # values: new static sizes from the factors
    for key, ref in coupling.refs.items():
        if isinstance(ref, Value) and isinstance(ref.type, TensorType):
            ref.type = ref.type.with_shape(tuple(
                d if isinstance(d, str) else _axis_size(coupling, key, j, new_size)
                for j, d in enumerate(ref.type.shape)))

    # shape literals and divisors
    for op in module.graph.ops:
        if op.kind in _SHAPE_ARG_OPS and len(op.args) > 1 and isinstance(op.args[1], list):
            out_shape = op.results[0].type.shape
            op.args[1] = [out_shape[j] if isinstance(a, int) and a != -1 and isinstance(out_shape[j], int)
                          else a for j, a in enumerate(op.args[1])]
    rewritten = 0
    shrunk = {id(r.op) for r in coupling.reductions if any(fs.find(f) in new_size for f in r.factors)}
    eps_scale: set[float] = set()
    for op in list(module.graph.ops):
        if op.kind == "mean" and id(op) in shrunk:
            scale = _rescale_rms_norm(module, op, coupling, new_size)
            if scale is None:
                _keep_mean_divisor(module, op, coupling)
            else:
                eps_scale.add(scale)
            rewritten += 1
    _update_config(module, groups, removed, eps_scale)
    module.attributes.pop("groups", None)
    for stale in ("prune-mask", "saliency"):  # indices into the groups that no longer exist
        module.attributes.pop(stale, None)
    return {"parameters removed": before - module.num_parameters(), "means rewritten": rewritten}


def _axis_size(coupling: CouplingResult, key: int, axis: int, new_size: dict[int, int]) -> int:
    fs = coupling.factors
    size = 1
    for f in coupling.axes[key][axis]:
        for leaf in fs.leaves(f):
            root = fs.find(leaf)
            size *= new_size.get(root, fs.size[root] or 1)
    return size


def _check_factors(coupling: CouplingResult, param: Param, new_size: dict[int, int]) -> None:
    for axis, dim in enumerate(param.type.shape):
        want = _axis_size(coupling, id(param), axis, new_size)
        if want != dim:
            raise PassError(f"internal: @{param.name} axis {axis} sliced to {dim}, factors say {want}")


def _single_user(module: Module, value: Value) -> Op | None:
    users = [op for op in module.graph.ops if value in op.operands()]
    return users[0] if len(users) == 1 and value not in module.graph.outputs else None


def _rescale_rms_norm(module: Module, mean: Op, coupling: CouplingResult,
                      new_size: dict[int, int]) -> float | None:
    """RMSNorm over a shrunk hidden axis, made exact the way stock transformers computes it.

    With S the sum of squares over the d' kept channels of d,
    ``sqrt(S/d + eps) = sqrt(d'/d) * sqrt(S/d' + eps*d/d')``, so ``w * x * rsqrt(S/d + eps) =
    (w * sqrt(d/d')) * x * rsqrt(S/d' + eps * d/d')``: keep the ``mean``, scale the epsilon by
    d/d' and the norm weight by sqrt(d/d'). Matches ``mean(pow(x, 2)) + eps -> rsqrt ->
    mul x -> [cast] -> mul w``; returns d/d', or None when the pattern is not there (the
    caller then keeps the divisor instead).
    """
    import math

    x_sq = mean.args[0]
    if x_sq.producer is None or x_sq.producer.kind != "pow" or x_sq.producer.args[1] != 2:
        return None
    x = x_sq.producer.args[0]
    rank = len(x.type.shape)
    dims = mean.args[1] if len(mean.args) > 1 else None
    if not (isinstance(dims, list) and [d % rank for d in dims] == [rank - 1]):
        return None
    add = _single_user(module, mean.results[0])
    if add is None or add.kind != "add" or not isinstance(add.args[1], float):
        return None
    rsqrt = _single_user(module, add.results[0])
    if rsqrt is None or rsqrt.kind != "rsqrt":
        return None
    norm = _single_user(module, rsqrt.results[0])
    if norm is None or norm.kind != "mul" or x not in norm.args:
        return None
    scaled = _single_user(module, norm.results[0])
    while scaled is not None and scaled.kind == "cast":
        scaled = _single_user(module, scaled.results[0])
    if scaled is None or scaled.kind != "mul":
        return None
    weights = [a for a in scaled.args if isinstance(a, Param)]
    if len(weights) != 1 or sum(weights[0] in op.params() for op in module.graph.ops) != 1:
        return None
    weight = weights[0]
    fs = coupling.factors
    leaves = [fs.find(leaf) for f in coupling.axes[id(x)][rank - 1] for leaf in fs.leaves(f)]
    original = math.prod(fs.size[leaf] or 1 for leaf in leaves)
    kept = math.prod(new_size.get(leaf, fs.size[leaf] or 1) for leaf in leaves)
    ratio = original / kept
    add.args[1] = add.args[1] * ratio
    if weight.storage.has_data:
        weight.storage = DataStorage(weight.storage.load() * math.sqrt(ratio))
    return ratio


def _keep_mean_divisor(module: Module, op: Op, coupling: CouplingResult) -> None:
    """``mean(x, dims)`` -> ``div(sum(x, dims), N_original)``: zeros of pruned channels counted."""
    x = op.args[0]
    key = id(x)
    rank = len(x.type.shape)
    dims = op.args[1] if len(op.args) > 1 else list(range(rank))
    original = 1
    fs = coupling.factors
    for d in dims:
        for f in coupling.axes[key][d % rank]:
            for leaf in fs.leaves(f):
                original *= fs.size[fs.find(leaf)] or 1
    result = op.results[0]
    summed = Value(f"{result.name}.sum", result.type)
    total = Op("sum", list(op.args), dict(op.kwargs), [summed], op.loc)
    index = module.graph.ops.index(op)
    divide = Op("div", [summed, float(original)], {}, [result], op.loc)
    module.graph.ops[index:index + 1] = [total, divide]


def _update_config(module: Module, groups: GroupsAttr, removed: dict[int, tuple[int, ...]],
                   eps_scale: set[float]) -> None:
    """Record new sizes in the HF config; stock keys when every layer kept the same shape."""
    attr = module.attributes.get("config")
    if not isinstance(attr, HFConfigAttr):
        return
    config = dict(attr.config)
    if len(eps_scale) == 1 and "rms_norm_eps" in config:
        config["rms_norm_eps"] = config["rms_norm_eps"] * eps_scale.pop()
    per_layer: dict[int, dict[str, int]] = {}
    for family in groups.families:
        kept = family.size - len(set(removed.get(family.id, ())))
        if family.kind == "hidden":
            if kept != family.size:
                config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
                config["hidden_size"] = kept
        elif family.layer is not None and family.kind in ("attn", "mlp"):
            key = "num_key_value_heads" if family.kind == "attn" else "intermediate_size"
            per_layer.setdefault(family.layer, {})[key] = kept
    for key in ("num_key_value_heads", "intermediate_size"):
        values = {sizes[key] for sizes in per_layer.values() if key in sizes}
        if len(values) == 1:
            (value,) = values
            if key == "num_key_value_heads":
                heads_per_kv = config["num_attention_heads"] // config.get("num_key_value_heads", config["num_attention_heads"])
                config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
                config["num_attention_heads"] = value * heads_per_kv
            config[key] = value
    uniform = all(len({s[k] for s in per_layer.values() if k in s}) <= 1
                  for k in ("num_key_value_heads", "intermediate_size"))
    if not uniform:
        config["lorashear_per_layer"] = {str(k): v for k, v in sorted(per_layer.items())}
    module.attributes["config"] = HFConfigAttr(config)


@register_pass
@dataclass(frozen=True)
class Compress(ModulePass):
    """Slice the pruned groups out of every weight: a smaller dense model, same outputs."""

    name: ClassVar[str] = "compress"
    requires_attributes: ClassVar[dict[str, str]] = {"groups": "discover"}

    def run(self, module: Module, am: AnalysisManager) -> PassResult:
        groups = module.attributes["groups"]
        mask = module.attributes.get("prune-mask")
        removed = mask.as_dict() if isinstance(mask, PruneMaskAttr) else {}
        if not removed:
            module.attributes.pop("groups", None)
            return PassResult(True, frozenset(), {"parameters removed": 0})
        stats = compress_module(module, groups, removed, am)
        return PassResult(True, frozenset(), stats)
