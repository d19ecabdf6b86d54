"""Analyses: facts computed from a module on demand and cached until a pass invalidates them.

An analysis is a class with a ``name`` and ``compute(module, analyses)``. Passes ask the
:class:`AnalysisManager` for results; after a pass that changed the module, the manager
drops every cached result the pass did not list as preserved (``"*"`` keeps all).
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from lorashear.ir.core import Module

T = TypeVar("T")


class Analysis:
    """Base class: subclasses set ``name`` and implement ``compute``."""

    name: ClassVar[str] = ""

    @classmethod
    def compute(cls, module: Module, analyses: AnalysisManager) -> Any:
        raise NotImplementedError


class AnalysisManager:
    """Lazy, cached analyses of one module."""

    def __init__(self, module: Module) -> None:
        self.module = module
        self._cache: dict[str, Any] = {}
        self.computed: list[str] = []  # for tests and --debug: what was (re)computed, in order

    def get(self, analysis: type[Analysis]) -> Any:
        if analysis.name not in self._cache:
            self._cache[analysis.name] = analysis.compute(self.module, self)
            self.computed.append(analysis.name)
        return self._cache[analysis.name]

    def cached(self, name: str) -> bool:
        return name in self._cache

    def invalidate(self, preserved: frozenset[str]) -> None:
        if "*" in preserved:
            return
        for name in list(self._cache):
            if name not in preserved:
                del self._cache[name]
