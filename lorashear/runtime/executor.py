"""The executor: an IR module as a dense ``nn.Module`` with the Hugging Face forward signature.

``IRModel(module)(input_ids, attention_mask=None, labels=None).logits`` runs the graph op by
op through the same code the verifier uses (:mod:`lorashear.ir.interpret`). Parameters are
registered under their IR names, so ``state_dict()`` keys are the checkpoint's names. LoRA
factors are trainable, everything else frozen: this is also what the training passes run.

With ``gradient_checkpointing=True`` the forward runs each decoder layer (the contiguous ops
whose provenance ``loc`` lies under ``...layers.<i>``) under ``torch.utils.checkpoint``: the
layer's activations are dropped after the forward and recomputed in the backward pass.
After :meth:`IRModel.call_layers` the forward runs each decoder layer as a call of the
submodule its parameters live under, so per-module hooks (FSDP2's gather and free) fire
around it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from lorashear.errors import EmissionError, ExecutionError, LorashearError, first_line
from lorashear.ir.core import Module, Op, Param
from lorashear.ir.interpret import PreparedOp
from lorashear.ir.lora import adapters
from lorashear.ir.ops import op_def
from lorashear.ir.types import torch_dtype
from lorashear.runtime.kv_cache import (
    PAST_KEY,
    PAST_VALUE,
    CacheLayout,
    KVCacheError,
    add_kv_cache,
    cache_layout,
    cached_pairs,
    has_kv_cache,
    store_present,
)


def lora_param_names(module: Module) -> set[str]:
    """Names of the LoRA factors (the A and B operands of every ``lora_linear`` op)."""
    return {p.name for _, parts in adapters(module) for p in parts.factors}


_LAYER_LOC = re.compile(r"^(.*?(?:^|\.)layers\.\d+)(?:\.|$)")


@dataclass
class Segment:
    """A contiguous run of ops; ``layer`` names its decoder layer (None: not in one).

    ``inputs`` are the values it reads that ops before it made (or graph inputs), ``outputs``
    the values it makes that later ops or the graph's outputs read."""

    layer: str | None
    ops: list[Op]
    inputs: list[int]
    outputs: list[int]


def layer_segments(module: Module) -> list[Segment]:
    """The graph's ops cut into runs of one decoder layer each (and the runs between them)."""
    runs: list[tuple[str | None, list[Op]]] = []
    for op in module.graph.ops:
        match = _LAYER_LOC.match(op.loc or "")
        layer = match.group(1) if match else None
        if runs and runs[-1][0] == layer:
            runs[-1][1].append(op)
        else:
            runs.append((layer, [op]))
    read_after: set[int] = {id(v) for v in module.graph.outputs}
    segments: list[Segment] = []
    for layer, ops in reversed(runs):
        made = {id(r) for op in ops for r in op.results}
        reads = list(dict.fromkeys(id(v) for op in ops for v in op.operands()))
        segments.append(Segment(layer, ops, [v for v in reads if v not in made],
                                [id(r) for op in ops for r in op.results if id(r) in read_after]))
        read_after |= set(reads)
    return segments[::-1]


def dead_after(module: Module) -> dict[int, tuple[int, ...]]:
    """For each op (by id), the values (by id) that no later op and no graph output reads."""
    last: dict[int, Op] = {}
    for op in module.graph.ops:
        for v in op.operands():
            last[id(v)] = op
        for r in op.results:
            last.setdefault(id(r), op)  # read by nothing: dead at once
    outputs = {id(v) for v in module.graph.outputs}
    dead: dict[int, list[int]] = {}
    for value, op in last.items():
        if value not in outputs:
            dead.setdefault(id(op), []).append(value)
    return {op: tuple(values) for op, values in dead.items()}


class IRModel(nn.Module):
    """Runs an IR :class:`Module`; ``forward`` follows ``transformers`` causal LMs.

    ``dtype`` converts the floating parameters, except those named in ``keep_dtype`` (the
    training passes keep LoRA factors in fp32 under bf16 base weights)."""

    def __init__(self, module: Module, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, keep_dtype: Collection[str] = (),
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.ir = module
        self.gradient_checkpointing = gradient_checkpointing
        self._segments = layer_segments(module)
        self._slots: dict[str, tuple[nn.Module, str]] = {}
        trainable = lora_param_names(module)
        for param in module.params.values():
            tensor = self._load(param, device, None if param.name in keep_dtype else dtype)
            try:
                owner, leaf = self._owner(param.name)
                if param.buffer:
                    owner.register_buffer(leaf, tensor, persistent=True)
                else:
                    owner.register_parameter(leaf, nn.Parameter(tensor, requires_grad=param.name in trainable))
            except (KeyError, TypeError, AttributeError) as exc:  # a name torch cannot register
                raise EmissionError(f"parameter @{param.name} cannot be a module attribute: "
                                    f"{first_line(exc)}",
                                    hint="parameter names are dotted paths of non-empty parts; no "
                                    "parameter may be a prefix of another or an nn.Module attribute "
                                    "name (forward, training, ...)") from None
            self._slots[param.name] = (owner, leaf)
        self._prepared: dict[int, PreparedOp] = {}
        #: op id -> the values nothing after it reads, dropped once it ran (memory is reused
        #: while the forward runs instead of every op writing into fresh pages)
        self._dead_after = dead_after(module)
        self._step_ir: Module | None = module if has_kv_cache(module) else None
        self._step_error: KVCacheError | None = None
        #: decoder layer name -> its parameter container, once :meth:`call_layers` made them
        #: callable (None: forward runs every op itself, as always)
        self._layer_calls: dict[str, nn.Module] | None = None

    def call_layers(self) -> dict[str, nn.Module]:
        """Make each decoder layer's parameter container (the submodule ``model.layers.<i>``
        the layer's parameters are registered under) a module that runs the layer's ops when
        called, and let the plain forward call it. Hooks on those modules then fire around
        each layer, which is what FSDP2's ``fully_shard`` needs: it gathers a layer's
        parameters in its pre-forward hook and frees them after (and again for the backward).
        The ops and their order are the same; each layer reads the live parameters when it
        starts. Returns the containers by layer name (a layer whose parameters live under no
        container of its name is left to the forward, as before)."""
        if self._layer_calls is None:
            self._layer_calls = {}
            for segment in self._segments:
                container = self._container(segment.layer) if segment.layer else None
                if container is None or type(container) is not nn.Module:
                    continue
                container.__class__ = _LayerCall  # adds a forward, nothing else
                container.run_layer = functools.partial(self._call_layer, segment)
                self._layer_calls[segment.layer] = container
        return self._layer_calls

    def _container(self, path: str) -> nn.Module | None:
        owner: nn.Module | None = self
        for part in path.split("."):
            owner = owner._modules.get(part) if owner is not None else None
        return owner

    def _call_layer(self, segment: Segment, device: torch.device, *inputs: Any) -> tuple[Any, ...]:
        """One decoder layer as a module call (:meth:`call_layers`), checkpointed like the
        forward checkpoints its layers."""
        tensors = self._live_tensors()  # read now: a hook may just have gathered them
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._run_segment, segment, tensors, device, *inputs, use_reentrant=False)
        return self._run_segment(segment, tensors, device, *inputs)

    @staticmethod
    def _load(param: Param, device, dtype) -> torch.Tensor:
        want = torch_dtype(param.type.dtype)
        if device is not None and torch.device(device).type == "meta":  # in the dtype asked for
            if dtype is not None and want.is_floating_point:
                want = dtype
            return torch.empty(param.type.shape, dtype=want, device="meta")
        if not param.storage.has_data:
            raise EmissionError(f"parameter @{param.name} has no data (the module was lowered with "
                                "--meta); lower it again without --meta to run it")
        tensor = param.storage.load()
        if tuple(tensor.shape) != param.type.shape:
            raise EmissionError(f"stored data of @{param.name} has shape {tuple(tensor.shape)}, "
                                f"the IR declares {list(param.type.shape)}")
        if dtype is not None and want.is_floating_point:
            want = dtype
        # a copy: training must never write into a memory-mapped checkpoint
        return tensor.to(device=device or "cpu", dtype=want, copy=True)

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        *path, leaf = name.split(".")
        owner: nn.Module = self
        for part in path:
            child = owner._modules.get(part)
            if child is None:
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        return owner, leaf

    def tensor(self, name: str) -> torch.Tensor:
        """The live tensor of IR parameter ``name``."""
        owner, leaf = self._slots[name]
        return getattr(owner, leaf)

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters())).device

    def _input_env(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   graph: Module | None = None,
                   past: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[int, Any]:
        graph = graph or self.ir
        inputs = {"input_ids": input_ids}
        for entry, (key, value) in zip(cache_layout(graph), past or [], strict=True):
            inputs[PAST_KEY.format(entry.index)] = key
            inputs[PAST_VALUE.format(entry.index)] = value
        names = [v.name for v in graph.graph.inputs]
        if "attention_mask" in names:
            if attention_mask is None:
                length = input_ids.shape[1] + (past[0][0].shape[2] if past else 0)
                attention_mask = input_ids.new_ones(input_ids.shape[0], length)
            inputs["attention_mask"] = attention_mask
        env: dict[int, Any] = {}
        for v in graph.graph.inputs:
            if v.name not in inputs:
                raise EmissionError(f"the graph needs input {v.name!r}, which forward() does not take")
            env[id(v)] = inputs[v.name]
        return env

    @property
    def step_ir(self) -> Module:
        """The decoding-step graph over the same parameters: the module itself when it already
        has a KV cache, else its :func:`~lorashear.runtime.kv_cache.add_kv_cache` rewrite (made
        on first use; a :class:`KVCacheError` names what the rewrite cannot carry)."""
        if self._step_ir is None:
            if self._step_error is not None:
                raise self._step_error
            try:
                self._step_ir = add_kv_cache(self.ir)
            except KVCacheError as exc:
                self._step_error = exc
                raise
            self._dead_after.update(dead_after(self._step_ir))
        return self._step_ir

    def supports_cache(self) -> bool:
        """Whether this model can decode over a KV cache (its graph can be rewritten to)."""
        try:
            self.step_ir  # noqa: B018  (builds it)
        except KVCacheError:
            return False
        return True

    def _past(self, cache: Any, layout: list[CacheLayout], batch: int,
              device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each cache entry's past keys and values: from a ``transformers`` cache (whose layer
        ``i`` holds entry ``i``), a sequence of ``(key, value)`` pairs, or empty (prefill)."""
        dtype = self._float_dtype()
        empty = [entry.empty(batch, device=device, dtype=dtype) for entry in layout]
        if cache is None:
            return empty
        if isinstance(cache, Cache):
            return cached_pairs(cache, empty)
        pairs = [tuple(pair) for pair in cache]
        if len(pairs) != len(layout):
            raise ExecutionError(f"the cache has {len(pairs)} entries; the graph caches "
                                 f"{len(layout)} attentions")
        return pairs  # type: ignore[return-value]

    def _float_dtype(self) -> torch.dtype:
        """The dtype of the model's floating parameters (what its keys come out in)."""
        for owner, leaf in self._slots.values():  # the first floating one, not a dict of all
            tensor = getattr(owner, leaf)
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32

    def _live_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(owner, leaf) for name, (owner, leaf) in self._slots.items()}

    @staticmethod
    def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               labels[:, 1:].reshape(-1), ignore_index=-100)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: Any = None, use_cache: bool | None = None,
                past_key_values: Any = None, logits_to_keep: int = 0,
                output_hidden_states: bool = False, **_: Any) -> CausalLMOutputWithPast:
        """Logits of ``input_ids`` (and the LM loss against ``labels``).

        With a ``cache`` (``past_key_values`` is its older name) or ``use_cache=True`` this runs
        the decoding-step graph (:attr:`step_ir`): ``input_ids`` are the new tokens,
        ``attention_mask`` covers the cached and the new ones, and the result's ``cache`` holds
        the keys and values of all of them. A ``transformers`` cache is extended in place and
        returned; ``(key, value)`` pairs (or ``None``: an empty past) give pairs back.
        ``logits_to_keep=k`` (decoding only) computes the LM head for the last ``k`` positions.
        ``output_hidden_states=True`` (plain forward) also returns each decoder layer's output
        (:meth:`layer_outputs`) as ``hidden_states``."""
        cache = cache if cache is not None else past_key_values
        if cache is not None or use_cache or self._step_ir is self.ir:
            return self._step(input_ids, attention_mask, labels, cache, logits_to_keep)
        env = self._input_env(input_ids, attention_mask)
        tensors = self._live_tensors()
        device = input_ids.device
        if self._layer_calls is not None:
            for segment in self._segments:
                layer = self._layer_calls.get(segment.layer) if segment.layer else None
                if layer is None:
                    self._run_ops(segment.ops, env, tensors, device, keep_all=output_hidden_states)
                    continue
                values = layer(device, *(env[v] for v in segment.inputs))
                env.update(zip(segment.outputs, values, strict=True))
        elif self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            for segment in self._segments:
                if segment.layer is None:
                    self._run_ops(segment.ops, env, tensors, device, keep_all=output_hidden_states)
                    continue
                values = checkpoint(self._run_segment, segment, tensors, device,
                                    *(env[v] for v in segment.inputs), use_reentrant=False)
                env.update(zip(segment.outputs, values, strict=True))
        else:
            self._run_ops(self.ir.graph.ops, env, tensors, device, keep_all=output_hidden_states)
        logits = env[id(self.ir.graph.outputs[0])]
        loss = self._lm_loss(logits, labels) if labels is not None else None
        hidden = tuple(env[v] for v in self.layer_outputs()) if output_hidden_states else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden)

    def layer_outputs(self) -> list[int]:
        """Each decoder layer's output (the residual stream it hands on: the value its last op
        makes), as value ids in layer order."""
        outputs = []
        for segment in self._segments:
            if segment.layer is None:
                continue
            last = segment.ops[-1]
            if len(last.results) != 1 or id(last.results[0]) not in segment.outputs:
                raise ExecutionError(f"decoder layer {segment.layer} does not end in the value it "
                                     f"hands on (its last op is {last.kind} at {last.loc or '?'})")
            outputs.append(id(last.results[0]))
        return outputs

    def generate(self, inputs: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """transformers' ``generate`` (greedy, sampling, beam search, ...) on this model, over
        its KV-cache graph: see :mod:`lorashear.runtime.generation`."""
        from lorashear.runtime.generation import generator  # it builds on this module

        return generator(self).generate(inputs, **kwargs)

    def _step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              labels: torch.Tensor | None, cache: Any, logits_to_keep: int = 0) -> CausalLMOutputWithPast:
        graph = self.step_ir
        layout = cache_layout(graph)
        past = self._past(cache, layout, input_ids.shape[0], input_ids.device)
        env = self._input_env(input_ids, attention_mask, graph, past)
        tensors = self._live_tensors()
        head = graph.graph.outputs[0].producer
        hidden = head.operands()[0] if head is not None and op_def(head.kind).weight_arg else None
        if logits_to_keep and hidden is not None and labels is None:
            # the LM head on the last positions only (what generate's prefill asks for)
            ops = graph.graph.ops
            at = ops.index(head)
            self._run_ops(ops[:at], env, tensors, input_ids.device)
            everything = env[id(hidden)]
            env[id(hidden)] = everything[:, -logits_to_keep:]
            self._run_ops([head], env, tensors, input_ids.device)
            env[id(hidden)] = everything
            self._run_ops(ops[at + 1:], env, tensors, input_ids.device)
        else:
            self._run_ops(graph.graph.ops, env, tensors, input_ids.device)
        outputs = [env[id(v)] for v in graph.graph.outputs]
        logits = outputs[0]
        presents = list(zip(outputs[1::2], outputs[2::2], strict=True))
        if isinstance(cache, Cache):
            for i, ((old_key, _), (key, value)) in enumerate(zip(past, presents, strict=True)):
                store_present(cache, i, key, value, old_key.shape[2])
        else:
            cache = tuple(presents)
        loss = self._lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def _run_ops(self, ops: list[Op], env: dict[int, Any], tensors: dict[str, torch.Tensor],
                 device: torch.device, *, keep_all: bool = False) -> None:
        prepared = self._prepared
        training = self.training
        dead = {} if keep_all else self._dead_after

        def param(p: Param) -> torch.Tensor:
            return tensors[p.name]

        for op in ops:
            entry = prepared.get(id(op))
            if entry is None or entry.op is not op:  # an op added since (a rewritten graph)
                entry = prepared[id(op)] = PreparedOp(op)
            try:
                entry(env, param, device, training)
                for value in dead.get(id(op), ()):
                    env.pop(value, None)
            except LorashearError:
                raise
            except (RuntimeError, IndexError, ValueError, TypeError) as exc:  # data the verifier cannot see
                where = f"%{op.results[0].name}" if op.results else "a value"
                raise ExecutionError(f"op {op.kind} defining {where} (module {op.loc or 'top level'}) "
                                     f"failed: {first_line(exc)}") from exc

    def _run_segment(self, segment: Segment, tensors: dict[str, torch.Tensor], device: torch.device,
                     *inputs: Any) -> tuple[Any, ...]:
        """One segment from its input values to its output values (what checkpoint reruns)."""
        env = dict(zip(segment.inputs, inputs, strict=True))
        self._run_ops(segment.ops, env, tensors, device)
        return tuple(env[v] for v in segment.outputs)


class _LayerCall(nn.Module):
    """A decoder layer's parameter container that runs the layer when called
    (:meth:`IRModel.call_layers`)."""

    run_layer: Any

    def forward(self, device: torch.device, *inputs: Any) -> tuple[Any, ...]:
        return self.run_layer(device, *inputs)


class SuffixLoss:
    """The mean LM loss of ``model`` over fixed ``batches`` after a change to a few parameters,
    rerunning only the segments from the first one that reads them.

    One forward per batch (at construction, ``base``) records the values live at each segment
    boundary: made before it and read at or after it (a decoder layer's residual stream, the
    rotary tables, the mask), shared by reference, not copied. ``loss(names)`` then starts each
    batch at the boundary before the first op that reads any parameter in ``names``; the ops
    before it read none of them, so their values are the recorded ones and the result is what a
    full forward gives, bit for bit on one device and thread count. Zeroing one layer's
    attention costs the layers from it to the end and the head, not the whole model. Runs
    without gradients, in the model's current mode."""

    def __init__(self, model: IRModel, batches: list[torch.Tensor]) -> None:
        if not batches:
            raise ValueError("SuffixLoss needs at least one batch")
        self.model = model
        self.batches = list(batches)
        segments = model._segments
        made_in = {id(v): -1 for v in model.ir.graph.inputs}
        for k, segment in enumerate(segments):
            made_in.update({id(r): k for op in segment.ops for r in op.results})
        #: live[k]: ids of the values the segments from k on read that earlier segments made
        live: list[set[int]] = [set() for _ in segments]
        reads_after: set[int] = {id(v) for v in model.ir.graph.outputs}
        for k in reversed(range(len(segments))):
            reads_after |= set(segments[k].inputs)
            live[k] = {v for v in reads_after if made_in.get(v, -1) < k}
        self._first_reader: dict[str, int] = {}
        for k, segment in enumerate(segments):
            for op in segment.ops:
                for param in op.params():
                    self._first_reader.setdefault(param.name, k)
        self._snapshots: list[list[dict[int, Any]]] = []  # per batch, per segment boundary
        self._output = id(model.ir.graph.outputs[0])
        total = 0.0
        with torch.no_grad():
            tensors = model._live_tensors()
            for batch in self.batches:
                env = model._input_env(batch, None)
                boundaries = []
                for k, segment in enumerate(segments):
                    boundaries.append({v: env[v] for v in live[k]})
                    model._run_ops(segment.ops, env, tensors, batch.device)
                total += float(model._lm_loss(env[self._output], batch))
                self._snapshots.append(boundaries)
        #: the mean loss with the parameters as they were at construction
        self.base = total / len(self.batches)

    def loss(self, names: Collection[str]) -> float:
        """The mean loss now, assuming only the parameters ``names`` changed since construction."""
        start = min((self._first_reader[n] for n in names if n in self._first_reader),
                    default=len(self.model._segments))
        if start == len(self.model._segments):
            return self.base  # no op reads them
        total = 0.0
        with torch.no_grad():
            tensors = self.model._live_tensors()
            for batch, boundaries in zip(self.batches, self._snapshots, strict=True):
                env = dict(boundaries[start])
                for segment in self.model._segments[start:]:
                    self.model._run_ops(segment.ops, env, tensors, batch.device)
                total += float(self.model._lm_loss(env[self._output], batch))
        return total / len(self.batches)


def emit_torch(module: Module, *, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> IRModel:
    """A dense PyTorch module that runs ``module`` (``input_ids -> .logits``)."""
    return IRModel(module, device=device, dtype=dtype).eval()
