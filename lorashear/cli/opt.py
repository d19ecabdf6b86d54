"""`lorashear-opt IN.ir --passes=PIPELINE -o OUT.ir`: run a pass pipeline over a module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lorashear.cli._common import add_common_options, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorashear-opt",
        description="Run a pipeline of lorashear passes over an IR module, e.g. "
        "--passes='discover,lhspg{ratio=0.2},recover,compress'.")
    parser.add_argument("input", metavar="IN.ir", nargs="?", help="IR file to transform")
    parser.add_argument("--passes", metavar="PIPELINE", help="comma-separated passes with {key=value} options")
    parser.add_argument("-o", "--output", metavar="OUT.ir", help="IR file to write (written only on success; - prints the IR text to stdout)")
    parser.add_argument("--list-passes", action="store_true", help="list every pass with its options and exit")
    parser.add_argument("--load-pass-plugin", action="append", default=[], metavar="FILE",
                        help="load passes from a Python file (repeatable)")
    verify = parser.add_mutually_exclusive_group()
    verify.add_argument("--verify-each", dest="verify_each", action="store_true", default=True,
                        help="verify the IR after every pass that changed it (default)")
    verify.add_argument("--no-verify-each", dest="verify_each", action="store_false",
                        help="do not verify between passes")
    parser.add_argument("--print-ir-after-all", action="store_true",
                        help="print the IR to stderr after every pass")
    parser.add_argument("--time-passes", action="store_true", help="print a timing report to stderr")
    parser.add_argument("--print-groups", action="store_true",
                        help="after the pipeline, print the removable groups by kind and layer")
    parser.add_argument("--report", metavar="PATH",
                        help="after success, write a pruning report: HTML (PATH ends in .html, "
                        "inline SVG plots) or Markdown (.md)")
    parser.add_argument("--print-pipeline", action="store_true",
                        help="print the canonical pipeline text to stderr before running")
    parser.add_argument("--checkpoint-dir", metavar="DIR",
                        help="save the module after every pass (and training passes' checkpoints) "
                        "in DIR, so a killed run can continue with --resume; DIR must be empty")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run whose --checkpoint-dir DIR is given, from its last "
                        "completed pass (and the next pass's own checkpoint): same result as an "
                        "uninterrupted run")
    parser.add_argument("--accept-changed-weights", action="store_true",
                        help="run even if a weights file the IR reads was rewritten since the IR "
                        "was written (its fingerprint differs): the new weights are used, and an "
                        "IR written from this run records them")
    add_common_options(parser)
    return parser


def _type_name(tp) -> str:
    """Option types as a user reads them: ``float``, ``list of str``, ``one of a|b``."""
    import types
    import typing

    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + "|".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        names = " or ".join(_type_name(a) for a in inner)
        return f"{names} or none" if len(inner) < len(typing.get_args(tp)) else names
    if origin is tuple:
        return "list of " + _type_name(typing.get_args(tp)[0])
    return getattr(tp, "__name__", str(tp))


def list_passes() -> str:
    """Every pass: name, one-line doc, and each option with its type and default."""
    from lorashear.passes.base import option_name
    from lorashear.passes.pipeline import format_value
    from lorashear.passes.registry import available_passes, get_pass

    lines = []
    for name in available_passes():
        cls = get_pass(name)
        lines.append(f"{name}: {cls.summary()}")
        types = cls.option_types()
        for f in cls.option_fields():
            tp = _type_name(types[f.name])
            doc = f.metadata.get("doc", "")
            lines.append(f"    {option_name(f.name)}={format_value(f.default)}  ({tp}) {doc}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from lorashear.errors import PassError
    from lorashear.ir.fileformat import load_ir, save_ir
    from lorashear.passes.manager import PassManager
    from lorashear.passes.registry import load_pass_plugin

    for plugin in args.load_pass_plugin:
        load_pass_plugin(plugin)
    if args.list_passes:
        print(list_passes())
        return 0
    if not args.input:
        raise PassError("no input IR file given", hint="lorashear-opt IN.ir --passes=... -o OUT.ir")
    if not args.passes:
        raise PassError("no pipeline given", hint="--passes=discover,prune{ratio=0.2},compress")
    if args.resume and not args.checkpoint_dir:
        raise PassError("--resume needs the --checkpoint-dir of the run to continue")
    manager = PassManager.parse(args.passes)  # parse before loading: bad pipelines fail fast
    if args.print_pipeline:
        print(f"pipeline: {manager}", file=sys.stderr)
    if args.report:
        from lorashear.report import check_report_path

        check_report_path(args.report)  # a bad name fails before the run, not after it
    module = load_ir(args.input, accept_changed_weights=args.accept_changed_weights)
    checkpoint = None
    if args.checkpoint_dir:
        from lorashear.passes.resume import PipelineCheckpoint, input_fingerprint

        checkpoint = PipelineCheckpoint(
            args.checkpoint_dir, input_key=input_fingerprint(args.input),
            input_name=str(Path(args.input).resolve()), resume=args.resume,
            notify=lambda line: print(f"lorashear-opt: {line}", file=sys.stderr))

    def show(pass_text: str, ir_text: str) -> None:
        print(f"// ----- IR after {pass_text} ----- //\n{ir_text}", file=sys.stderr)

    after_pass = show if args.print_ir_after_all else None
    if args.report:
        from lorashear.ir.core import clone_module
        from lorashear.report import AttributeTracker, step_log_positions

        before = clone_module(module)  # shares tensor storage: cheap, and passes replace params
        tracker = AttributeTracker(module)
        log_positions = step_log_positions(manager.passes)

        def after_pass(pass_text: str, ir_text: str) -> None:
            tracker.after_pass(pass_text, ir_text)
            if args.print_ir_after_all:
                show(pass_text, ir_text)

    module = manager.run(module, verify_each=args.verify_each, print_ir_after_all=after_pass,
                         checkpoint=checkpoint)
    from lorashear.training.runtime import is_main_process

    if not is_main_process():
        return 0  # a data-parallel rank other than 0: rank 0 holds the same result and writes it
    if args.print_groups:
        from lorashear.passes.discover import summarize_groups

        groups = module.attributes.get("groups")
        if groups is None:
            raise PassError("--print-groups: the module has no groups", hint="run discover in the pipeline")
        print(summarize_groups(module, groups))
    if args.output == "-":
        from lorashear.ir.printer import print_module

        sys.stdout.write(print_module(module))
    elif args.output:
        save_ir(module, args.output)
    if checkpoint is not None:
        checkpoint.close()
    if args.report:
        from lorashear.report import build_report, read_step_log, write_report

        write_report(build_report(before, module, manager.records, step_log=read_step_log(log_positions),
                                  seen_attributes=tracker.last_seen), args.report)
    if args.time_passes:
        print(manager.timing_report(), file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("lorashear-opt", build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
