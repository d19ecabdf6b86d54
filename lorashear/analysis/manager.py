"""Analyses: facts computed from a module on demand and cached until a pass invalidates them.

An analysis is a subclass of :class:`Analysis` with ``compute(module, am)``; the class itself is
the cache key, as in MLIR's ``AnalysisManager``. Passes ask the :class:`AnalysisManager` for
results; after a pass that changed the module, the manager drops every cached result whose
class the pass did not list as preserved. Preserving a class preserves its subclasses, so
:data:`ALL` (the base class) keeps every result.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from lorashear.ir.core import Module

T = TypeVar("T")


class Analysis:
    """Base class: subclasses implement ``compute``; ``name`` labels them in debug output."""

    name: ClassVar[str] = ""

    @classmethod
    def compute(cls, module: Module, am: AnalysisManager) -> Any:
        raise NotImplementedError


Preserved = frozenset[type[Analysis]]

#: What a pass that changed nothing an analysis reads preserves: every analysis.
ALL: Preserved = frozenset({Analysis})


class AnalysisManager:
    """Lazy, cached analyses of one module, keyed by analysis class."""

    def __init__(self, module: Module) -> None:
        self.module = module
        self._cache: dict[type[Analysis], Any] = {}
        self.computed: list[str] = []  # for tests and --debug: what was (re)computed, in order

    def get(self, analysis: type[Analysis]) -> Any:
        """The result of ``analysis`` on the module, computed on first use."""
        if analysis not in self._cache:
            self._cache[analysis] = analysis.compute(self.module, self)
            self.computed.append(analysis.name or analysis.__name__)
        return self._cache[analysis]

    def cached(self, analysis: type[Analysis]) -> bool:
        return analysis in self._cache

    def invalidate(self, preserved: Preserved) -> None:
        """Drop every cached result whose class is not (a subclass of) a preserved one."""
        for analysis in list(self._cache):
            if not issubclass(analysis, tuple(preserved)):
                del self._cache[analysis]
