"""The pruning report: `lorashear-opt --report` end to end on the tiny Llama, and the report's
sections, plots and helpers on hand-made attributes (no training: kept small and fast)."""

from __future__ import annotations

import json
import re

import pytest

from lorashear.analysis.groups import PruneMaskAttr
from lorashear.analysis.knowledge import KnowledgeAttr
from lorashear.analysis.manager import AnalysisManager
from lorashear.cli import opt as opt_cli
from lorashear.ir.core import clone_module
from lorashear.ir.fileformat import load_ir, save_ir
from lorashear.passes.discover import Discover
from lorashear.passes.lhspg import LhspgLogAttr
from lorashear.passes.pipeline import parse_pipeline
from lorashear.report import (
    AttributeTracker,
    build_report,
    read_step_log,
    render_html,
    render_markdown,
    step_log_positions,
)
from tests.conftest import tiny_config

PIPELINE = "discover,saliency,prune{ratio=0.3},compress"


@pytest.fixture(scope="module")
def llama_ir(lowered, tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "llama.ir"
    save_ir(lowered("llama", True), path)
    return path


@pytest.fixture(scope="module")
def opt_reports(llama_ir, tmp_path_factory):
    """Run the pipeline once per format; returns (html text, markdown text, output module)."""
    root = tmp_path_factory.mktemp("report-out")
    texts = {}
    for suffix in ("html", "md"):
        report = root / f"report.{suffix}"
        code = opt_cli.main([str(llama_ir), f"--passes={PIPELINE}", "-o", str(root / "out.ir"),
                             "--report", str(report)])
        assert code == 0
        texts[suffix] = report.read_text()
    return texts["html"], texts["md"], load_ir(root / "out.ir")


def kept_from_module(module) -> dict[int, tuple[int, int]]:
    """(KV heads, MLP channels) per layer, read off the compressed weights' shapes."""
    cfg = tiny_config("llama")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return {layer: (module.params[f"model.layers.{layer}.self_attn.k_proj.weight"].type.shape[0] // head_dim,
                    module.params[f"model.layers.{layer}.mlp.up_proj.weight"].type.shape[0])
            for layer in range(cfg.num_hidden_layers)}


def test_html_report_has_sections_plots_and_the_kept_counts(opt_reports, llama_ir):
    html, _, after = opt_reports
    for title in ("Pipeline", "Parameters", "Kept groups per layer", "Saliency scores"):
        assert f"<h2>{title}</h2>" in html
    for absent in ("LHSPG training", "Knowledge distribution"):  # no data, no section
        assert absent not in html
    # 2 kept-vs-removed bar charts (attn, mlp) + 3 saliency histograms (hidden, attn, mlp)
    assert html.count("<svg") == 5
    assert "KV heads per layer: kept vs removed" in html and ">layer</text>" in html
    assert "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    cfg = tiny_config("llama")
    kept = kept_from_module(after)
    assert any(kv < cfg.num_key_value_heads or mlp < cfg.intermediate_size for kv, mlp in kept.values())
    for layer, (kv, mlp) in kept.items():
        assert (f"<tr><td>{layer}</td><td>{kv} / {cfg.num_key_value_heads}</td>"
                f"<td>{mlp} / {cfg.intermediate_size}</td></tr>") in html
    before_count = load_ir(llama_ir).num_parameters()
    assert (f"<td>all parameters</td><td>{before_count}</td><td>{after.num_parameters()}</td>"
            f"<td>{before_count - after.num_parameters()}</td>") in html


def test_markdown_report_has_the_same_tables(opt_reports):
    _, md, after = opt_reports
    assert "| pass | seconds | share | changed | statistics |" in md
    assert re.search(r"^\| prune\{ratio=0\.3\} \| [0-9.]+ \| [0-9.]+% \| yes \| .*parameters removed", md, re.M)
    assert "| layer | KV heads kept | MLP channels kept |" in md
    cfg = tiny_config("llama")
    for layer, (kv, mlp) in kept_from_module(after).items():
        assert f"| {layer} | {kv} / {cfg.num_key_value_heads} | {mlp} / {cfg.intermediate_size} |" in md
        assert f"- {layer}: kept {kv}, removed {cfg.num_key_value_heads - kv}" in md
    assert "<svg" not in md and "**magnitude saliency of MLP channels** (score vs count)" in md


def test_bad_report_name_fails_before_the_run(llama_ir, tmp_path, capsys):
    out = tmp_path / "out.ir"
    code = opt_cli.main([str(llama_ir), f"--passes={PIPELINE}", "-o", str(out),
                         "--report", str(tmp_path / "report.pdf")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "report format" in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "report.pdf").exists()


def test_lhspg_and_knowledge_sections_from_attributes(lowered):
    module = lowered("llama", True)
    scratch = clone_module(module)  # discover on a copy: the session's lowered module stays as is
    Discover().run(scratch, AnalysisManager(scratch))
    groups = scratch.attributes["groups"]
    per_layer = [f for f in groups.families if f.layer is not None]
    attrs = {
        "groups": groups,
        "prune-mask": PruneMaskAttr.from_dict({per_layer[1].id: [0, 1, 2]}),
        "knowledge": KnowledgeAttr(4.0, tuple((f.id, 0.1 * i) for i, f in enumerate(per_layer)),
                                   (per_layer[-1].id,), 0.2),
        "lhspg-log": LhspgLogAttr(({"period": 0, "chosen": 3, "new": 3, "mean_loss": 4.5, "last_loss": 4.2},
                                   {"period": 1, "chosen": 5, "new": 2, "mean_loss": 4.1, "last_loss": 4.0})),
    }
    steps = [{"period": 0, "step": s, "loss": 5.0 - 0.1 * s, "chosen": 3, "chosen_zero_share": s / 4}
             for s in range(1, 5)]
    report = build_report(module, module, [], step_log=steps, seen_attributes=attrs)
    assert [s.title for s in report.sections] == ["Parameters", "Kept groups per layer",
                                                   "LHSPG training", "Knowledge distribution"]
    html = render_html(report)
    lhspg_html = html.split("<h2>LHSPG training</h2>")[1].split("</section>")[0]
    assert lhspg_html.count("<svg") == 3  # per period, loss per step, zero share per step
    assert "Share of chosen groups at zero per step" in lhspg_html and ">chosen zero share</text>" in lhspg_html
    md = render_markdown(report)
    assert "| 0 | 3 | 3 | 4.5 | 4.2 |" in md
    assert "- loss: 4 points, first 4.9 (at 1), last 4.6 (at 4), min 4.6 (at 4)" in md
    assert f"| {per_layer[-1].id} | L{per_layer[-1].layer} {per_layer[-1].kind} | " in md
    assert "base loss 4; 1 families protected; the others' shares graded by spread 0.2" in md
    # the least sensitive family of its kind (increase 0) gives 1.2 times its kind's share
    assert f"| {per_layer[0].id} | L{per_layer[0].layer} {per_layer[0].kind} | 0 | no | 1.2 |" in md
    assert f"{per_layer[1].size - 3} / {per_layer[1].size}" in md


def test_recovery_section_plots_probe_perplexity_and_weights(lowered):
    from lorashear.passes.recover import RecoverLogAttr

    module = lowered("llama", True)
    probes = tuple({"step": step, "stage": 1 if step < 8 else 2,
                    "ppl": {"books": 30.0 - step, "code": 12.0 - step / 2},
                    "reference_ppl": {"books": 20.0, "code": 10.0},
                    "weights": {"books": 0.5 + step / 40, "code": 0.5 - step / 40}}
                   for step in (0, 4, 8))
    report = build_report(module, module, [], seen_attributes={"recover-log": RecoverLogAttr(probes)})
    assert [s.title for s in report.sections] == ["Parameters", "Knowledge recovery"]
    html = render_html(report).split("<h2>Knowledge recovery</h2>")[1]
    assert html.count("<svg") == 2
    assert "Recovery: sampling weight per source" in html
    md = render_markdown(report)
    assert "3 probes; first probe in stage 2 at step 8" in md
    assert "| books | 20 | 30 | 22 | 0.7 |" in md
    assert "| code | 10 | 12 | 8 | 0.3 |" in md


def test_only_sections_with_data(lowered):
    module = lowered("llama", True)
    report = build_report(module, module, [], step_log=None, seen_attributes={})
    assert [s.title for s in report.sections] == ["Parameters"]
    assert "<svg" not in render_html(report)


def test_step_log_reads_only_this_runs_lines(tmp_path):
    log = tmp_path / "steps.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    passes = parse_pipeline(f"discover,lhspg{{data=x.ids,log={log}}}")
    positions = step_log_positions(passes)
    assert positions == {str(log): log.stat().st_size}
    with open(log, "a") as handle:
        handle.write(json.dumps({"step": 1, "loss": 3.0}) + "\nnot json\n")
    assert read_step_log(positions) == [{"step": 1, "loss": 3.0}]


def test_tracker_keeps_groups_after_compress_and_drops_stale_masks():
    class FakeModule:
        attributes: dict

    module = FakeModule()
    module.attributes = {"groups": "g1", "prune-mask": "m1"}
    tracker = AttributeTracker(module)
    module.attributes = {"config": "c"}  # compress popped groups and the mask
    tracker.observe()
    assert tracker.last_seen["groups"] == "g1" and tracker.last_seen["prune-mask"] == "m1"
    module.attributes = {"groups": "g2"}  # a new discover: the old mask no longer fits
    tracker.observe()
    assert tracker.last_seen["groups"] == "g2" and "prune-mask" not in tracker.last_seen
