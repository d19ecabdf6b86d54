"""``kv-cache``: rewrite the graph into one decoding step over a key/value cache.

The rewrite itself (cache points, the two sequence lengths, positions that follow the past
length) is :func:`lorashear.runtime.kv_cache.add_kv_cache`; this pass applies it to the
module in a pipeline, typically last (after ``compress`` or ``merge-lora``), so that the
emitted ONNX model and ``lorashear.ir`` file decode incrementally. Training passes need the
plain graph: run them before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorashear.analysis.manager import AnalysisManager
from lorashear.errors import PassError
from lorashear.ir.core import Module
from lorashear.passes.base import ModulePass, PassResult
from lorashear.passes.registry import register_pass
from lorashear.runtime.kv_cache import KVCacheError, add_kv_cache, cache_layout, has_kv_cache


@register_pass
@dataclass(frozen=True)
class KVCache(ModulePass):
    """Give every attention a key/value cache: inputs ``past_key_values.{i}.key/.value``,
    outputs ``present.{i}.key/.value``, an attention mask over past and new tokens."""

    name: ClassVar[str] = "kv-cache"

    def run(self, module: Module, am: AnalysisManager) -> PassResult:
        if has_kv_cache(module):
            return PassResult.unchanged()
        try:
            rewritten = add_kv_cache(module)
        except KVCacheError as exc:
            raise PassError(f"kv-cache: {exc.message}", hint=exc.hint) from None
        module.graph, module.params = rewritten.graph, rewritten.params  # the copy's params share storage
        layout = cache_layout(module)
        return PassResult(True, frozenset(), {
            "cached attentions": len(layout),
            "kv heads": sum(e.kv_heads for e in layout)})
