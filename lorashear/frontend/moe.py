"""Mixture-of-Experts layers, lowered as one gated MLP per expert.

transformers 5 stores a layer's experts as fused 3-D parameters (``experts.gate_up_proj``
``[experts, 2 * intermediate, hidden]``, ``experts.down_proj`` ``[experts, hidden,
intermediate]``) and runs them through an ``experts_implementation``: ``eager`` loops over the
experts some token chose (``nonzero``, ``where`` and ``index_add_`` on data-dependent shapes,
which ``torch.export`` refuses: "unsupported scalarType" is its trace of ``nonzero`` on a
mask), ``batched_mm``/``grouped_mm`` gather each token's expert weights by index (an expert is
then a data-dependent row of a parameter, which no axis of the coupling analysis follows).

While lowering, :func:`dense_experts` makes every experts module run
:func:`dense_experts_forward` instead: every expert on every token, each expert's output
weighted by its column of the routing matrix (the router's top-k weights scattered into
``[tokens, experts]``, zero where the token did not choose the expert). A zero weight
contributes an exact zero, so the sum equals the eager loop's (the same experts' outputs
added in the same ascending order) to rounding; the trace has only static shapes. Each
expert's weights are ``select``s of the fused parameters by a literal index, which
:func:`split_fused_experts` turns into parameters of their own
(``...experts.3.gate_up_proj``): every expert is then an ordinary gated MLP of two linears,
so the coupling analysis finds each expert's channels as one family, and ``compress`` slices
each expert on its own. The routing ops (``topk``, ``scatter_add``) pin the expert axis;
:func:`add_expert_gates` gives each router a mask buffer that makes a whole expert a
removable unit all the same (:mod:`lorashear.analysis.moe`). Emission stacks the experts back
into transformers' fused parameters (:func:`fuse_expert_params`) where they share one shape.

peft's LoRA on the fused parameters (``target_parameters``, which ``all-linear`` chooses for
the experts and the router's weight) is lowered as LoRA, not merged: the experts forward adds
each expert's slice of the factors beside its linear (:func:`expert_lora_factors`), which
become the expert's own parameters (``...experts.3.gate_up_proj_lora_A``), so every expert has
an ordinary ``lora_linear`` whose factors its channel family and its removal take along; a
router's weight is read as ``W + s * B @ A`` (:class:`_LoraWeight`), fused back into a
``lora_linear`` (:func:`fuse_param_lora`) whose ``B`` rows join the expert family.

The cost is compute: lowered, a layer runs all of its experts on every token (``experts /
top_k`` times eager's expert work), which the pruning passes accept for exactness.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lorashear.errors import LoweringError
from lorashear.ir.core import Graph, Module, Op, Param, Value
from lorashear.ir.ops import LINEAR_KINDS
from lorashear.ir.storage import DataStorage, MetaStorage
from lorashear.ir.types import TensorType

#: The name :func:`dense_experts` registers its forward under in transformers' interface.
DENSE_EXPERTS = "lorashear_dense"
#: The fused expert parameters split per expert, and which of them hold the MLP's input side.
FUSED_EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


def _expert_weight(experts: nn.Module, name: str, e: int) -> torch.Tensor:
    """Expert ``e``'s ``[out, in]`` weight of the fused parameter ``name``."""
    weight = getattr(experts, name)[e]
    return weight.transpose(0, 1) if getattr(experts, "is_transposed", False) else weight


def _expert_bias(experts: nn.Module, name: str, e: int) -> torch.Tensor | None:
    if not getattr(experts, "has_bias", False):
        return None
    return getattr(experts, f"{name}_bias")[e]


def dense_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts forward (``[tokens, hidden]``, the chosen experts and their
    weights ``[tokens, top_k]``) with static shapes: every expert on every token, weighted by
    the scattered routing weights (see the module docstring). A peft LoRA on a fused parameter
    (:func:`dense_experts` hands its factors over) adds expert ``e``'s low-rank term beside
    the expert's own linear, the pattern lowering fuses into a ``lora_linear``."""
    has_gate = getattr(self, "has_gate", True)
    first = "gate_up_proj" if has_gate else "up_proj"
    num_experts = getattr(self, first).shape[0]
    loras = self.__dict__.get(_LORA_FACTORS, {})

    def project(x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        y = F.linear(x, _expert_weight(self, name, e), _expert_bias(self, name, e))
        if name in loras:
            lora_a, lora_b, scaling = loras[name]  # read at the call: export swaps parameters
            a_e, b_e = expert_lora_factors(lora_a.weight, lora_b.weight, num_experts, e)
            y = y + F.linear(F.linear(x, a_e), b_e) * scaling
        return y

    # scatter_add: a token that names an expert twice (LongCat's zero experts map to real ones
    # with weight 0) gets the sum, as the eager loop's index_add does
    routing = top_k_weights.new_zeros(hidden_states.shape[0], num_experts).scatter_add(1, top_k_index, top_k_weights)
    out = None
    for e in range(num_experts):
        h = project(hidden_states, first, e)
        h = self._apply_gate(h) if has_gate else self.act_fn(h)
        h = project(h, "down_proj", e)
        if getattr(self, "has_post_expert_norm", False):
            h = self.post_expert_norm(h)
        h = (h * routing[:, e, None]).to(hidden_states.dtype)
        out = h if out is None else out + h
    return out


def expert_lora_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int,
                        e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``e``'s ``A`` ``[r, in]`` and ``B`` ``[out, r]`` of peft's LoRA on a fused expert
    parameter (``ParamWrapper``: ``A`` ``[experts * r, in]`` holds the experts' ranks one after
    another, ``B`` ``[out, r * experts]`` interleaves them, rank-major), in the ``[out, in]``
    orientation of :func:`_expert_weight` whether or not the experts store theirs transposed:
    peft's ``get_delta_factors`` reshapes them so (its delta for expert ``e`` is
    ``scaling * B_e @ A_e``)."""
    a_e = lora_a.reshape(num_experts, -1, lora_a.shape[-1])[e]
    b_e = lora_b.reshape(lora_b.shape[0], -1, num_experts)[:, :, e]
    return a_e, b_e


#: The attribute :func:`dense_experts` gives an experts module while lowering: its parameters'
#: LoRA factors by parameter name, ``(A, B, scaling)`` (``A`` and ``B`` peft's ``nn.Linear``).
_LORA_FACTORS = "_lorashear_lora_factors"


def _refuse_param_lora(path: str, module: nn.Module) -> None:
    """peft adapts a parameter (``target_parameters``: a router's weight, a parameter of a module
    that is no fused experts module) by re-parametrising it during the forward; those factors
    are not fused into ``lora_linear`` ops, so such an adapter is refused rather than lowered as
    merged weights."""
    from lorashear.frontend.lower import canonical_module_path

    raise LoweringError(
        f"the LoRA adapter at module {canonical_module_path(path)} adapts the parameter "
        f"{getattr(module, 'parameter_name', '?')} (peft's target_parameters, as 'all-linear' "
        "chooses for fused MoE experts and routers), which lorashear does not lower",
        hint="adapt the model's nn.Linear modules only: LoraConfig(target_modules=[...]) naming "
             "the attention and MLP projections, with target_parameters unset")


def _active(wrapper: nn.Module, path: str, name: str) -> list[str]:
    """The adapters of a ``ParamWrapper`` its forward would apply (one at most)."""
    from lorashear.frontend.lower import canonical_module_path

    adapters = [] if wrapper.disable_adapters or wrapper.merged else \
        [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if len(adapters) > 1:
        raise LoweringError(f"the LoRA adapters {adapters} at module {canonical_module_path(path)} "
                            f"are all active on its parameter {name}; lorashear lowers one",
                            hint="activate one adapter (model.set_adapter) or merge the others first")
    return adapters


class _LoraWeight:
    """Mixed into a module's class while lowering (:func:`dense_experts`): reading its adapted
    2-D parameter gives ``W + (B @ A) * scaling`` from peft's factors (``ParamWrapper`` on a
    router's weight), which :func:`fuse_param_lora` turns into a ``lora_linear``. peft's own
    forward re-parametrises the module under an autocast region that ``torch.export`` keeps as
    a submodule; this reads the same parameters under their own names."""

    def __getattr__(self, name: str):
        got = super().__getattr__(name)
        for param, lora_a, lora_b, scaling in self.__dict__.get(_PARAM_LORA, ()):
            if name == param:
                got = got + (lora_b.weight @ lora_a.weight) * scaling
        return got


_PARAM_LORA = "_lorashear_param_lora"


def _with_lora_weight(cls: type) -> type:
    """``cls`` with :class:`_LoraWeight` mixed in, under its own name (a fresh class per lowering)."""
    return type(cls.__name__, (_LoraWeight, cls), {"__module__": cls.__module__})


def fuse_param_lora(graph: Graph) -> int:
    """``linear(x, add(@W, mul(matmul(@B, @A), s)))`` (:class:`_LoraWeight`'s read, then a
    linear) -> ``lora_linear(x, @W, bias, @A, @B, scaling=s)``, in place; returns how many."""
    fused = 0
    for index, op in enumerate(graph.ops):
        w = op.args[1] if op.kind == "linear" and len(op.args) > 1 else None
        add = getattr(w, "producer", None) if isinstance(w, Value) else None
        if add is None or add.kind != "add" or len(add.args) != 2 or not isinstance(add.args[0], Param):
            continue
        mul = getattr(add.args[1], "producer", None)
        if mul is None or mul.kind != "mul" or not isinstance(mul.args[1], (int, float)) \
                or isinstance(mul.args[1], bool):
            continue
        mm = getattr(mul.args[0], "producer", None)
        if mm is None or mm.kind not in ("matmul", "mm") or not all(isinstance(a, Param) for a in mm.args[:2]):
            continue
        lora_b, lora_a = mm.args[0], mm.args[1]
        if not (lora_a.name.endswith("lora_A.weight") and lora_b.name.endswith("lora_B.weight")):
            continue
        bias = op.args[2] if len(op.args) > 2 else None
        new = Op("lora_linear", [op.args[0], add.args[0], bias, lora_a, lora_b],
                 {"scaling": float(mul.args[1]), "dropout": 0.0}, op.results, loc=op.loc)
        for r in new.results:
            r.producer = new
        graph.ops[index] = new
        fused += 1
    return fused


def _expert_lora(model: nn.Module, experts: list[nn.Module]) -> tuple[list[nn.Module], dict[int, dict], list]:
    """peft's wrappers of parameters (``target_parameters``) of an MoE model: the wrappers,
    by ``id(experts module)`` the active factors of its fused parameters by parameter name, and
    each other module with an adapted 2-D weight (a router) with its ``(parameter, A, B,
    scaling)`` (:class:`_LoraWeight`). Any other ``ParamWrapper`` (in a model without fused
    experts, on a 3-D parameter of another module) is refused (:func:`_refuse_param_lora`), as
    are several active adapters on one parameter."""

    by_id = {id(m): m for m in experts}
    wrappers: list[nn.Module] = []
    factors: dict[int, dict] = {}
    weights: dict[int, tuple[nn.Module, list]] = {}
    for path, module in model.named_modules():
        if type(module).__name__ != "ParamWrapper":
            continue
        base = module.get_base_layer()
        name = module.parameter_name
        if by_id and getattr(module, "num_experts", None) == 1 and getattr(base, name).dim() == 2 \
                and id(base) not in by_id:
            wrappers.append(module)  # a 2-D weight beside experts (a router's): read as W + s * B @ A
            adapters = _active(module, path, name)
            if adapters:
                a = adapters[0]
                if id(base) not in weights:
                    weights[id(base)] = (base, [])
                weights[id(base)][1].append((name, module.lora_A[a], module.lora_B[a], module.scaling[a]))
            continue
        if id(base) not in by_id or name not in FUSED_EXPERT_PARAMS:
            _refuse_param_lora(path, module)
        wrappers.append(module)
        adapters = _active(module, path, name)
        if adapters:
            a = adapters[0]
            factors.setdefault(id(base), {})[name] = (module.lora_A[a], module.lora_B[a], module.scaling[a])
    return wrappers, factors, list(weights.values())


def _experts_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that run through transformers' experts interface (fused 3-D experts)."""
    return [m for m in model.modules()
            if hasattr(m, "config") and hasattr(m, "_apply_gate") and hasattr(m, "down_proj")
            and isinstance(m.down_proj, nn.Parameter) and m.down_proj.dim() == 3]


@contextlib.contextmanager
def dense_experts(model: nn.Module) -> Iterator[None]:
    """Run every fused experts module of ``model`` through :func:`dense_experts_forward` for
    the duration of the block (the configs' ``_experts_implementation`` is restored after)."""
    modules = _experts_modules(model)
    wrappers, factors, weights = _expert_lora(model, modules)
    if not modules:
        yield
        return
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(DENSE_EXPERTS, dense_experts_forward)
    configs = {id(m.config): m.config for m in modules}
    # the attribute behind PretrainedConfig._experts_implementation (a property whose setter
    # also dispatches to sub-configs): set and restored on exactly these configs
    saved = {key: config.__dict__.get(_IMPLEMENTATION) for key, config in configs.items()}
    try:
        for config in configs.values():
            config.__dict__[_IMPLEMENTATION] = DENSE_EXPERTS
        for module in modules:
            if id(module) in factors:
                module.__dict__[_LORA_FACTORS] = factors[id(module)]
        for wrapper in wrappers:  # the experts forward adds the LoRA terms; peft's merge is skipped
            wrapper.__dict__["forward"] = wrapper.base_layer.__call__
        for module, loras in weights:
            module.__dict__[_PARAM_LORA] = loras
            module.__class__ = _with_lora_weight(type(module))
        yield
    finally:
        for config in configs.values():
            config.__dict__[_IMPLEMENTATION] = saved[id(config)]
        for module in modules:
            module.__dict__.pop(_LORA_FACTORS, None)
        for wrapper in wrappers:
            wrapper.__dict__.pop("forward", None)
        for module, _ in weights:
            module.__dict__.pop(_PARAM_LORA, None)
            if type(module).__bases__[0] is _LoraWeight:
                module.__class__ = type(module).__bases__[1]


_IMPLEMENTATION = "_experts_implementation_internal"


def expert_param_name(fused: str, expert: int) -> str:
    """``model.layers.0.mlp.experts.gate_up_proj`` -> ``model.layers.0.mlp.experts.3.gate_up_proj``."""
    prefix, _, leaf = fused.rpartition(".")
    return f"{prefix}.{expert}.{leaf}"


def fused_param_name(name: str) -> tuple[str, int] | None:
    """The fused parameter and expert index of a name :func:`expert_param_name` made, or None."""
    parts = name.split(".")
    leaf = parts[-1].removesuffix("_bias").removesuffix(_LORA_A_SUFFIX).removesuffix(_LORA_B_SUFFIX)
    if len(parts) < 3 or leaf not in FUSED_EXPERT_PARAMS or not parts[-2].isdigit():
        return None
    return ".".join(parts[:-2] + parts[-1:]), int(parts[-2])


def split_fused_experts(module: Module) -> int:
    """Replace ``select(@fused, 0, e)`` of a fused 3-D expert parameter by a parameter of expert
    ``e``'s slice (:func:`expert_param_name`), in place; returns how many selects it replaced.
    Only where every use of the fused parameter is such a select (the dense trace's), so the
    fused parameter then goes unused and is dropped."""
    graph = module.graph
    uses: dict[str, list[Op]] = {}
    for op in graph.ops:
        for p in op.params():
            uses.setdefault(p.name, []).append(op)
    experts: dict[int, Param] = {}  # id(select result) -> the expert's parameter
    for name, ops in uses.items():
        param = module.params[name]
        leaf = name.rpartition(".")[2].removesuffix("_bias")
        if leaf not in FUSED_EXPERT_PARAMS or not all(_is_expert_select(op, param) for op in ops):
            continue
        data = param.storage.load() if param.storage.has_data else None
        for op in ops:
            e = op.args[2] % param.type.shape[0]
            expert_name = expert_param_name(name, e)
            expert = module.params.get(expert_name)
            if expert is None:
                storage = MetaStorage() if data is None else DataStorage(data[e])
                expert = module.add_param(Param(expert_name, TensorType(param.type.dtype, param.type.shape[1:]),
                                                storage, buffer=param.buffer))
            experts[id(op.results[0])] = expert
    experts.update(_split_expert_lora(module))
    if experts:
        for op in graph.ops:
            op.replace_refs(lambda r: experts.get(id(r), r))
        graph.outputs = [experts.get(id(v), v) for v in graph.outputs]
    return len(experts)


#: Suffixes of the per-expert LoRA factors (``...experts.3.gate_up_proj_lora_A``), which
#: :func:`fused_param_name` reads as the expert's like its bias.
_LORA_A_SUFFIX, _LORA_B_SUFFIX = "_lora_A", "_lora_B"


def _split_expert_lora(module: Module) -> dict[int, Param]:
    """The per-expert factors of peft's LoRA on fused experts, as :func:`expert_lora_factors`
    reads them (``select(reshape(@A, [experts, r, in]), 0, e)``, ``select(reshape(@B, [out, r,
    experts]), 2, e)``), as parameters of their own: ``id(select result)`` -> the parameter,
    named ``<A's name less .lora_A.weight>.<e>.lora_A.weight`` until :func:`name_expert_lora`
    names it after the expert's weight. Only where every use of the factor is such a read."""
    graph = module.graph
    uses: dict[str, list[Op]] = {}
    for op in graph.ops:
        for p in op.params():
            uses.setdefault(p.name, []).append(op)
    users = graph.users()
    found: dict[int, Param] = {}
    for name, ops in uses.items():
        factor = "lora_A" if name.endswith(".lora_A.weight") else "lora_B" if name.endswith(".lora_B.weight") \
            else None
        param = module.params[name]
        if factor is None or len(param.type.shape) != 2:
            continue
        axis = 0 if factor == "lora_A" else 2
        reads = []  # (select, expert, experts)
        for op in ops:
            shape = op.args[1] if op.kind == "reshape" and op.args[0] is param and len(op.args) == 2 else None
            selects = users.get(op.results[0], []) if shape is not None and len(shape) == 3 else []
            ok = bool(selects) and all(isinstance(d, int) for d in shape)
            for sel in selects:
                ok = ok and sel.kind == "select" and len(sel.args) == 3 and sel.args[0] is op.results[0] \
                    and sel.args[1] % 3 == axis and isinstance(sel.args[2], int)
                if ok:
                    reads.append((sel, sel.args[2] % shape[axis], shape[axis]))
            if not ok:
                break
        else:
            data = param.storage.load() if param.storage.has_data else None
            prefix = name.removesuffix(f".{factor}.weight")
            for sel, e, num_experts in reads:
                expert_name = f"{prefix}.{e}.{factor}.weight"
                expert = module.params.get(expert_name)
                if expert is None:
                    if data is None:
                        storage: DataStorage | MetaStorage = MetaStorage()
                    else:
                        a_e, b_e = expert_lora_factors(data, data, num_experts, e)
                        storage = DataStorage((a_e if factor == "lora_A" else b_e).contiguous())
                    expert = module.add_param(Param(expert_name, TensorType(param.type.dtype, sel.results[0].type.shape),
                                                    storage, buffer=param.buffer))
                found[id(sel.results[0])] = expert
    return found


def name_expert_lora(module: Module) -> int:
    """Rename the factors of each ``lora_linear`` on one expert's weight (``...experts.3.
    gate_up_proj``) after it: ``...experts.3.gate_up_proj_lora_A`` and ``_lora_B``, in place, so
    they are the expert's parameters (:func:`fused_param_name`) that ``compress`` drops and
    renumbers with it. Returns how many ops' factors it renamed."""
    renamed: dict[str, str] = {}
    for op in module.graph.ops:
        if op.kind != "lora_linear" or not isinstance(op.args[1], Param) or fused_param_name(op.args[1].name) is None:
            continue
        lora_a, lora_b = op.args[3], op.args[4]
        if not (isinstance(lora_a, Param) and isinstance(lora_b, Param)) or lora_a.name in renamed \
                or lora_b.name in renamed:
            continue
        if not (lora_a.name.endswith(".lora_A.weight") and lora_b.name.endswith(".lora_B.weight")):
            continue
        renamed[lora_a.name] = op.args[1].name + _LORA_A_SUFFIX
        renamed[lora_b.name] = op.args[1].name + _LORA_B_SUFFIX
    if renamed:
        params = {}
        for name, param in module.params.items():
            param.name = renamed.get(name, name)
            params[param.name] = param
        module.params = params
    return len(renamed) // 2


def _is_expert_select(op: Op, param: Param) -> bool:
    return (op.kind == "select" and len(op.args) == 3 and op.args[0] is param and op.args[1] == 0
            and isinstance(op.args[2], int) and len(param.type.shape) >= 2)


def fuse_expert_params(module: Module) -> dict[str, tuple[int, ...]]:
    """The inverse of :func:`split_fused_experts`, in place: where every expert of a fused
    parameter is there with one shape, stack them back into the fused parameter under its
    checkpoint name and read each expert through ``select(@fused, 0, e)`` (ops put first in the
    graph), so an emitted checkpoint keeps transformers' names and layout. Experts whose
    shapes differ (pruned to different widths) stay split. Returns the fused shapes by name."""
    by_fused: dict[str, dict[int, Param]] = {}
    for name, param in module.params.items():
        fused = fused_param_name(name)
        if fused is not None:
            by_fused.setdefault(fused[0], {})[fused[1]] = param
    fused_shapes: dict[str, tuple[int, ...]] = {}
    selects: list[Op] = []
    replace: dict[int, Value] = {}
    for fused, experts in by_fused.items():
        shapes = {tuple(p.type.shape) for p in experts.values()}
        if sorted(experts) != list(range(len(experts))) or len(shapes) != 1 or fused in module.params:
            continue
        first = experts[0]
        storages = [experts[e].storage for e in range(len(experts))]
        storage = MetaStorage() if not all(s.has_data for s in storages) \
            else DataStorage(torch.stack([s.load() for s in storages]))
        param = module.add_param(Param(fused, TensorType(first.type.dtype, (len(experts), *first.type.shape)),
                                       storage, buffer=first.buffer))
        fused_shapes[fused] = tuple(param.type.shape)
        for e in range(len(experts)):
            value = Value(f"{fused}.{e}", experts[e].type)
            selects.append(Op("select", [param, 0, e], {}, [value], loc=fused.rpartition(".")[0]))
            value.producer = selects[-1]
            replace[id(experts[e])] = value
            del module.params[experts[e].name]
    if selects:
        for op in module.graph.ops:
            op.replace_refs(lambda r: replace.get(id(r), r))
        module.graph.ops[:0] = selects
    return fused_shapes


#: The suffix of the buffer :func:`add_expert_gates` gives each router.
EXPERT_MASK = "expert_mask"


def routers(model: nn.Module) -> dict[str, int]:
    """The weight of each fused experts module's router (canonical name) and its expert count:
    the sibling module whose ``weight`` has one row per expert."""
    from lorashear.frontend.lower import canonical_module_path

    found: dict[str, int] = {}
    by_path = dict(model.named_modules())
    experts_ids = {id(m) for m in _experts_modules(model)}
    for path, module in by_path.items():
        if id(module) not in experts_ids or "." not in path:
            continue
        outer = path
        while outer.endswith(".base_layer"):  # peft's wrappers of its parameters (target_parameters)
            outer = outer.removesuffix(".base_layer")
        parent_path = outer.rpartition(".")[0]
        parent = by_path[parent_path]
        experts = module.down_proj.shape[0]
        for name, child in parent.named_children():
            weight = getattr(child, "weight", None)
            if child is not by_path[outer] and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
                    and weight.shape[0] == experts:
                found[canonical_module_path(f"{parent_path}.{name}") + ".weight"] = experts
                break
    return found


def add_expert_gates(module: Module, model: nn.Module) -> int:
    """Add to each router's logits ``log(@<router>.expert_mask)``, a buffer of ones (so it adds
    an exact zero), in place; returns how many routers got one. Masking an expert then zeroes
    its entry with the rest of its group: its logit becomes ``-inf``, its routing probability
    an exact zero, and no token chooses it, which is what removing the router's row does
    (the softmax's denominator and the top-k over the other experts are unchanged).

    A router that ranks experts by something other than its probabilities (DeepSeek-V3's
    sigmoid scores plus a load-balancing bias, ``e_score_correction_bias``) would still choose
    a masked expert whose biased score ranks high: its weight is zero, but it takes the place
    of an expert the compressed model chooses. So the same ``log(mask)`` is also added to the
    input of every ``topk`` of the router's block that ranks along a last axis of one entry per
    expert (:func:`_gate_expert_topk`): a masked expert ranks last there too."""
    names = routers(model)
    graph = module.graph
    added = 0
    for index in range(len(graph.ops) - 1, -1, -1):
        op = graph.ops[index]
        weight = op.args[1] if op.kind in LINEAR_KINDS and len(op.args) > 1 else None
        if not isinstance(weight, Param) or weight.name not in names:
            continue
        logits = op.results[0]
        mask_name = f"{weight.name.rpartition('.')[0]}.{EXPERT_MASK}"
        dtype = logits.type.dtype
        mask = module.add_param(Param(mask_name, TensorType(dtype, (names[weight.name],)),
                                      DataStorage(torch.ones(names[weight.name], dtype=_torch_dtype(dtype))),
                                      buffer=True))
        log = Op("log", [mask], {}, [Value(f"{logits.name}.log_mask", TensorType(dtype, mask.type.shape))], op.loc)
        gated = Op("add", [logits, log.results[0]], {}, [Value(f"{logits.name}.gated", logits.type)], op.loc)
        for user in graph.ops[index + 1:]:
            user.replace_refs(lambda r, logits=logits, gated=gated: gated.results[0] if r is logits else r)
        graph.outputs = [gated.results[0] if v is logits else v for v in graph.outputs]
        graph.ops[index + 1:index + 1] = [log, gated]
        _gate_expert_topk(graph, index + 3, op.loc.rpartition(".")[0], log.results[0])
        added += 1
    return added


def _gate_expert_topk(graph: Graph, start: int, block: str, log_mask: Value) -> None:
    """Add ``log_mask`` (``[experts]``) to the input of each ``topk`` from ``graph.ops[start]``
    on, in module ``block`` or below it, that ranks along its last axis of ``experts`` entries
    in the mask's element type (see :func:`add_expert_gates`), in place. Adds zero where the
    mask is one."""
    experts = log_mask.type.shape[0]
    index = start
    while index < len(graph.ops):
        op = graph.ops[index]
        scores = op.args[0] if op.kind == "topk" and op.args else None
        if not isinstance(scores, Value) or not (op.loc == block or op.loc.startswith(block + ".")):
            index += 1
            continue
        rank = len(scores.type.shape)
        dim = op.bound_args()["dim"] % rank
        if dim != rank - 1 or scores.type.shape[dim] != experts or scores.type.dtype != log_mask.type.dtype:
            index += 1
            continue
        gated = Op("add", [scores, log_mask], {}, [Value(f"{scores.name}.gated", scores.type)], op.loc)
        op.args[0] = gated.results[0]
        graph.ops.insert(index, gated)
        index += 2


def drop_open_expert_gates(module: Module) -> list[str]:
    """The inverse of :func:`add_expert_gates` where it adds nothing, in place: every
    ``expert_mask`` buffer that is all ones (no expert masked: the state after ``compress``
    removed the masked ones, or before any pruning) is removed with its ``log`` and the ``add`` ops that read it,
    and the router's logits are used directly again. Exact (``log(1)`` is 0 and ``x + 0`` is
    ``x``), and an emitted checkpoint then has only transformers' own keys (a stock load would
    warn about an unexpected ``expert_mask``). Masks that still hold a zero stay, and their
    names are returned: such a model only loads with lorashear."""
    graph = module.graph
    users = graph.users()
    masks = {id(p): n for n, p in module.params.items() if n.endswith(f".{EXPERT_MASK}")}
    logs: dict[str, list[Op]] = {name: [] for name in masks.values()}
    for op in graph.ops:
        if op.kind == "log" and op.args and id(op.args[0]) in masks:
            logs[masks[id(op.args[0])]].append(op)
    kept: list[str] = []
    ungated: dict[int, Value] = {}  # id(gated value) -> the value before the gate
    dropped: set[int] = set()
    for name, found in logs.items():
        mask = module.params[name]
        adds = [u for log in found for u in users.get(log.results[0], [])]  # the logits' and top-k's
        ones = mask.storage.has_data and bool((mask.storage.load() == 1).all())
        if not ones or len(found) != 1 or not adds or any(
                add.kind != "add" or not isinstance(add.args[0], Value) or add.args[1] is not found[0].results[0]
                for add in adds):
            kept.append(name)
            continue
        ungated.update((id(add.results[0]), add.args[0]) for add in adds)
        dropped.update((id(found[0]), *(id(add) for add in adds)))
        del module.params[name]
    if dropped:
        for op in graph.ops:
            op.replace_refs(lambda r: ungated.get(id(r), r))
        graph.outputs = [ungated.get(id(v), v) for v in graph.outputs]
        graph.ops = [op for op in graph.ops if id(op) not in dropped]
    return kept


def _torch_dtype(name: str) -> torch.dtype:
    from lorashear.ir.types import torch_dtype

    return torch_dtype(name)
