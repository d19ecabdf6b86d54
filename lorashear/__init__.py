"""lorashear: structured pruning of LoRA-adapted LLMs as a compiler pass pipeline.

The public facade; everything else is reachable from the subpackages
(:mod:`lorashear.ir`, :mod:`lorashear.passes`, :mod:`lorashear.runtime`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "lower": "lorashear.frontend.lower",
    "lower_pretrained": "lorashear.frontend.pretrained",
    "load_ir": "lorashear.ir.fileformat",
    "save_ir": "lorashear.ir.fileformat",
    "print_module": "lorashear.ir.printer",
    "parse_module": "lorashear.ir.parser",
    "verify": "lorashear.ir.verifier",
    "Module": "lorashear.ir.core",
    "PassManager": "lorashear.passes.manager",
    "ModulePass": "lorashear.passes.base",
    "PassResult": "lorashear.passes.base",
    "option": "lorashear.passes.base",
    "register_pass": "lorashear.passes.registry",
    "emit_torch": "lorashear.runtime.executor",
    "load_pretrained": "lorashear.runtime.hf",
    "emit": "lorashear.runtime.emit",
    "LorashearError": "lorashear.errors",
}

__all__ = [
    "LorashearError",
    "Module",
    "ModulePass",
    "PassManager",
    "PassResult",
    "emit",
    "emit_torch",
    "load_ir",
    "load_pretrained",
    "lower",
    "lower_pretrained",
    "option",
    "parse_module",
    "print_module",
    "register_pass",
    "save_ir",
    "verify",
]


def __getattr__(name: str) -> Any:
    # lazy: `import lorashear` must not import torch/transformers for `--help`
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lorashear' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


if TYPE_CHECKING:
    from lorashear.errors import LorashearError
    from lorashear.frontend.lower import lower
    from lorashear.frontend.pretrained import lower_pretrained
    from lorashear.ir.core import Module
    from lorashear.ir.fileformat import load_ir, save_ir
    from lorashear.ir.parser import parse_module
    from lorashear.ir.printer import print_module
    from lorashear.ir.verifier import verify
    from lorashear.passes.base import ModulePass, PassResult, option
    from lorashear.passes.manager import PassManager
    from lorashear.passes.registry import register_pass
    from lorashear.runtime.emit import emit
    from lorashear.runtime.executor import emit_torch
    from lorashear.runtime.hf import load_pretrained
