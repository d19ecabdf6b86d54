"""Passes over the IR, their registry, the pipeline language and the pass manager."""

from lorashear.analysis.manager import Analysis, AnalysisManager
from lorashear.passes.base import ModulePass, PassResult, option
from lorashear.passes.manager import PassManager
from lorashear.passes.pipeline import format_pipeline, parse_pipeline
from lorashear.passes.registry import available_passes, get_pass, load_pass_plugin, register_pass

__all__ = [
    "Analysis", "AnalysisManager", "ModulePass", "PassManager", "PassResult", "available_passes",
    "format_pipeline", "get_pass", "load_pass_plugin", "option", "parse_pipeline", "register_pass",
]
