"""What a pass is: a frozen dataclass with a kebab-case ``name`` whose fields are its options.

```python
@register_pass
@dataclass(frozen=True)
class Prune(ModulePass):
    '''Zero the lowest-saliency groups (one-shot).'''
    name: ClassVar[str] = "prune"
    ratio: float = option(0.2, "share of prunable parameters to remove")

    def run(self, module, am) -> PassResult: ...
```
``run`` mutates the module in place and returns whether it changed it and which analyses
survived; ``requires_attributes`` names module attributes an earlier pass must have made.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lorashear.analysis.manager import ALL, AnalysisManager, Preserved
from lorashear.ir.core import Module


def option(default: Any, doc: str, *, run_only: bool = False, **kwargs: Any) -> Any:
    """A pass option: a dataclass field with a default and a one-line description.

    ``run_only``: the option changes how a run goes (where it trains, logs, checkpoints,
    how much memory it spends), never what it computes; a checkpoint made with another
    value resumes, and the run's fingerprint leaves it out
    (:func:`lorashear.passes.resume.result_text`)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("pass options must have immutable defaults (use a tuple)")
    return field(default=default, metadata={"doc": doc, "run_only": run_only, **kwargs})



@dataclass(frozen=True)
class PassResult:
    """What a pass did: ``modified`` the module; the analyses of the ``preserved`` classes (and
    their subclasses; :data:`~lorashear.analysis.manager.ALL` for every one) stay valid."""

    modified: bool
    preserved: Preserved = frozenset()
    statistics: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def unchanged(**statistics: Any) -> PassResult:
        return PassResult(False, ALL, statistics)


@dataclass(frozen=True)
class ModulePass:
    """Base class of passes. Subclasses are frozen dataclasses with a ``name``."""

    name: ClassVar[str] = ""
    #: Module attributes that must exist before this pass runs, with the pass that makes them.
    requires_attributes: ClassVar[dict[str, str]] = {}

    def run(self, module: Module, am: AnalysisManager) -> PassResult:
        raise NotImplementedError

    # --- introspection used by the pipeline parser and --list-passes ---------------------------
    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def option_types(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in cls.option_fields()}

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


def option_name(field_name: str) -> str:
    """Field ``seq_len`` is written ``seq-len`` in pipelines."""
    return field_name.replace("_", "-")


def field_name(option: str) -> str:
    return option.replace("-", "_")
