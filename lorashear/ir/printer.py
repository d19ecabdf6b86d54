"""Text form of the IR: one statement per line, weights by handle only.

```
lorashear-ir 2
attr config = hf.config {"hidden_size":64,...}
weights "model.safetensors" fingerprint "sampled-sha256:9f2c...41"
param @model.embed_tokens.weight : f32[100, 64] = file("model.safetensors", "model.embed_tokens.weight")
buffer @model.rotary_emb.inv_freq : f32[8] = data
input %input_ids : i64[B, S]
%0 = dim(%input_ids, 0) : sym
%5 = embedding(@model.embed_tokens.weight, %input_ids) : f32[B, S, 64] loc("model.embed_tokens")
output logits = %97
```
:mod:`lorashear.ir.parser` reads it back; print -> parse -> print is the identity. A
``weights`` line records the fingerprint of a weights file (:mod:`lorashear.ir.fingerprint`);
loading checks it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from lorashear.ir.attributes import dump_json
from lorashear.ir.core import DTypeArg, Module, Op, Param, Value
from lorashear.ir.storage import DataStorage, FileStorage, MetaStorage, Storage

#: The newest version of the text format: what the parser reads, and rejects anything newer.
FORMAT_VERSION = 2
#: The version a module is written with is the oldest that can express it: version 2 added
#: ``weights`` statements, so a module without fingerprints still reads in older lorashear.
WEIGHTS_STATEMENT_VERSION = 2
MAGIC = "lorashear-ir"


def format_arg(arg) -> str:
    """One argument in text form."""
    if isinstance(arg, Value):
        return f"%{arg.name}"
    if isinstance(arg, Param):
        return f"@{arg.name}"
    if isinstance(arg, DTypeArg):
        return arg.name
    if arg is None:
        return "none"
    if arg is True:
        return "true"
    if arg is False:
        return "false"
    if isinstance(arg, int):
        return str(arg)
    if isinstance(arg, float):
        if math.isnan(arg):
            return "nan"
        if math.isinf(arg):
            return "inf" if arg > 0 else "-inf"
        return repr(arg)
    if isinstance(arg, str):
        return json.dumps(arg)
    if isinstance(arg, list):
        return "[" + ", ".join(format_arg(a) for a in arg) + "]"
    raise TypeError(f"cannot print argument of type {type(arg).__name__}: {arg!r}")


def format_storage(storage: Storage, path_fn: Callable[[str], str] | None = None) -> str:
    if isinstance(storage, FileStorage):
        path = path_fn(storage.path) if path_fn else storage.path
        transposed = ", transposed" if storage.transposed else ""
        return f"file({json.dumps(path)}, {json.dumps(storage.key)}{transposed})"
    if isinstance(storage, DataStorage):
        return "data"
    if isinstance(storage, MetaStorage):
        return "meta"
    raise TypeError(f"unknown storage {storage!r}")


def weights_files(module: Module) -> dict[str, str]:
    """Path -> recorded fingerprint of every weights file the module's parameters read, in
    the order of the parameters (files without a recorded fingerprint are left out)."""
    files: dict[str, str] = {}
    for p in module.params.values():
        s = p.storage
        if isinstance(s, FileStorage) and s.fingerprint is not None:
            known = files.setdefault(s.path, s.fingerprint)
            if known != s.fingerprint:
                raise ValueError(f"weights file {s.path} carries two fingerprints ({known} for "
                                 f"some parameters, {s.fingerprint} for @{p.name})")
    return files


def format_op(op: Op) -> str:
    args = [format_arg(a) for a in op.args] + [f"{k}={format_arg(v)}" for k, v in op.kwargs.items()]
    lhs = ", ".join(f"%{r.name}" for r in op.results)
    types = ", ".join(str(r.type) for r in op.results)
    text = f"{lhs} = {op.kind}({', '.join(args)}) : {types}"
    if op.loc:
        text += f" loc({json.dumps(op.loc)})"
    return text


def print_module(module: Module, *, path_fn: Callable[[str], str] | None = None,
                 with_header: bool = True) -> str:
    """The whole module as text. ``path_fn`` rewrites weight-file paths (e.g. make them relative)."""
    lines: list[str] = []
    files = weights_files(module)
    if with_header:
        lines.append(f"{MAGIC} {WEIGHTS_STATEMENT_VERSION if files else 1}")
    for name, attr in module.attributes.items():
        lines.append(f"attr {name} = {attr.kind} {dump_json(attr.to_json())}")
    for path, fingerprint in files.items():
        shown = path_fn(path) if path_fn else path
        lines.append(f"weights {json.dumps(shown)} fingerprint {json.dumps(fingerprint)}")
    for p in module.params.values():
        keyword = "buffer" if p.buffer else "param"
        lines.append(f"{keyword} @{p.name} : {p.type} = {format_storage(p.storage, path_fn)}")
    for v in module.graph.inputs:
        lines.append(f"input %{v.name} : {v.type}")
    for op in module.graph.ops:
        lines.append(format_op(op))
    names = module.graph.output_names or [""] * len(module.graph.outputs)
    for name, v in zip(names, module.graph.outputs):
        lines.append(f"output {name} = %{v.name}" if name else f"output %{v.name}")
    return "\n".join(lines) + "\n"
