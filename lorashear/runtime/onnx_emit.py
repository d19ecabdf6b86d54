"""ONNX emission built from the IR, op by op: ``emit_onnx(module, "model.onnx")``.

Every IR op is translated by the table in :mod:`lorashear.runtime.onnx_ops` (with
:mod:`~lorashear.runtime.onnx_shape_ops` and :mod:`~lorashear.runtime.onnx_attention`); a
kind without a translation is an :class:`~lorashear.errors.EmissionError` naming the kind
and its module path. Nothing goes through ``torch.onnx``: the graph is the IR's graph, so a
pruned model with different sizes in every layer emits exactly like a stock one.

The model takes the IR's graph inputs (``input_ids`` and ``attention_mask``, int64, with
dynamic batch and sequence axes) and returns ``logits``. With ``kv_cache=True`` it is the
decoder with past that ONNX Runtime decodes incrementally (the graph of
:func:`lorashear.runtime.kv_cache.add_kv_cache`): it also takes
``past_key_values.{i}.key/.value`` (``[B, kv_heads, P, head_dim]``), its ``attention_mask``
covers the ``P + S`` past and new tokens, and it also returns ``present.{i}.key/.value``
(``[B, kv_heads, P + S, head_dim]``), the names Optimum and onnxruntime-genai use, with the
batch, past and new lengths all dynamic; :mod:`lorashear.runtime.onnx_generate` decodes it. Initializers are the parameters
under their IR names and in their checkpoint layout (a linear layer's weight stays
``[out, in]``; a ``Transpose`` node feeds ``MatMul``, and ONNX Runtime folds it once at load
time). Weights are read from their storage only while the file is written, one at a time,
so emitting a checkpoint does not hold a second copy of it in memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

import onnx
import onnx_ir as ir

from lorashear import __version__
from lorashear._atomic import atomic_path
from lorashear.errors import EmissionError
from lorashear.ir.core import Module, Op, clone_module
from lorashear.ir.types import SymIntType
from lorashear.runtime import onnx_attention, onnx_moe, onnx_shape_ops  # noqa: F401  (register translations)
from lorashear.runtime.kv_cache import add_kv_cache, has_kv_cache
from lorashear.runtime.onnx_builder import OnnxGraphBuilder, onnx_dtype, onnx_shape
from lorashear.runtime.onnx_ops import NO_TRANSLATION, TRANSLATIONS

#: The model file written when :func:`emit_onnx` is given a directory.
DEFAULT_FILE_NAME = "model.onnx"
#: Models whose weights exceed this many bytes keep them in ``<path>.data`` (protobuf, and so a
#: single ``.onnx`` file, cannot exceed 2 GiB).
DEFAULT_EXTERNAL_DATA_THRESHOLD = 2_000_000_000
#: With external data, tensors smaller than this stay inside the ``.onnx`` file (norm weights).
INLINE_TENSOR_BYTES = 1024
#: The lowest opset the translations target (ReduceMean's axes input, BitwiseAnd, Split's
#: num_outputs are all opset 18).
MIN_OPSET = 18
_PROTOBUF_LIMIT = 2**31 - 1


def build_onnx_model(module: Module, *, opset: int = 18, merge_lora: bool = True) -> ir.Model:
    """The ONNX model (an ``onnx_ir`` model, weights still lazy) of ``module``.

    ``merge_lora`` folds every LoRA adapter into its base weight first (on a copy: the
    caller's module is untouched), which is what a deployed model wants; without it each
    ``lora_linear`` becomes the base ``MatMul`` plus the two LoRA ``MatMul`` s.
    """
    if opset < MIN_OPSET:
        raise EmissionError(f"ONNX opset {opset} is not supported; use {MIN_OPSET} or newer")
    if merge_lora and any(op.kind == "lora_linear" for op in module.graph.ops):
        from lorashear.ir.lora import merge_lora as merge

        module = clone_module(module)
        merge(module)
    missing = [n for n, p in module.params.items() if not p.storage.has_data]
    if missing:
        raise EmissionError(f"cannot emit ONNX: {len(missing)} parameters have no data "
                            f"(e.g. @{missing[0]})", hint="lower the model again without --meta")
    builder = OnnxGraphBuilder(opset)
    graph = builder.graph
    for v in module.graph.inputs:
        if isinstance(v.type, SymIntType):
            raise EmissionError(f"graph input %{v.name} is a symbolic integer; ONNX inputs are tensors")
        onnx_input = ir.val(v.name, onnx_dtype(v.type.dtype), onnx_shape(v.type.shape))
        graph.inputs.append(onnx_input)
        builder.env[id(v)] = onnx_input
    for op in module.graph.ops:
        _emit_op(builder, op)
    names = module.graph.output_names or [f"output_{i}" for i in range(len(module.graph.outputs))]
    for name, v in zip(names, module.graph.outputs, strict=False):
        out = builder.value(v)
        if out.is_graph_input() or out.is_initializer() or out.is_graph_output():
            out = builder.op("Identity", out)
        out.name = name
        out.dtype = onnx_dtype(v.type.dtype)
        out.shape = onnx_shape(v.type.shape)
        graph.outputs.append(out)
    ir_version = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])
    return ir.Model(graph, ir_version=ir_version, producer_name="lorashear",
                    producer_version=__version__)


def kinds_without_translation(kinds: Iterable[str]) -> list[str]:
    """The ``kinds`` with neither an ONNX translation nor an explicit
    :func:`~lorashear.runtime.onnx_ops.no_translation` entry."""
    return [kind for kind in kinds if kind not in TRANSLATIONS and kind not in NO_TRANSLATION]


def _emit_op(builder: OnnxGraphBuilder, op: Op) -> None:
    """Translate one op and bind its results; errors name the op and its module path."""
    result = f"%{op.results[0].name}" if op.results else "no result"
    where = f"op {op.kind} ({result}) at module {op.loc or 'top level'}"
    translation = TRANSLATIONS.get(op.kind)
    if translation is None:
        reason = NO_TRANSLATION.get(op.kind)
        raise EmissionError(f"{where} has no ONNX translation" + (f": {reason}" if reason else ""),
                            hint="add one to lorashear/runtime/onnx_ops.py")
    builder.at(op.loc)
    try:
        outs = translation(builder, op, op.bound_args())
    except EmissionError as exc:
        raise EmissionError(f"cannot emit {where} to ONNX: {exc.message}", hint=exc.hint) from exc
    except Exception as exc:  # a translation bug or an argument form it does not expect
        raise EmissionError(f"cannot emit {where} to ONNX: {type(exc).__name__}: {exc}") from exc
    outs = outs if isinstance(outs, list) else [outs]
    if len(outs) != len(op.results):
        raise EmissionError(f"the ONNX translation of {where} gave {len(outs)} results, "
                            f"the IR declares {len(op.results)}")
    for result, out in zip(op.results, outs, strict=True):
        # name ONNX values after IR values (v41 is %41) unless they already carry a name
        # that matters: a graph input, a parameter, or an earlier IR value (identity ops)
        if not (out.is_graph_input() or out.is_initializer() or id(out) in builder.named):
            out.name = f"v{result.name}"
            builder.named.add(id(out))
        builder.env[id(result)] = out


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's message: onnx_ir wraps a failed weight load in several layers."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__


def emit_onnx(module: Module, path: str | os.PathLike, *, opset: int = 18,
              external_data_threshold: int | None = DEFAULT_EXTERNAL_DATA_THRESHOLD,
              merge_lora: bool = True, check: bool = True, kv_cache: bool = False) -> Path:
    """Write ``module`` as an ONNX model at ``path``; returns the model file's path.

    ``path`` is the ``.onnx`` file, or an existing directory to write ``model.onnx`` into
    (as ``lorashear-emit --format onnx -o DIR`` does).

    ``kv_cache=True`` writes the decoder with past (module docstring; a graph the KV-cache
    rewrite cannot carry raises :class:`~lorashear.runtime.kv_cache.KVCacheError`, an
    :class:`~lorashear.errors.EmissionError`); ``False`` writes the graph as it is: a module
    the ``kv-cache`` pass already rewrote keeps its cache either way.

    When the weights exceed ``external_data_threshold`` bytes (``None``: never) they go to
    ``<path>.data`` next to the model, each tensor of at least :data:`INLINE_TENSOR_BYTES`.
    The model file is written under a temporary name, validated with ``check`` (default) by
    ``onnx.checker`` (path-based, so external data is checked too, full shape inference),
    and only then renamed into place: a failed emission never leaves a model file behind. The
    weights file is written first and replaced atomically on its own.
    """
    path = Path(path)
    if path.is_dir():
        path = path / DEFAULT_FILE_NAME
    if kv_cache and not has_kv_cache(module):
        module = add_kv_cache(module)  # a rewritten copy: the caller's module is untouched
    model = build_onnx_model(module, opset=opset, merge_lora=merge_lora)
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    external = external_data_threshold is not None and size > external_data_threshold
    if not external and size > _PROTOBUF_LIMIT - (64 << 20):
        raise EmissionError(f"the weights take {size / 2**30:.2f} GiB, more than one ONNX file can "
                            "hold", hint="set an external-data threshold below the model size")
    data_path = path.with_name(path.name + ".data")
    with atomic_path(path) as tmp:
        try:
            if external:
                # written next to the final model under its final name (atomically, by
                # onnx_ir): the location recorded in the model must be the final one
                ir.save(model, tmp, external_data=data_path.name,
                        size_threshold_bytes=INLINE_TENSOR_BYTES)
            else:
                ir.save(model, tmp)
        except Exception as exc:  # loading a weight failed, or the disk did
            raise EmissionError(f"cannot write ONNX model {path}: {_root_cause(exc)}") from exc
        if check:
            try:
                onnx.checker.check_model(str(tmp), full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
                raise EmissionError(f"the emitted ONNX model does not validate: {exc}") from exc
    if not external:
        with contextlib.suppress(FileNotFoundError):
            data_path.unlink()  # a previous emission's weights would now be stale
    return path
