"""A pruning report of one ``lorashear-opt`` run, as a self-contained HTML page or Markdown.

:func:`build_report` turns what a run left behind (the module before and after, the pass
manager's records, the attributes seen along the way, the LHSPG step log, the recovery
probes) into a
:class:`Report`: sections of tables and plots, each present only when its data is. The same
report renders as HTML with inline SVG plots (:mod:`lorashear.report.plots`) or as Markdown
with the plots summarised in words. ``compress`` removes the ``groups`` and ``prune-mask``
attributes it consumes, so the CLI keeps the last-seen ones with an :class:`AttributeTracker`.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from lorashear._atomic import atomic_path
from lorashear.analysis.groups import GroupsAttr, PruneMaskAttr
from lorashear.analysis.knowledge import KnowledgeAttr
from lorashear.analysis.scores import SaliencyAttr
from lorashear.errors import LorashearError
from lorashear.ir.core import Module
from lorashear.passes.lhspg import LhspgLogAttr
from lorashear.passes.manager import PassRecord
from lorashear.passes.recover import RecoverLogAttr
from lorashear.report.plots import (
    BarChart,
    Histogram,
    LineChart,
    Plot,
    format_number,
    render_svg,
    summarize,
)
from lorashear.runtime.executor import lora_param_names

REPORT_SUFFIXES = (".html", ".md")
#: attributes that index into the current ``groups``: stale once a new ``discover`` ran
GROUP_BOUND_ATTRIBUTES = ("prune-mask", "saliency", "knowledge")
KIND_UNITS = {"attn": "KV heads", "mlp": "MLP channels", "hidden": "hidden channels", "other": "units"}


@dataclass
class Table:
    """A table with a header row; cells are already formatted text."""

    headers: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    """One titled part of the report: notes, tables and plots, in order."""

    title: str
    items: list[str | Table | Plot] = field(default_factory=list)


@dataclass
class Report:
    """The whole report: a title and its sections."""

    title: str
    sections: list[Section]

    def section(self, title: str) -> Section | None:
        return next((s for s in self.sections if s.title == title), None)


class AttributeTracker:
    """Remembers the last value of every module attribute seen after each pass.

    ``compress`` pops ``groups`` and ``prune-mask``; the report still needs them to show
    what was kept. Use :meth:`after_pass` as the pass manager's ``print_ir_after_all``
    callback. When a later ``discover`` makes new groups, the attributes indexing into the
    old ones are dropped unless the module carries fresh ones.
    """

    def __init__(self, module: Module) -> None:
        self.module = module
        self.last_seen: dict[str, Any] = dict(module.attributes)

    def observe(self) -> None:
        current = self.module.attributes
        if "groups" in current and current["groups"] is not self.last_seen.get("groups"):
            for kind in GROUP_BOUND_ATTRIBUTES:
                if kind not in current:
                    self.last_seen.pop(kind, None)
        self.last_seen.update(current)

    def after_pass(self, pass_text: str, ir_text: str) -> None:
        self.observe()


def step_log_positions(passes: Iterable[Any]) -> dict[str, int]:
    """The JSON-lines step logs the pipeline's ``lhspg`` passes append to, with their current
    sizes: reading from there after the run yields this run's steps only."""
    positions = {}
    for p in passes:
        path = getattr(p, "log", "") if getattr(p, "name", "") == "lhspg" else ""
        if path and path not in positions:
            file = Path(path).expanduser()
            positions[path] = file.stat().st_size if file.is_file() else 0
    return positions


def read_step_log(positions: Mapping[str, int]) -> list[dict]:
    """The step rows appended to each log since ``positions`` (malformed lines skipped)."""
    rows = []
    for path, offset in positions.items():
        file = Path(path).expanduser()
        if not file.is_file():
            continue
        with open(file, encoding="utf-8") as handle:
            handle.seek(offset)
            for line in handle:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "step" in row:
                    rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format_number(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value)


def _pipeline_section(records: list[PassRecord]) -> Section:
    total = sum(r.seconds for r in records) or 1e-12
    rows = [[r.pipeline_text, f"{r.seconds:.3f}", f"{100 * r.seconds / total:.1f}%", _cell(r.modified),
             "; ".join(f"{k}: {_cell(v)}" for k, v in r.statistics.items())] for r in records]
    return Section("Pipeline", [f"`{','.join(r.pipeline_text for r in records)}`, "
                                f"{total:.3f} s in all",
                                Table(["pass", "seconds", "share", "changed", "statistics"], rows)])


def _parameter_section(before: Module, after: Module) -> Section:
    rows = []
    for label, count in (("all parameters", lambda m: m.num_parameters()),
                         ("LoRA factors", lambda m: sum(m.params[n].type.numel() for n in lora_param_names(m)))):
        old, new = count(before), count(after)
        share = f"{100 * (old - new) / old:.1f}%" if old else "-"
        rows.append([label, str(old), str(new), str(old - new), share])
    return Section("Parameters", [Table(["parameters", "before", "after", "removed", "share removed"], rows)])


def kept_per_layer(groups: GroupsAttr, mask: PruneMaskAttr | None) -> dict[str, dict[int, tuple[int, int]]]:
    """``{kind: {layer: (kept, total)}}`` for the per-layer families (attn, mlp)."""
    removed = mask.as_dict() if mask is not None else {}
    kept: dict[str, dict[int, tuple[int, int]]] = {}
    for f in groups.families:
        if f.layer is None:
            continue
        old_kept, old_total = kept.setdefault(f.kind, {}).get(f.layer, (0, 0))
        kept[f.kind][f.layer] = (old_kept + f.size - len(removed.get(f.id, ())), old_total + f.size)
    return kept


def _kept_section(groups: GroupsAttr, mask: PruneMaskAttr | None, protected: set[int]) -> Section:
    kept = kept_per_layer(groups, mask)
    kinds = [k for k in ("attn", "mlp", "other") if k in kept]
    layers = sorted({layer for k in kinds for layer in kept[k]})
    headers = ["layer", *(f"{KIND_UNITS[k]} kept" for k in kinds)] + (["protected"] if protected else [])
    rows = []
    for layer in layers:
        row = [str(layer)] + [f"{kept[k][layer][0]} / {kept[k][layer][1]}" if layer in kept[k] else "-"
                              for k in kinds]
        if protected:
            row.append(", ".join(groups.families[f].kind for f in sorted(protected)
                                 if groups.families[f].layer == layer) or "")
        rows.append(row)
    items: list[str | Table | Plot] = [Table(headers, rows)]
    removed = mask.as_dict() if mask is not None else {}
    for f in groups.families:
        if f.layer is None:
            items.append(f"{KIND_UNITS[f.kind]} (all layers): {f.size - len(removed.get(f.id, ()))} / "
                         f"{f.size} kept")
    for k in kinds:
        layer_list = sorted(kept[k])
        items.append(BarChart(f"{KIND_UNITS[k]} per layer: kept vs removed", "layer", KIND_UNITS[k],
                              [str(layer) for layer in layer_list],
                              [("kept", [kept[k][layer][0] for layer in layer_list]),
                               ("removed", [kept[k][layer][1] - kept[k][layer][0] for layer in layer_list])]))
    if mask is None:
        items.insert(0, "No pass chose units to remove: everything is kept.")
    return Section("Kept groups per layer", items)


def _saliency_section(groups: GroupsAttr | None, saliency: SaliencyAttr) -> Section:
    by_kind: dict[str, list[float]] = {}
    families_of: dict[str, int] = {}
    for family_id, scores in saliency.scores:
        kind = groups.families[family_id].kind if groups and family_id < len(groups.families) else "other"
        by_kind.setdefault(kind, []).extend(scores)
        families_of[kind] = families_of.get(kind, 0) + 1
    rows = [[kind, str(families_of[kind]), str(len(v)), format_number(min(v)),
             format_number(statistics.median(v)), format_number(max(v))] for kind, v in by_kind.items() if v]
    items: list[str | Table | Plot] = [f"metric: {saliency.metric}",
                                       Table(["kind", "families", "units", "min", "median", "max"], rows)]
    items += [Histogram(f"{saliency.metric} saliency of {KIND_UNITS[kind]}", "score", values)
              for kind, values in by_kind.items() if values]
    return Section("Saliency scores", items)


def _lhspg_section(log: LhspgLogAttr | None, step_log: list[dict]) -> Section:
    items: list[str | Table | Plot] = []
    periods = list(log.periods) if log is not None else []
    if periods:
        keys = [k for k in ("period", "chosen", "new", "mean_loss", "last_loss") if k in periods[0]]
        items.append(Table(keys, [[_cell(p.get(k, "")) for k in keys] for p in periods]))
        xs = [float(p.get("period", i)) + 1 for i, p in enumerate(periods)]
        items.append(LineChart("LHSPG loss per period", "period", "LM loss",
                               [(name, xs, [float(p[key]) for p in periods])
                                for name, key in (("mean loss", "mean_loss"), ("last loss", "last_loss"))
                                if all(key in p for p in periods)]))
    steps = [row for row in step_log if "loss" in row]
    if steps:
        xs = [float(row["step"]) for row in steps]
        items.append(LineChart("LHSPG loss per step", "step", "LM loss",
                               [("loss", xs, [float(row["loss"]) for row in steps])]))
        shares = [row for row in steps if "chosen_zero_share" in row]
        if shares:
            items.append(LineChart("Share of chosen groups at zero per step", "step", "chosen zero share",
                                   [("chosen zero share", [float(r["step"]) for r in shares],
                                     [float(r["chosen_zero_share"]) for r in shares])]))
    return Section("LHSPG training", items)


def _recover_section(log: RecoverLogAttr) -> Section:
    """Per-source probe perplexity against the unpruned reference, and the sampling weights
    that followed the degradation, at every probe of ``recover``."""
    probes = [p for p in log.probes if p.get("ppl")]
    sources = sorted({name for p in probes for name in p["ppl"]})
    xs = [float(p["step"]) for p in probes]
    rows = []
    for name in sources:
        reference = next((p["reference_ppl"][name] for p in probes
                          if name in p.get("reference_ppl", {})), None)
        rows.append([name, format_number(reference) if reference is not None else "-",
                     format_number(probes[0]["ppl"][name]), format_number(probes[-1]["ppl"][name]),
                     format_number(probes[-1].get("weights", {}).get(name, float("nan")))])
    items: list[str | Table | Plot] = [
        f"{len(probes)} probes; first probe in stage 2 at step "
        f"{next((int(p['step']) for p in probes if p.get('stage') == 2), '-')}",
        Table(["source", "reference ppl", "first probe ppl", "last probe ppl", "last weight"], rows),
        LineChart("Recovery: probe perplexity per source", "step", "perplexity",
                  [(name, xs, [float(p["ppl"].get(name, float("nan"))) for p in probes])
                   for name in sources])]
    if any(p.get("weights") for p in probes):
        items.append(LineChart("Recovery: sampling weight per source", "step", "weight",
                               [(name, xs, [float(p.get("weights", {}).get(name, 0.0)) for p in probes])
                                for name in sources]))
    return Section("Knowledge recovery", items)


def _knowledge_section(groups: GroupsAttr | None, knowledge: KnowledgeAttr) -> Section:
    def label(family_id: int) -> str:
        if groups is None or family_id >= len(groups.families):
            return f"family {family_id}"
        f = groups.families[family_id]
        return f"L{f.layer} {f.kind}" if f.layer is not None else f.kind

    protected = set(knowledge.protected)
    rows = [[str(f), label(f), format_number(d), _cell(f in protected)] for f, d in knowledge.loss_increase]
    headers = ["family", "group", "loss increase", "protected"]
    summary = f"base loss {format_number(knowledge.base_loss)}; {len(protected)} families protected"
    if knowledge.spread and groups is not None:  # graded: each family's multiplier of its kind's share
        weights = knowledge.share_weights(groups.families)
        headers.append("share weight")
        for row, (f, _) in zip(rows, knowledge.loss_increase, strict=True):
            row.append(format_number(weights.get(f, 1.0)))
        summary += f"; the others' shares graded by spread {format_number(knowledge.spread)}"
    return Section("Knowledge distribution", [
        summary,
        Table(headers, rows),
        BarChart("Loss increase when each family is removed", "family", "loss increase",
                 [label(f) for f, _ in knowledge.loss_increase],
                 [("loss increase", [d for _, d in knowledge.loss_increase])])])


def build_report(before: Module, after: Module, records: list[PassRecord], *,
                 step_log: list[dict] | None = None,
                 seen_attributes: Mapping[str, Any] | None = None) -> Report:
    """The report of one run: ``before`` is a snapshot of the input module (``clone_module``),
    ``after`` the result, ``records`` the manager's. ``seen_attributes`` are the last-seen
    attributes of the run (:class:`AttributeTracker`); by default ``after``'s over ``before``'s."""
    attrs = dict(seen_attributes) if seen_attributes is not None else {**before.attributes, **after.attributes}
    groups = attrs.get("groups") if isinstance(attrs.get("groups"), GroupsAttr) else None
    mask = attrs.get("prune-mask") if isinstance(attrs.get("prune-mask"), PruneMaskAttr) else None
    saliency, knowledge = attrs.get("saliency"), attrs.get("knowledge")
    log = attrs.get("lhspg-log") if isinstance(attrs.get("lhspg-log"), LhspgLogAttr) else None
    sections = []
    if records:
        sections.append(_pipeline_section(records))
    sections.append(_parameter_section(before, after))
    if groups is not None:
        protected = set(knowledge.protected) if isinstance(knowledge, KnowledgeAttr) else set()
        sections.append(_kept_section(groups, mask, protected))
    if isinstance(saliency, SaliencyAttr) and saliency.scores:
        sections.append(_saliency_section(groups, saliency))
    if log is not None or step_log:
        section = _lhspg_section(log, step_log or [])
        if section.items:
            sections.append(section)
    recover_log = attrs.get("recover-log")
    if isinstance(recover_log, RecoverLogAttr) and any(p.get("ppl") for p in recover_log.probes):
        sections.append(_recover_section(recover_log))
    if isinstance(knowledge, KnowledgeAttr) and knowledge.loss_increase:
        sections.append(_knowledge_section(groups, knowledge))
    return Report("lorashear pruning report", sections)


HTML_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.8em 0}th,td{border:1px solid #bbb;padding:3px 8px;text-align:left}
th{background:#eef}svg{display:block;margin:0.8em 0;border:1px solid #eee}code{background:#f4f4f4}"""


def render_html(report: Report) -> str:
    """The report as one HTML page: tables, inline SVG plots, no external resources."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{escape(report.title)}</title><style>{HTML_STYLE}</style></head><body>",
             f"<h1>{escape(report.title)}</h1>"]
    for section in report.sections:
        parts.append(f"<section><h2>{escape(section.title)}</h2>")
        for item in section.items:
            if isinstance(item, str):
                text = escape(item)
                if text.startswith("`") and "`" in text[1:]:
                    end = text.index("`", 1)
                    text = f"<code>{text[1:end]}</code>{text[end + 1:]}"
                parts.append(f"<p>{text}</p>")
            elif isinstance(item, Table):
                head = "".join(f"<th>{escape(h)}</th>" for h in item.headers)
                body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
                               for row in item.rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            else:
                parts.append(render_svg(item))
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report) -> str:
    """The report as Markdown: the same tables, each plot summarised in words."""
    lines = [f"# {report.title}", ""]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for item in section.items:
            if isinstance(item, str):
                lines += [item, ""]
            elif isinstance(item, Table):
                lines.append("| " + " | ".join(_md_cell(h) for h in item.headers) + " |")
                lines.append("|" + "---|" * len(item.headers))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in item.rows]
                lines.append("")
            else:
                lines += [*summarize(item), ""]
    return "\n".join(lines)


def check_report_path(path: str | Path) -> None:
    """Fail before a long run when the report's format cannot be told from its name."""
    if Path(path).suffix.lower() not in REPORT_SUFFIXES:
        raise LorashearError(f"cannot tell the report format of {path}", hint="name it *.html or *.md")


def write_report(report: Report, path: str | Path) -> None:
    """Write the report atomically: HTML for ``*.html``, Markdown for ``*.md``."""
    check_report_path(path)
    text = render_html(report) if Path(path).suffix.lower() == ".html" else render_markdown(report)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
