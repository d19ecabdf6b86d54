"""Lowering: a PyTorch causal LM (optionally with peft LoRA) -> an IR :class:`Module`.

The model is traced by ``torch.export`` (non-strict, dynamic batch and sequence axes), then
every ATen node is mapped onto the normalised op set of :mod:`lorashear.ir.ops`: no-op nodes
(clone, asserts, eval-mode dropout) disappear, dtype conversions become ``cast``, and peft's
LoRA pattern ``linear(x, W) + linear(linear(dropout(x), A), B) * s`` becomes one
``lora_linear`` op. Tracing works on the ``meta`` device, so nothing needs weights in memory.
"""

from __future__ import annotations

import contextlib
import operator
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from lorashear.errors import LoweringError, first_line
from lorashear.frontend.complex_values import is_complex_node, lower_complex
from lorashear.frontend.layers import (
    LayerStack,
    export_input_specs,
    find_layer_stack,
    stamp_layers,
    traced_layers_only,
)
from lorashear.frontend.moe import (
    add_expert_gates,
    dense_experts,
    fuse_param_lora,
    name_expert_lora,
    split_fused_experts,
)
from lorashear.frontend.node_forms import (
    INLINED_REGIONS,
    SPELLED_AS,
    assertion_only,
    is_inplace,
    is_view,
    scalar_constants_off_meta,
)
from lorashear.frontend.rewrites import fuse_lora, linear_from_conv1d, linear_from_transposed_matmul
from lorashear.frontend.scope import refuse_out_of_scope
from lorashear.frontend.sizes import exact_quotients, static_min_max
from lorashear.frontend.view_writes import write_through_view
from lorashear.ir.core import DTypeArg, Module, Op, Param, Value
from lorashear.ir.dims import parse_dim
from lorashear.ir.finite import refuse_nonfinite
from lorashear.ir.handles import record_fingerprints
from lorashear.ir.ops import ATEN_OPS, CAST_OPS, IDENTITY_OPS, SYM_OPERATORS
from lorashear.ir.storage import DataStorage, MetaStorage, Storage
from lorashear.ir.types import SYM, TensorType, dtype_name

#: Keyword arguments that only place a tensor (the executor decides placement at run time).
_PLACEMENT_KWARGS = frozenset({"device", "pin_memory", "layout", "memory_format", "non_blocking"})

StorageFn = Callable[[str, torch.Tensor], Storage]


def canonical_param_name(target: str, adapter: str = "default") -> str:
    """HF-style name of a parameter seen through peft's wrappers.

    ``...q_proj.base_layer.weight`` -> ``...q_proj.weight`` and
    ``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``, so base weights keep
    the names of the original checkpoint and LoRA factors those of the adapter file. peft nests
    one wrapper per adapted parameter (``target_parameters``): ``...experts.base_layer.lora_A``
    is the inner wrapper's factor, kept so (as in the adapter file), not the outer one's.
    """
    name = re.sub(r"(?:\.base_layer)+\.(?!lora_[AB]\.)", ".", target)
    return re.sub(rf"\.(lora_[AB])\.{re.escape(adapter)}\.", r".\1.", name)


def canonical_module_path(path: str) -> str:
    path = re.sub(r"(?:\.base_layer)+$", "", path)
    return re.sub(r"\.(lora_[AB]|lora_dropout)\.[A-Za-z0-9_]+$", "", path)


def _in_memory_storage(_name: str, tensor: torch.Tensor) -> Storage:
    return MetaStorage() if tensor.device.type == "meta" else DataStorage(tensor.detach())


def _no_storage(_name: str, _tensor: torch.Tensor) -> Storage:
    return MetaStorage()


def _input_specs(ep) -> list[tuple[Any, str | None, str]]:
    return [(spec.kind, spec.target, spec.arg.name) for spec in ep.graph_signature.input_specs]


class _Lowering:
    def __init__(self, model: nn.Module, storage_fn: StorageFn, adapter: str) -> None:
        self.model = model
        self.storage_fn = storage_fn
        self.adapter = adapter
        self.module = Module()
        self.env: dict[fx.Node, Any] = {}
        self.symbols: dict[str, str] = {}
        self.counter = 0
        #: nodes lowered by a pattern that an earlier node started (a buffer filled slice by
        #: slice): node -> what lowers it instead of its own op
        self.deferred: dict[fx.Node, Callable[[_Lowering, fx.Node], None]] = {}

    # --- entry ------------------------------------------------------------------------------
    def run(self, example_device: torch.device) -> Module:
        ep = self._export(example_device)
        self._bind_params(_input_specs(ep), ep.constants)
        self._lower_nodes(ep)
        return self._finish()

    def run_stamped(self, example_device: torch.device, stack: LayerStack) -> Module | None:
        """:meth:`run`, tracing only the first layers of ``stack`` and copying the others
        (:mod:`.layers`). None when the trace does not allow it, decided before any parameter
        storage is asked for (``storage_fn`` may consume a random generator)."""
        from torch.export.graph_signature import InputKind

        try:
            with traced_layers_only(stack):
                ep = self._export(example_device)
                cut_specs = export_input_specs(self.model)
            traced = _input_specs(ep)
            if [(kind.name, target) for kind, target, _ in traced if kind != InputKind.USER_INPUT] != cut_specs:
                return None  # export lifted inputs other than parameters and buffers
            arg_names = {target: arg for _, target, arg in traced}
            specs = [(InputKind[kind], target, arg_names.get(target))
                     for kind, target in export_input_specs(self.model)]
            storage_fn, self.storage_fn = self.storage_fn, _no_storage
            self._bind_params(specs, {})
            self._lower_nodes(ep)
        except LoweringError:  # the full trace reports it, in its own words
            return None
        if not stamp_layers(self.module.graph, self.module.params, canonical_module_path(stack.path),
                            len(stack.layers)):
            return None
        self.storage_fn = storage_fn
        self.module.params = {}
        self._bind_params(specs, {})  # the storages, in the order the full trace asks for them
        params = self.module.params
        for op in self.module.graph.ops:
            op.replace_refs(lambda r: params[r.name] if isinstance(r, Param) else r)
        return self._finish()

    def _lower_nodes(self, ep) -> None:
        self.graph_module = ep.graph_module
        self.logits_leaf = _logits_leaf(ep.call_spec.out_spec)
        checks_only = assertion_only(ep.graph)
        for node in ep.graph.nodes:
            if node in checks_only:
                continue
            try:
                self._node(node)
            except LoweringError:
                raise
            except Exception as exc:  # a bug or an unexpected node shape: name the node
                raise LoweringError(f"cannot lower node {node.format_node()} at module "
                                    f"{self._loc(node) or 'top level'}: {exc}") from exc

    def _finish(self) -> Module:
        graph = self.module.graph
        split_fused_experts(self.module)  # MoE: one parameter per expert (frontend/moe.py)
        graph.remove_dead_ops()
        linear_from_transposed_matmul(graph)
        linear_from_conv1d(self.module)  # GPT-2's Conv1D: a linear on its weight read transposed
        graph.remove_dead_ops()
        fuse_lora(graph)
        graph.remove_dead_ops()
        fuse_param_lora(graph)  # MoE: a router's LoRA (frontend/moe.py)
        graph.remove_dead_ops()
        name_expert_lora(self.module)  # MoE: LoRA factors named after their expert (frontend/moe.py)
        add_expert_gates(self.module, self.model)  # MoE: a maskable gate per expert (frontend/moe.py)
        self._check_lora_recognised()
        self.module.remove_unused_params()
        self._renumber()
        return self.module

    def _export(self, device: torch.device):
        with scalar_constants_off_meta():
            return self._export_on(device)

    def _export_on(self, device: torch.device):
        from torch.export import Dim

        batch, seq = Dim("batch", min=1, max=4096), Dim("seq", min=2, max=1 << 20)
        ids = torch.zeros(2, 8, dtype=torch.long, device=device)
        mask = torch.ones(2, 8, dtype=torch.long, device=device)
        try:
            try:
                return self._export_with(ids, mask, batch, seq)
            except Exception as exc:
                if "Constraints violated" not in str(exc):
                    raise
            # the model bounds the sequence (a learned position table): let export find the range
            ep = self._export_with(ids, mask, Dim.DYNAMIC, Dim.DYNAMIC)
        except Exception as exc:
            first = first_line(exc)
            if "specialized it to be a constant" in str(exc):
                raise LoweringError(
                    f"the forward of {type(self.model).__name__} fixes the sequence length to the traced "
                    f"example's (it turns the length into a Python value, as CPM-Ant's list(range(length))): "
                    f"{first}", hint="lorashear lowers models that run on any sequence length") from exc
            raise LoweringError(f"torch.export could not trace {type(self.model).__name__}: {first}",
                                hint="the model must be a causal LM whose forward takes input_ids "
                                "and attention_mask") from exc
        _check_dynamic(ep, type(self.model).__name__)
        return ep

    def _export_with(self, ids: torch.Tensor, mask: torch.Tensor, batch: Any, seq: Any):
        """``torch.export`` of the forward on ``(ids, attention_mask=mask, use_cache=False)``,
        the dynamic shapes spelled as the forward's signature names its arguments. A forward
        without a ``use_cache`` parameter is not given one; its inner model reads the config's
        default instead, which is off while tracing (:func:`_no_cache_by_default`)."""
        dims = {0: batch, 1: seq}
        kwargs: dict[str, Any] = {"attention_mask": mask, "use_cache": False}
        shapes: dict[str, Any] = {"input_ids": dims, "attention_mask": dims, "use_cache": None}
        parameters = _forward_parameters(self.model)
        if parameters is not None and "use_cache" not in parameters:
            del kwargs["use_cache"], shapes["use_cache"]
        with _no_cache_by_default(self.model):
            return torch.export.export(self.model, (ids,), kwargs=kwargs, dynamic_shapes=shapes, strict=False)

    # --- parameters -------------------------------------------------------------------------
    def _bind_params(self, specs: list[tuple[Any, str | None, str | None]], constants: dict) -> None:
        """Parameters, buffers and constants for export's inputs ``(kind, target, placeholder)``."""
        from torch.export.graph_signature import InputKind

        tensors = dict(self.model.named_parameters(remove_duplicate=False))
        tensors.update(dict(self.model.named_buffers(remove_duplicate=False)))
        canonical_by_id: dict[int, str] = {}
        for name, t in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            canonical_by_id.setdefault(id(t), name)
        self.placeholder_params: dict[str, Param] = {}
        for kind, target, placeholder in specs:
            if kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                continue
            tensor = tensors.get(target)
            if tensor is None:
                tensor = constants.get(target) if kind == InputKind.CONSTANT_TENSOR else None
            if tensor is None:
                raise LoweringError(f"exported parameter {target} is not a parameter of the model")
            # tied weights (lm_head = embed_tokens) become one IR parameter used twice
            name = canonical_param_name(canonical_by_id.get(id(tensor), target), self.adapter)
            param = self.module.params.get(name)
            if param is None:
                ty = TensorType(dtype_name(tensor.dtype), tuple(tensor.shape))
                param = self.module.add_param(Param(name, ty, self.storage_fn(name, tensor),
                                                    buffer=kind != InputKind.PARAMETER))
            if placeholder is not None:
                self.placeholder_params[placeholder] = param

    # --- nodes ------------------------------------------------------------------------------
    def _loc(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path = list(stack.values())[-1][0]
        if path.startswith("_"):  # export's placeholder for nodes outside any module
            return ""
        return canonical_module_path(path)

    def _value_type(self, val: Any):
        if isinstance(val, torch.Tensor):
            return TensorType(dtype_name(val.dtype), tuple(self._dim(d) for d in val.shape))
        if isinstance(val, (torch.SymInt, int)):
            return SYM
        raise LoweringError(f"unsupported value kind {type(val).__name__}")

    def _dim(self, d: Any):
        if isinstance(d, int):
            return d
        if isinstance(d, torch.SymInt):
            expr = exact_quotients(static_min_max(d.node.expr, d.node.shape_env))
            if expr.is_number:
                return int(expr)
            text = re.sub(r"\b[su]\d+\b", lambda m: self.symbols.get(m.group(), m.group()),
                          str(expr)).replace(" ", "")
            text = re.sub(r"\b(Min|Max)\(", lambda m: f"{m.group(1).lower()}(", text)  # sympy's spelling
            try:
                parse_dim(text)
            except ValueError as exc:
                raise LoweringError(f"torch.export gives {type(self.model).__name__} a size {text} "
                                    f"outside the IR's size arithmetic: {exc}",
                                    hint="sizes may use + - * //, min and max on the batch and "
                                    "sequence length") from None
            return text
        raise LoweringError(f"unsupported dimension {d!r}")

    def _new_value(self, node_val: Any) -> Value:
        value = Value(f"t{self.counter}", self._value_type(node_val))
        self.counter += 1
        return value

    def _arg(self, a: Any, node: fx.Node) -> Any:
        if isinstance(a, fx.Node):
            got = self.env.get(a)
            if got is None:
                raise LoweringError(f"node {node.name} reads {a.name}, which was not lowered")
            return got
        if isinstance(a, (list, tuple)):
            return [self._arg(x, node) for x in a]
        if isinstance(a, torch.dtype):
            return DTypeArg(dtype_name(a))
        if a is None or isinstance(a, (bool, int, float, str)):
            return a
        if isinstance(a, (torch.device, torch.layout, torch.memory_format)):
            raise LoweringError(f"op {node.target} at module {self._loc(node) or 'top level'} takes "
                                f"a positional {type(a).__name__}, which the IR does not carry")
        raise LoweringError(f"op {node.target} at module {self._loc(node) or 'top level'} has an "
                            f"argument of unsupported type {type(a).__name__}: {a!r}")

    def _node(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            param = self.placeholder_params.get(node.name)
            if param is not None:
                self.env[node] = param
                return
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                if node.name == "input_ids":
                    self.symbols.update({str(val.shape[0]): "B", str(val.shape[1]): "S"})
                value = Value(node.name, self._value_type(val))
                self.module.graph.inputs.append(value)
                self.env[node] = value
            return  # non-tensor inputs (use_cache) are constants of the trace
        if node.op == "output":
            outs = node.args[0]
            outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
            tensors = [self.env[o] for o in outs if isinstance(o, fx.Node)]
            if len(tensors) != 1 and self.logits_leaf is not None and self.logits_leaf < len(outs) \
                    and isinstance(outs[self.logits_leaf], fx.Node):
                tensors = [self.env[outs[self.logits_leaf]]]  # the logits, not the model's memories
            if len(tensors) != 1:
                raise LoweringError(f"expected the model to return logits only, got {len(tensors)} tensors")
            self.module.graph.outputs = tensors
            self.module.graph.output_names = ["logits"]
            return
        if node.op == "get_attr" and isinstance(getattr(self.graph_module, node.target, None), fx.GraphModule):
            self.env[node] = getattr(self.graph_module, node.target)  # a region a wrapper runs
            return
        if node.op != "call_function":
            raise LoweringError(f"unsupported graph node {node.op} {node.target}")
        target = node.target
        if target in INLINED_REGIONS:
            self._inline_region(node, *INLINED_REGIONS[target](node))
            return
        if node in self.deferred:
            self.deferred.pop(node)(self, node)
            return
        if target is operator.getitem:
            self.env[node] = self.env[node.args[0]][node.args[1]]
            return
        if target in SYM_OPERATORS:
            self._emit(node, SYM_OPERATORS[target], [self._arg(a, node) for a in node.args], {})
            return
        name = getattr(target, "_opname", None) and f"{target._opname}.{target._overloadname}"
        if not isinstance(target, torch._ops.OpOverload) or name is None:
            raise LoweringError(f"unsupported op {target} at module {self._loc(node) or 'top level'}",
                                hint="only ATen ops are lowered; higher-order ops are not supported")
        if name in IDENTITY_OPS:
            if node.args and isinstance(node.args[0], fx.Node) and node.args[0] in self.env:
                self.env[node] = self.env[node.args[0]]
            return
        if name in CAST_OPS:
            self._cast(node)
            return
        if name == "dropout.default":
            x, p = self.env[node.args[0]], float(node.args[1])
            self._emit(node, "dropout", [x, p], {}) if p > 0 else self.env.__setitem__(node, x)
            return
        if name == "sym_size.int":
            self._emit(node, "dim", [self.env[node.args[0]], int(node.args[1])], {})
            return
        if is_complex_node(node):
            lower_complex(self, node, name)  # complex tensors as real [..., 2] (DeepSeek-V2's rotary)
            return
        if name in SPELLED_AS:
            SPELLED_AS[name](self, node)
            return
        kind = ATEN_OPS.get(name)
        if kind is None and is_inplace(name):
            target = node.args[0] if node.args else None
            if isinstance(target, fx.Node) and target.op == "call_function" and is_view(target):
                write_through_view(self, node, name)  # a new value of the viewed tensor
                return
            kind = self._functional_kind(node, name)
        if kind is None and name in ("item.default", "_local_scalar_dense.default"):
            raise LoweringError(f"the forward reads a tensor's value into Python (aten.{name} at module "
                                f"{self._loc(node) or 'top level'}) to decide shapes or control flow, which "
                                "depend on the data then (JetMoE's expert sizes)",
                                hint="such a layer lowers only once rewritten with static shapes")
        if kind is None:
            raise LoweringError(f"unsupported op aten.{name} at module {self._loc(node) or 'top level'}",
                                hint="add it to lorashear/ir/ops.py if it is a plain tensor op")
        args = [self._arg(a, node) for a in node.args]
        kwargs = {k: self._arg(v, node) for k, v in node.kwargs.items() if k not in _PLACEMENT_KWARGS}
        self._emit(node, kind, args, kwargs)

    def _inline_region(self, node: fx.Node, region: fx.Node, operands: list) -> None:
        """Lower the nodes of a region that a higher-order op wraps (``torch.no_grad()``
        inside the forward) in place of the wrapper: its placeholders are the wrapper's
        operands, its outputs the wrapper's results."""
        module = self.env.get(region) if isinstance(region, fx.Node) else None
        if not isinstance(module, fx.GraphModule):
            raise LoweringError(f"op {node.target} at module {self._loc(node) or 'top level'} wraps "
                                "no graph region")
        outer, self.graph_module = self.graph_module, module
        try:
            inputs = iter(operands)
            for inner in module.graph.nodes:
                if inner.op == "placeholder":
                    self.env[inner] = self._arg(next(inputs), node)
                elif inner.op == "output":
                    outs = inner.args[0]
                    result = [self._arg(o, inner) for o in outs] if isinstance(outs, (list, tuple)) \
                        else self._arg(outs, inner)
                    self.env[node] = result
                else:
                    self._node(inner)
        finally:
            self.graph_module = outer

    def _functional_kind(self, node: fx.Node, name: str) -> str | None:
        """The kind of an in-place op's functional twin (``mul_`` -> ``mul``), where running it
        out of place computes the same: nothing reads the tensor it overwrites afterwards, and
        the tensor and its views share no storage (a write through a view changes its base,
        a write into a base its views)."""
        packet, _, overload = name.partition(".")
        kind = ATEN_OPS.get(f"{packet[:-1]}.{overload}")
        target = node.args[0] if node.args else None
        if kind is None or not isinstance(target, fx.Node):
            return kind
        where = f"in-place op aten.{name} at module {self._loc(node) or 'top level'}"
        if target.op != "call_function" or is_view(target):
            raise LoweringError(f"{where} writes into {'a view' if target.op == 'call_function' else 'an input'} "
                                f"({target.name}), which the IR's values cannot express")
        order = self._node_order(node.graph)
        if any(order[user] > order[node] for user in target.users if user is not node):
            raise LoweringError(f"{where} overwrites {target.name}, which is read after it")
        if any(is_view(user) and user.args and user.args[0] is target for user in target.users if user is not node):
            # (a view of another tensor that reads only this one's shape, expand_as, shares nothing)
            raise LoweringError(f"{where} overwrites {target.name}, which a view shares")
        return kind

    def _node_order(self, graph: fx.Graph) -> dict[fx.Node, int]:
        order = getattr(self, "_order", None)
        if order is None or order[0] is not graph:
            order = self._order = (graph, {n: i for i, n in enumerate(graph.nodes)})
        return order[1]

    def _sizes_of(self, node: fx.Node, like: fx.Node) -> list:
        """``like``'s shape as a size list: literal ints, and a ``dim`` op per symbolic size."""
        other = self._arg(like, node)
        sizes: list = []
        for axis, d in enumerate(like.meta["val"].shape):
            if isinstance(d, int) or (isinstance(d, torch.SymInt) and d.node.expr.is_number):
                sizes.append(int(d))
                continue
            value = self._new_value(d)
            self.module.graph.ops.append(Op("dim", [other, axis], {}, [value], self._loc(node)))
            sizes.append(value)
        return sizes

    def _cast(self, node: fx.Node) -> None:
        x = self.env[node.args[0]]
        src = node.args[0].meta.get("val")
        dst = node.meta.get("val")
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.dtype == dst.dtype:
            self.env[node] = x
        else:
            self._emit(node, "cast", [x, DTypeArg(dtype_name(dst.dtype))], {})

    def _emit(self, node: fx.Node, kind: str, args: list, kwargs: dict) -> None:
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            results = [self._new_value(v) for v in val]
            self.env[node] = results
        else:
            results = [self._new_value(val)]
            self.env[node] = results[0]
        self.module.graph.ops.append(Op(kind, args, kwargs, results, self._loc(node)))

    # --- finishing --------------------------------------------------------------------------
    def _check_lora_recognised(self) -> None:
        transposed = {op.loc for op in self.module.graph.ops if op.kind == "addmm"}
        for op in self.module.graph.ops:
            if op.kind == "lora_linear":
                continue
            for p in op.params():
                if (".lora_A." in f".{p.name}" or ".lora_B." in f".{p.name}") and op.loc in transposed:
                    raise LoweringError(
                        f"the LoRA adapter at module {op.loc} adapts a layer that stores its weight "
                        "transposed (a Conv1D, peft's fan_in_fan_out), which lorashear does not fuse",
                        hint="lower the model without the adapter, or with LoRA on nn.Linear layers only")
                if ".lora_A." in f".{p.name}" or ".lora_B." in f".{p.name}":
                    raise LoweringError(
                        f"the LoRA adapter at module {op.loc or p.name} was not recognised as "
                        f"peft's LoRA pattern (op {op.kind} reads @{p.name})",
                        hint="only plain LoRA is supported (no DoRA, no custom variants)")

    def _renumber(self) -> None:
        for i, op in enumerate(self.module.graph.ops):
            for j, r in enumerate(op.results):
                r.name = str(i) if len(op.results) == 1 else f"{i}.{j}"




def _logits_leaf(spec) -> int | None:
    """Which flattened output the field ``logits`` of the model's output is (XLNet returns its
    memories beside the logits), or None where the output has no such field."""
    context = getattr(spec, "context", None)
    if not isinstance(context, list) or "logits" not in context:
        return None
    children = spec.children()
    return sum(child.num_leaves for child in children[:context.index("logits")])


@contextlib.contextmanager
def _no_cache_by_default(model: nn.Module):
    """``use_cache = False`` on the model's config and its text config for the duration of the
    block (restored after). GraniteMoE's causal LM has no ``use_cache`` parameter and its model
    takes the config's default (True), so it would return its ``DynamicCache``, which export
    cannot flatten into outputs."""
    config = getattr(model, "config", None)
    configs = [] if config is None else [config]
    text = getattr(config, "get_text_config", None)
    if text is not None and text() is not config:
        configs.append(text())
    saved = [(c, c.__dict__.get("use_cache", _UNSET)) for c in configs]
    try:
        for c in configs:
            c.use_cache = False
        yield
    finally:
        for c, value in saved:
            if value is _UNSET:
                c.__dict__.pop("use_cache", None)
            else:
                c.use_cache = value


_UNSET = object()


def _forward_parameters(model: nn.Module):
    """The parameters of ``model.forward`` by name (None where Python cannot tell)."""
    import inspect

    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None


def _check_dynamic(ep, model_name: str) -> None:
    """Refuse a trace that fixed the batch or sequence length of ``input_ids`` to the example's."""
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name == "input_ids":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and any(isinstance(d, int) for d in val.shape):
                raise LoweringError(f"torch.export fixed the input shape of {model_name} to "
                                    f"{list(val.shape)}: the model has no dynamic batch and sequence length",
                                    hint="the model must run on any sequence length")
            return



def lower(model: nn.Module, *, storage_fn: StorageFn | None = None, adapter: str = "default",
          trace_all_layers: bool = False, allow_nonfinite: bool = False) -> Module:
    """Lower a Hugging Face causal LM (a ``PeftModel`` with LoRA, or a plain one) into the IR.

    The model is traced where it lives (CPU, CUDA or ``meta``); parameters keep references to
    its tensors (``storage_fn`` decides, e.g. pointing into safetensors files instead). Only
    the first decoder layers are traced and the others copied (:mod:`.layers`) where the
    model allows it; ``trace_all_layers`` traces every layer, the reference that path is
    tested against (the same IR text). Weights files get fingerprints; weights holding NaN or
    Inf are refused unless ``allow_nonfinite``.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        adapter = model.active_adapter if isinstance(model.active_adapter, str) else adapter
        model = model.get_base_model()
    refuse_out_of_scope(model)
    was_training = model.training
    model.eval()
    try:
        device = next(iter(model.parameters())).device
        storage_fn = storage_fn or _in_memory_storage
        stack = None if trace_all_layers else find_layer_stack(model)
        module = None
        with dense_experts(model):  # MoE: static-shape experts (frontend/moe.py)
            if stack is not None:
                module = _Lowering(model, storage_fn, adapter).run_stamped(device, stack)
            if module is None:
                module = _Lowering(model, storage_fn, adapter).run(device)
    finally:
        model.train(was_training)
    config = getattr(model, "config", None)
    if config is not None:
        from lorashear.ir.attributes import HFConfigAttr
        module.attributes["config"] = HFConfigAttr(_config_dict(config))
    record_fingerprints(module)
    if not allow_nonfinite:
        refuse_nonfinite(module)
    return module


def _config_dict(config) -> dict:
    import json

    data = json.loads(config.to_json_string(use_diff=False))
    data.pop("quantization_config", None)
    return data
