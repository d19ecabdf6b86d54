"""`compress`: slice the removed groups out of every weight, producing a smaller dense IR.

The two-pass dependency traversal, in factor form: the coupling analysis already maps every
axis of every value and parameter to its factors, so pass 1 (output slices per group) and
pass 2 (each consumer's input slices) are one walk over the parameters' axes, and every
value's new shape follows from its factors' new sizes. Shape literals (reshape, expand) are
rewritten from the new result shapes; a mean over a shrunk axis keeps its original divisor
(sum / N), and an RMSNorm over one is rescaled (DESIGN.md section 3), so the compressed model
equals the masked one. What an op kind needs rewritten is a rule registered by kind with
:func:`compress_rule`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lorashear.analysis.coupling import CouplingResult, DimensionCoupling
from lorashear.analysis.coupling_rules.shapes import dim_product
from lorashear.analysis.groups import GroupsAttr, PruneMaskAttr
from lorashear.analysis.manager import AnalysisManager
from lorashear.analysis.masking import keep_masks, validate_removal
from lorashear.errors import PassError
from lorashear.frontend.moe import fused_param_name
from lorashear.ir.attributes import HFConfigAttr
from lorashear.ir.core import Module, Op, Param, Value
from lorashear.ir.ops import OP_DEFS, RuleTable, parameter_names
from lorashear.ir.storage import DataStorage, MetaStorage
from lorashear.ir.types import TensorType, torch_dtype
from lorashear.passes.base import ModulePass, PassResult
from lorashear.passes.discover import groups_from_coupling
from lorashear.passes.registry import register_pass


@dataclass
class CompressContext:
    """What a compress rule reads and writes while ``compress_module`` rewrites ops."""

    module: Module
    coupling: CouplingResult
    new_size: dict[int, int]
    """Kept units per shrunk family factor."""
    shrunk: set[int]
    """ids of the reduction ops (recorded by the coupling analysis) over a shrunk factor."""
    eps_scale: set[float] = field(default_factory=set)
    """The d/d' ratios by which RMSNorm epsilons were scaled (for the HF config)."""
    rewritten: int = 0
    """Reductions rewritten (means and norms)."""
    scaled_sizes: dict[tuple[int, int], Value] = field(default_factory=dict)
    """(id of a ``sym.mul`` size, new factor) -> the ``sym.mul`` made for it (one per factor)."""


CompressRule = Callable[[CompressContext, Op], None]

#: IR op kind -> the rewrite compress applies to its ops (kinds without one only change shape).
COMPRESS_RULES: RuleTable[CompressRule] = RuleTable("a compress rule")
compress_rule = COMPRESS_RULES.register


def _set_argument(op: Op, name: str, value: Any) -> None:
    """Set the op's argument ``name`` where it is given (by position or keyword)."""
    if name in op.kwargs:
        op.kwargs[name] = value
        return
    index = parameter_names(op.kind).index(name)
    if index < len(op.args):
        op.args[index] = value
    else:
        op.kwargs[name] = value


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
            family = coupling.families[family_id]
            new_size[family.leaf] = family.size - len(set(units))
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
                _symbolic_size(coupling, key, j, new_size, d) if isinstance(d, str)
                else _axis_size(coupling, key, j, new_size) for j, d in enumerate(ref.type.shape)))

    _remove_experts(module, coupling, groups, removed)  # MoE: whole experts (no-op without)

    # shape literals and divisors
    shrunk = {id(r.op) for r in coupling.reductions if any(fs.find(f) in new_size for f in r.factors)}
    ctx = CompressContext(module, coupling, new_size, shrunk)
    for op in list(module.graph.ops):
        rule = COMPRESS_RULES.get(op.kind)
        if rule is not None:
            rule(ctx, op)
    _update_config(module, groups, removed, ctx.eps_scale)
    module.attributes.pop("groups", None)
    for stale in ("prune-mask", "saliency"):  # indices into the groups that no longer exist
        module.attributes.pop(stale, None)
    return {"parameters removed": before - module.num_parameters(), "means rewritten": ctx.rewritten}


@compress_rule(*(kind for kind, definition in OP_DEFS.items() if definition.shape_arg))
def _shape_literals(ctx: CompressContext, op: Op) -> None:
    """A literal size in the shape argument becomes the result's new size (``-1`` and
    symbolic sizes stay)."""
    name = OP_DEFS[op.kind].shape_arg
    sizes = op.bound_args()[name]
    if isinstance(sizes, list):
        out_shape = op.results[0].type.shape
        _set_argument(op, name, [out_shape[j] if isinstance(a, int) and a != -1 and isinstance(out_shape[j], int)
                                 else a for j, a in enumerate(sizes)])
        scaled = [_scale_symbolic_size(ctx, op, size, dim) for size, dim in zip(sizes, out_shape)]
        if any(new is not old for new, old in zip(scaled, sizes)):
            current = op.bound_args()[name]
            _set_argument(op, name, [new if new is not old else c for new, old, c in zip(scaled, sizes, current)])


def _scale_symbolic_size(ctx: CompressContext, op: Op, size: Any, dim: Any) -> Any:
    """A size computed as ``sym.mul(B, 16)`` for a result axis now ``"12*B"`` (heads merged into
    the batch, after some heads were removed): a ``sym.mul(B, 12)`` put before the first op
    that needs it (the original may size other layers' axes, which kept their heads). Any
    other size: itself."""
    producer = size.producer if isinstance(size, Value) else None
    if producer is None or producer.kind != "sym.mul" or not isinstance(dim, str) or len(producer.args) != 2:
        return size
    syms, k = dim_product(dim)
    ints = [i for i, a in enumerate(producer.args) if isinstance(a, int) and not isinstance(a, bool)]
    if not syms or len(ints) != 1 or producer.args[ints[0]] == k:
        return size
    known = ctx.scaled_sizes.get((id(size), k))
    if known is not None:
        return known
    args = list(producer.args)
    args[ints[0]] = k
    value = Value(f"{size.name}.x{k}", size.type)
    scaled = Op("sym.mul", args, dict(producer.kwargs), [value], op.loc)
    value.producer = scaled
    ctx.module.graph.ops.insert(ctx.module.graph.ops.index(op), scaled)
    ctx.scaled_sizes[(id(size), k)] = value
    return value


@compress_rule("split", "split_with_sizes")
def _split_sizes(ctx: CompressContext, op: Op) -> None:
    """A cut into pieces names their sizes: they become the pieces' new sizes (equal pieces
    of a fused projection shrink together; ``chunk`` names a count, which stays)."""
    a = op.bound_args()
    dim = a["dim"] % len(a["self"].type.shape)
    sizes = [r.type.shape[dim] for r in op.results]
    if not all(isinstance(s, int) for s in sizes):
        return
    if op.kind == "split" and isinstance(a["split_size"], int) and len(set(sizes)) == 1:
        _set_argument(op, "split_size", sizes[0])
    elif op.kind == "split_with_sizes" and isinstance(a["split_sizes"], list):
        _set_argument(op, "split_sizes", sizes)


@compress_rule("slice")
def _slice_bounds(ctx: CompressContext, op: Op) -> None:
    """A slice of a cut axis (one piece of a fused projection, see the coupling analysis'
    ``slice`` rule) takes the same segments once they shrink: each bound becomes the new width
    of the segments before it (a negative bound stays counted from the end, a bound past the
    end stays)."""
    a = op.bound_args()
    x = a["self"]
    if id(x) not in ctx.coupling.axes or a["step"] != 1:
        return
    dim = a["dim"] % len(x.type.shape)
    fs = ctx.coupling.factors
    leaves = [fs.find(f) for f in ctx.coupling.leaves(x, dim) if fs.size[fs.find(f)] != 1]
    if len(leaves) != 1 or leaves[0] not in fs.segments:
        return
    leaf = leaves[0]
    length, new_length = fs.size[leaf], fs.extent(leaf, ctx.new_size)
    edges, at, new_at = {0: 0}, 0, 0
    for segment in fs.finest(leaf):
        at += fs.size[segment]
        new_at += fs.extent(segment, ctx.new_size)
        edges[at] = new_at
    for name in ("start", "end"):
        bound = a[name]
        if not isinstance(bound, int) or bound >= length or bound < -length:
            continue
        offset = edges[bound % length]
        _set_argument(op, name, offset - new_length if bound < 0 else offset)


@compress_rule("conv1d")
def _conv1d_groups(ctx: CompressContext, op: Op) -> None:
    """A depthwise convolution has one group per channel: ``groups`` becomes the kept count."""
    a = op.bound_args()
    if a["groups"] != 1 and a["weight"].type.shape[1] == 1:
        _set_argument(op, "groups", a["weight"].type.shape[0])


@compress_rule("mean")
def _mean(ctx: CompressContext, op: Op) -> None:
    """A mean over a shrunk axis: an RMSNorm's is rescaled (:func:`_rescale_rms_norm`), any
    other keeps its original divisor (:func:`_keep_mean_divisor`)."""
    if id(op) not in ctx.shrunk:
        return
    scale = _rescale_rms_norm(ctx.module, op, ctx.coupling, ctx.new_size)
    if scale is None:
        _keep_mean_divisor(ctx.module, op, ctx.coupling)
    else:
        ctx.eps_scale.add(scale)
    ctx.rewritten += 1


@compress_rule("rms_norm")
def _rms_norm(ctx: CompressContext, op: Op) -> None:
    """``rms_norm`` over a shrunk axis: its ``normalized_shape`` follows the input's new
    shape, its epsilon scales by d/d' and its weight (its own: the coupling rule pins the
    axis otherwise) by sqrt(d/d'), the same identity as :func:`_rescale_rms_norm`."""
    a = op.bound_args()
    x, weight = a["input"], a["weight"]
    count = len(a["normalized_shape"])
    rank = len(x.type.shape)
    _set_argument(op, "normalized_shape", list(x.type.shape[rank - count:]))
    if id(op) not in ctx.shrunk:
        return
    fs, coupling = ctx.coupling.factors, ctx.coupling
    leaves = [fs.find(leaf) for axis in range(rank - count, rank)
              for f in coupling.axes[id(x)][axis] for leaf in fs.leaves(f)]
    original = math.prod(fs.size[leaf] or 1 for leaf in leaves)
    kept = math.prod(ctx.new_size.get(leaf, fs.size[leaf] or 1) for leaf in leaves)
    ratio = original / kept
    eps = a["eps"] if a["eps"] is not None else torch.finfo(torch_dtype(x.type.dtype)).eps
    _set_argument(op, "eps", eps * ratio)
    if weight.storage.has_data:
        weight.storage = DataStorage(weight.storage.load() * math.sqrt(ratio))
    ctx.eps_scale.add(ratio)
    ctx.rewritten += 1


def _axis_size(coupling: CouplingResult, key: int, axis: int, new_size: dict[int, int]) -> int:
    fs = coupling.factors
    return math.prod(fs.extent(f, new_size) for f in coupling.axes[key][axis])  # an empty axis stays empty


def _symbolic_size(coupling: CouplingResult, key: int, axis: int, new_size: dict[int, int], dim: str) -> str:
    """A symbolic size with a shrunk integer part (``"16*B"`` -> ``"12*B"``: heads merged into
    the batch); any other symbolic size stays."""
    syms, k = dim_product(dim)
    if k == 1 or not syms:
        return dim
    fs = coupling.factors
    static = [f for f in coupling.axes[key][axis] if all(fs.size[fs.find(x)] is not None for x in fs.leaves(f))]
    new_k = math.prod(fs.extent(f, new_size) for f in static)
    return dim if new_k == k else "*".join([str(new_k), *syms])


def _check_factors(coupling: CouplingResult, param: Param, new_size: dict[int, int]) -> None:
    for axis, dim in enumerate(param.type.shape):
        want = _axis_size(coupling, id(param), axis, new_size)
        if want != dim:
            raise PassError(f"internal: @{param.name} axis {axis} sliced to {dim}, factors say {want}")


def _operands(op: Op) -> list[Any]:
    """A binary op's two operands (``self``, ``other``) by name."""
    a = op.bound_args()
    return [a["self"], a["other"]]


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
    x_sq = mean.bound_args()["self"]
    if x_sq.producer is None or x_sq.producer.kind != "pow" or x_sq.producer.bound_args()["exponent"] != 2:
        return None
    x = x_sq.producer.bound_args()["self"]
    rank = len(x.type.shape)
    dims = mean.bound_args()["dim"]
    if not (isinstance(dims, list) and [d % rank for d in dims] == [rank - 1]):
        return None
    add = _single_user(module, mean.results[0])
    if add is None or add.kind != "add" or not isinstance(add.bound_args()["other"], float):
        return None
    rsqrt = _single_user(module, add.results[0])
    if rsqrt is None or rsqrt.kind != "rsqrt":
        return None
    norm = _single_user(module, rsqrt.results[0])
    if norm is None or norm.kind != "mul" or not any(x is v for v in _operands(norm)):
        return None
    scaled = _single_user(module, norm.results[0])
    while scaled is not None and scaled.kind == "cast":
        scaled = _single_user(module, scaled.results[0])
    if scaled is None or scaled.kind != "mul":
        return None
    weights = [a for a in _operands(scaled) if isinstance(a, Param)]
    if len(weights) != 1 or sum(weights[0] in op.params() for op in module.graph.ops) != 1:
        return None
    weight = weights[0]
    fs = coupling.factors
    leaves = [fs.find(leaf) for f in coupling.axes[id(x)][rank - 1] for leaf in fs.leaves(f)]
    original = math.prod(fs.size[leaf] or 1 for leaf in leaves)
    kept = math.prod(new_size.get(leaf, fs.size[leaf] or 1) for leaf in leaves)
    ratio = original / kept
    _set_argument(add, "other", add.bound_args()["other"] * ratio)
    if weight.storage.has_data:
        weight.storage = DataStorage(weight.storage.load() * math.sqrt(ratio))
    return ratio


def _keep_mean_divisor(module: Module, op: Op, coupling: CouplingResult) -> None:
    """``mean(x, dims)`` -> ``div(sum(x, dims), N_original)``: zeros of pruned channels counted."""
    a = op.bound_args()
    x = a["self"]
    key = id(x)
    rank = len(x.type.shape)
    dims = list(range(rank)) if a["dim"] is None else a["dim"] if isinstance(a["dim"], list) else [a["dim"]]
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
    # configs that name their sizes otherwise (GPT-2's n_embd, BART's d_model, a composite
    # model's text_config) keep them; the new sizes are recorded beside them
    stock_keys = {"hidden_size", "num_attention_heads"} <= config.keys()
    for family in groups.families:
        kept = family.size - len(set(removed.get(family.id, ())))
        if family.kind == "hidden" and not stock_keys:
            if kept != family.size:
                config["lorashear_hidden_size"] = kept
        elif family.kind == "hidden":
            if kept != family.size:
                config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
                config["hidden_size"] = kept
        elif family.kind == "mlp" and all(fused_param_name(m.param) for m in family.members):
            continue  # one expert's channels: emission reads the experts' width from the weights
        elif family.layer is not None and family.kind in ("attn", "mlp"):
            key = "num_key_value_heads" if family.kind == "attn" else "intermediate_size"
            per_layer.setdefault(family.layer, {})[key] = kept
    for key in ("num_key_value_heads", "intermediate_size"):
        values = {sizes[key] for sizes in per_layer.values() if key in sizes}
        if len(values) == 1 and stock_keys:
            (value,) = values
            if key == "num_key_value_heads":
                heads_per_kv = config["num_attention_heads"] // config.get("num_key_value_heads", config["num_attention_heads"])
                config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
                config["num_attention_heads"] = value * heads_per_kv
            config[key] = value
    if not stock_keys:
        if per_layer:
            config["lorashear_per_layer"] = {str(k): v for k, v in sorted(per_layer.items())}
        module.attributes["config"] = HFConfigAttr(config)
        return
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


# --- Mixture of Experts: whole experts (see lorashear/analysis/moe.py) ---------------------------
def _remove_experts(module: Module, coupling: CouplingResult, groups: GroupsAttr,
                    removed: dict[int, tuple[int, ...]]) -> None:
    """Delete the removed experts of every ``expert`` family: each one's term of the layer's sum
    (an ``add`` whose one operand depends on no kept expert becomes its other operand), then
    its ops and parameters; the routing columns of the kept experts are renumbered, and so are
    their parameters (``experts.3.`` -> ``experts.2.``). Router rows and mask entries are
    sliced with the family's members like any other axis."""
    fs = coupling.factors
    gone: dict[int, set[int]] = {}  # family leaf -> removed experts
    for family_id, units in removed.items():
        if units and groups.families[family_id].kind == "expert":
            gone[coupling.families[family_id].leaf] = set(units)
    if not gone:
        return
    graph = module.graph
    for op in graph.ops:  # the top-k must still find k experts
        if op.kind == "topk" and id(op.args[0]) in coupling.axes:
            a = op.bound_args()
            leaves = {fs.find(x) for x in coupling.leaves(a["self"], a["dim"] % len(a["self"].type.shape))}
            for leaf in leaves & gone.keys():
                kept = fs.size[leaf] - len(gone[leaf])
                if kept < a["k"]:
                    raise PassError(f"cannot remove {len(gone[leaf])} of the {fs.size[leaf]} experts routed "
                                    f"by {op.loc or 'a router'}: its top-k chooses {a['k']} of them")
    depends: dict[int, frozenset[tuple[int, int]]] = {}  # id(value) -> the (leaf, expert) it reads
    replace: dict[int, Value] = {}
    for op in graph.ops:
        deps = frozenset().union(*(depends.get(id(v), frozenset()) for v in op.operands()))
        if op.kind == "select" and isinstance(op.args[0], Value) and id(op.args[0]) in coupling.axes:
            x = op.args[0]
            dim = op.args[1] % len(x.type.shape)
            leaves = [fs.find(f) for f in coupling.leaves(x, dim)]
            if len(leaves) == 1 and leaves[0] in gone:
                expert = op.args[2] % fs.size[leaves[0]]
                deps = deps | {(leaves[0], expert)}
                if expert not in gone[leaves[0]]:
                    op.args[2] = expert - sum(1 for g in gone[leaves[0]] if g < expert)
        if op.kind == "add" and len(op.operands()) == 2 and len(op.args) == 2:
            left, right = op.args
            for leaf, experts in gone.items():
                on_left = {e for lf, e in depends.get(id(left), ()) if lf == leaf}
                on_right = {e for lf, e in depends.get(id(right), ()) if lf == leaf}
                if on_left and on_left <= experts and on_right - experts:
                    replace[id(op.results[0])] = right
                elif on_right and on_right <= experts and on_left - experts:
                    replace[id(op.results[0])] = left
        for r in op.results:
            depends[id(r)] = deps

    def resolve(r):
        while isinstance(r, Value) and id(r) in replace:
            r = replace[id(r)]
        return r

    for op in graph.ops:
        op.replace_refs(resolve)
    graph.outputs = [resolve(v) for v in graph.outputs]
    graph.remove_dead_ops()
    used = module.used_params()
    for name in [n for n in module.params if n not in used and fused_param_name(n)]:
        del module.params[name]
    _renumber_experts(module)


def _renumber_experts(module: Module) -> None:
    """Rename per-expert parameters so each fused parameter's experts are 0..n-1 again."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for name in module.params:
        fused = fused_param_name(name)
        if fused is not None:
            groups.setdefault(fused[0], []).append((fused[1], name))
    renamed = {}
    for fused, experts in groups.items():
        for new, (_, name) in enumerate(sorted(experts)):
            prefix, leaf = fused.rsplit(".", 1)
            if name.endswith("_bias"):
                leaf = name.rsplit(".", 1)[1]
            renamed[name] = f"{prefix}.{new}.{leaf}"
    if all(old == new for old, new in renamed.items()):
        return
    params = {}
    for name, param in module.params.items():
        param.name = renamed.get(name, name)
        params[param.name] = param
    module.params = params
