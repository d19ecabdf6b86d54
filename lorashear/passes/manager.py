"""The pass manager: runs a pipeline over a module, verifying between passes.

After each pass that changed the module it invalidates the analyses the pass did not
preserve and (by default) runs the verifier, so a broken invariant is blamed on the pass
that broke it. Errors name the failing pass and the passes that ran before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from lorashear.analysis.manager import AnalysisManager
from lorashear.errors import LorashearError, PassError
from lorashear.ir.core import Module
from lorashear.ir.printer import print_module
from lorashear.ir.verifier import verify
from lorashear.passes.base import ModulePass, PassResult
from lorashear.passes.pipeline import format_pass, format_pipeline, parse_pipeline

if TYPE_CHECKING:
    from lorashear.passes.resume import PipelineCheckpoint


@dataclass
class PassRecord:
    """What one pass did in a run: for --time-passes and the report."""

    pipeline_text: str
    seconds: float
    modified: bool
    statistics: dict[str, Any] = field(default_factory=dict)


class PassManager:
    """An ordered list of configured passes."""

    def __init__(self, passes: list[ModulePass]) -> None:
        self.passes = list(passes)
        self.records: list[PassRecord] = []

    @classmethod
    def parse(cls, text: str) -> PassManager:
        """Build a manager from pipeline text (``"discover,prune{ratio=0.2},compress"``)."""
        return cls(parse_pipeline(text))

    def __str__(self) -> str:
        return format_pipeline(self.passes)

    def run(self, module: Module, *, verify_each: bool = True,
            print_ir_after_all: Callable[[str, str], None] | None = None,
            analyses: AnalysisManager | None = None,
            checkpoint: PipelineCheckpoint | None = None) -> Module:
        """Run every pass over ``module`` in place and return it.

        ``print_ir_after_all(pass_text, ir_text)`` is called after each pass. With
        ``checkpoint`` the module is saved there after every pass, training passes checkpoint
        there too, and a resumed run starts from the last saved module: the module returned
        is then that one (not ``module``), carried through the remaining passes.
        """
        self.records = []
        done: list[str] = []
        first = 0
        resumed = checkpoint.start(self.passes) if checkpoint is not None else None
        if resumed is not None:
            module, analyses, first = resumed.module, None, resumed.completed
            self.records = [PassRecord(**r) for r in resumed.records]
            done = [format_pass(p) for p in self.passes[:first]]
        analyses = analyses or AnalysisManager(module)
        for index, p in enumerate(self.passes[first:], first):
            text = format_pass(p)
            self._check_requirements(p, module, done)
            running = checkpoint.configure(index, p) if checkpoint is not None else p
            start = time.perf_counter()
            try:
                result = running.run(module, analyses)
            except LorashearError as exc:
                raise PassError(f"pass {text!r} failed{self._after(done)}: {exc.message}",
                                hint=exc.hint) from exc
            except Exception as exc:
                raise PassError(f"pass {text!r} crashed{self._after(done)}: "
                                f"{type(exc).__name__}: {exc}") from exc
            if not isinstance(result, PassResult):
                raise PassError(f"pass {text!r} returned {type(result).__name__}, not a PassResult")
            seconds = time.perf_counter() - start
            if result.modified:
                analyses.invalidate(result.preserved)
                if verify_each:
                    try:
                        verify(module)
                    except LorashearError as exc:
                        raise PassError(f"the IR is invalid after pass {text!r}"
                                        f"{self._after(done)}: {exc.message}") from exc
            self.records.append(PassRecord(text, seconds, result.modified, dict(result.statistics)))
            done.append(text)
            if checkpoint is not None:
                checkpoint.pass_done(index, p, module, [asdict(r) for r in self.records])
            if print_ir_after_all is not None:
                print_ir_after_all(text, print_module(module))
        return module

    @staticmethod
    def _after(done: list[str]) -> str:
        return f" (after {', '.join(done)})" if done else " (first pass)"

    def _check_requirements(self, p: ModulePass, module: Module, done: list[str]) -> None:
        for attr, maker in p.requires_attributes.items():
            if attr not in module.attributes:
                raise PassError(f"pass {p.name!r} needs the module attribute {attr!r}, which no "
                                f"earlier pass made{self._after(done)}",
                                hint=f"run {maker!r} before {p.name!r}")

    def timing_report(self) -> str:
        """A --time-passes table: seconds per pass and their share of the total."""
        total = sum(r.seconds for r in self.records) or 1e-12
        lines = ["===-- pass execution timing report --===",
                 f"  total {total:.3f} s", "   seconds   share  pass"]
        for r in self.records:
            lines.append(f"  {r.seconds:8.3f}  {100 * r.seconds / total:5.1f}%  {r.pipeline_text}")
        return "\n".join(lines)
