"""LHSPG: exactly the chosen groups end at zero, the rest live, LoRA moves knowledge."""

from __future__ import annotations

import pytest
import torch

from lorashear.analysis.groups import param_units_numel
from lorashear.analysis.masking import zero_groups
from lorashear.errors import PassError
from lorashear.ir.core import clone_module
from lorashear.passes import PassManager
from lorashear.passes.compress import compress_module
from lorashear.runtime.executor import emit_torch, lora_param_names
from tests.conftest import build_tiny, markov_tokens, save_base_and_lower, train_all_weights


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama trained (all weights) on the Markov stream, saved with a LoRA adapter."""
    root = tmp_path_factory.mktemp("lhspg")
    tokens = markov_tokens(6000)
    (root / "train.ids").write_text(" ".join(map(str, tokens.tolist())))
    tm = build_tiny("llama", root, seed=3)
    base = tm.peft.get_base_model()
    windows = tokens[: 6000 // 32 * 32].view(-1, 32)
    with tm.peft.disable_adapter():
        train_all_weights(base, windows, 150, seed=0)
    module = save_base_and_lower(base, tm.model_dir, tm.adapter_dir)
    PassManager.parse("discover").run(module)
    return module, root / "train.ids", windows


def _loss(module, windows) -> float:
    with torch.no_grad():
        return emit_torch(module)(windows[:64], labels=windows[:64]).loss.item()


def _removed_share(module) -> tuple[float, float]:
    """(share of the attention + MLP parameters the prune-mask removes, largest unit's share)."""
    families = [f for f in module.attributes["groups"].families if f.kind in ("attn", "mlp")]
    removed = module.attributes["prune-mask"].as_dict()
    total = sum(param_units_numel(module, f) * f.size for f in families)
    taken = sum(param_units_numel(module, f) * len(removed.get(f.id, ())) for f in families)
    return taken / total, max(param_units_numel(module, f) for f in families) / total


def _lhspg(module, data, **opts):
    text = ",".join(f"{k}={v}" for k, v in {"ratio": 0.3, "periods": 2, "steps": 25, "seq-len": 32,
                                            "batch": 8, "lr": 5e-3, "data": data,
                                            "progress": "false", **opts}.items())
    result = clone_module(module)
    PassManager.parse(f"lhspg{{{text}}}").run(result)
    return result


@pytest.mark.parametrize(("settle", "rescore"), [(0.0, False), (0.4, True)])
def test_chosen_zero_rest_alive_and_compress_exact(trained, settle, rescore, tmp_path):
    module, data, windows = trained
    log = tmp_path / "steps.jsonl"
    # rescore scores the live model by its gradients: taylor (the default metric is wanda)
    after = _lhspg(module, data, settle=settle, rescore=str(rescore).lower(), log=log,
                   metric="taylor" if rescore else "wanda")
    groups = after.attributes["groups"]
    removed = after.attributes["prune-mask"].as_dict()
    families = [f for f in groups.families if f.kind in ("attn", "mlp")]
    share, unit = _removed_share(after)
    assert abs(share - 0.3) <= unit
    for f in families:
        for m in f.members:
            tensor = after.params[m.param].storage.load()
            length = tensor.shape[m.axis]
            units = m.unit_of(length, f.size)
            norms = torch.zeros(f.size).index_add_(
                0, units, tensor.movedim(m.axis, 0).reshape(length, -1).pow(2).sum(1))
            dead = torch.tensor([u in removed.get(f.id, ()) for u in range(f.size)])
            assert torch.all(norms[dead] == 0), f"{m.param}: chosen units not exactly zero"
            if "lora" not in m.param:
                assert torch.all(norms[~dead] > 0), f"{m.param}: a surviving unit is zero"
    changed = [n for n in lora_param_names(module)
               if not torch.equal(module.params[n].storage.load(), after.params[n].storage.load())]
    assert changed, "LoRA did not train"
    compressed = clone_module(after)
    compress_module(compressed, groups, removed)
    with torch.no_grad():
        a = emit_torch(after)(windows[:4]).logits
        b = emit_torch(compressed)(windows[:4]).logits
    assert (a - b).abs().max() <= 1e-4
    assert compressed.num_parameters() < module.num_parameters()
    assert [p["period"] for p in after.attributes["lhspg-log"].periods] == [0, 1]
    # a period's groups are all zero from its last shrink step on (settle: 10 of its 25 steps)
    import json

    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 50
    zero_from = 25 - round(settle * 25)
    for row in rows:
        in_period = (row["step"] - 1) % 25 + 1
        if in_period >= zero_from:
            assert row["chosen_zero_share"] == 1.0, row
        elif row["period"] == 0:
            assert row["chosen_zero_share"] < 1.0, row


def test_lhspg_beats_one_shot_pruning_of_the_same_groups(trained):
    module, data, windows = trained
    after = _lhspg(module, data, steps=40)
    removed = after.attributes["prune-mask"].as_dict()
    one_shot = clone_module(module)
    zero_groups(one_shot, module.attributes["groups"], removed)
    dense, pruned, recovered = _loss(module, windows), _loss(one_shot, windows), _loss(after, windows)
    assert recovered < pruned, (dense, pruned, recovered)


def test_attn_share_zero_prunes_only_mlp_to_the_full_ratio(trained):
    module, data, windows = trained
    after = _lhspg(module, data, periods=2, steps=4, **{"attn-share": 0})
    groups, removed = after.attributes["groups"], after.attributes["prune-mask"].as_dict()
    assert not any(removed.get(f.id) for f in groups.families if f.kind == "attn")
    families = [f for f in groups.families if f.kind in ("attn", "mlp")]
    prunable = sum(param_units_numel(module, f) * f.size for f in families)
    taken = sum(param_units_numel(module, f) * len(removed.get(f.id, ())) for f in families)
    mlp = [f for f in families if f.kind == "mlp"]
    assert abs(taken - 0.3 * prunable) <= len(mlp) * max(param_units_numel(module, f) for f in mlp) / 2
    compressed = clone_module(after)
    compress_module(compressed, groups, removed)
    assert compressed.num_parameters() < module.num_parameters()
    with torch.no_grad():
        masked = emit_torch(after)(windows[:4]).logits
        sliced = emit_torch(compressed)(windows[:4]).logits
    assert torch.allclose(masked, sliced, atol=1e-4)


def test_attn_share_auto_trains_with_the_split_it_measured_best(trained):
    """auto measures the splits of the whole ratio before training, then runs exactly as the
    fixed share it chose would: same masks, bitwise the same weights."""
    module, data, _ = trained
    text = f"lhspg{{ratio=0.3,periods=2,steps=4,seq-len=32,batch=8,lr=5e-3,data={data},progress=false"
    auto = clone_module(module)
    manager = PassManager.parse(text + ",attn-share=auto}")
    manager.run(auto)
    stats = manager.records[-1].statistics
    losses = stats["attn-share losses"]
    assert len(losses) >= 2 and stats["attn-share chosen"] == min(losses, key=losses.get)
    fixed = clone_module(module)
    PassManager.parse(text + f",attn-share={stats['attn-share chosen']}}}").run(fixed)
    assert auto.attributes["prune-mask"] == fixed.attributes["prune-mask"]
    for name, p in fixed.params.items():
        assert torch.equal(auto.params[name].storage.load(), p.storage.load()), name


def test_warmup_scales_the_first_step(trained):
    """AdamW's first step moves every LoRA element by about lr; warmup=10 makes that lr/10
    (ratio 0: no group is chosen, so the projection moves nothing)."""
    module, data, _ = trained
    moved = {}
    for warmup in (0, 10):
        after = _lhspg(module, data, ratio=0.0, periods=1, steps=1, warmup=warmup)
        moved[warmup] = max(float((after.params[n].storage.load() - module.params[n].storage.load())
                                  .abs().max()) for n in lora_param_names(module))
    assert moved[0] == pytest.approx(5e-3, rel=0.05)  # the lr of _lhspg
    assert moved[10] == pytest.approx(moved[0] / 10, rel=0.05)


def test_lhspg_errors(trained, lowered, tmp_path):
    module, data, _ = trained
    with pytest.raises(PassError, match="does not exist"):
        _lhspg(module, tmp_path / "missing.ids")
    with pytest.raises(PassError, match=r"ratio must be in \[0, 1\)"):
        _lhspg(module, data, ratio=1.5)
    with pytest.raises(PassError, match=r"settle must be in \[0, 1\)"):
        _lhspg(module, data, settle=1.0)
    with pytest.raises(PassError, match="periods, steps and batches must be at least 1"):
        _lhspg(module, data, batches=0)
    for bad in ("-0.1", "inf", "nan"):
        with pytest.raises(PassError, match="damp must be a finite number >= 0"):
            _lhspg(module, data, damp=bad)
    with pytest.raises(PassError, match="lhspg warmup must be >= 0"):
        _lhspg(module, data, warmup=-2)
    with pytest.raises(PassError, match="rescore needs metric=taylor"):
        _lhspg(module, data, rescore="true", metric="wanda")
    with pytest.raises(PassError, match="lhspg: seq-len 512 exceeds the model's maximum of 256 "
                       r"tokens \(max_position_embeddings\)"):
        _lhspg(module, data, **{"seq-len": 512})
    plain = clone_module(lowered("llama", False))
    PassManager.parse("discover").run(plain)
    with pytest.raises(PassError, match="has none"):
        _lhspg(plain, data)
    # training ids outside the embedding fail by name before any step, not inside the model
    outside = tmp_path / "outside.ids"
    outside.write_text(" ".join(["1"] * 200 + ["100000"]))
    with pytest.raises(PassError, match=r"outside\.ids: token ids must lie in \[0, \d+\), found 1\.\.100000"):
        _lhspg(module, outside)
    short = tmp_path / "short.ids"
    short.write_text(" ".join(["1"] * 40))
    with pytest.raises(PassError, match=r"short\.ids holds 1 windows of 32 tokens: fewer than one batch"):
        _lhspg(module, short)


def test_lhspg_reads_its_data_once(trained, monkeypatch):
    """Scoring, the split search and rescoring share the training windows: one read of the file."""
    from lorashear.data import calibration

    module, data, _ = trained
    reads = []
    real = calibration.read_token_ids
    monkeypatch.setattr(calibration, "read_token_ids", lambda path: reads.append(path) or real(path))
    _lhspg(module, data, ratio=0.3, periods=2, steps=2, metric="taylor", rescore="true",
           **{"attn-share": "auto"})
    assert reads == [data]


def test_knowledge_protects_the_most_sensitive_families(trained):
    from lorashear.analysis.knowledge import KnowledgeAttr

    module, data, _ = trained
    analyse = f"knowledge{{gamma=0.5,data={data},seq-len=32,batch=4,batches=2,progress=false}}"
    analysed = clone_module(module)
    PassManager.parse(analyse).run(analysed)
    knowledge = analysed.attributes["knowledge"]
    assert isinstance(knowledge, KnowledgeAttr)
    increase = dict(knowledge.loss_increase)
    assert len(increase) == 4 and len(knowledge.protected) == 2  # 2 layers x (attn, mlp)
    assert min(increase[f] for f in knowledge.protected) >= max(
        d for f, d in increase.items() if f not in knowledge.protected)
    assert max(increase.values()) > 0  # removing a whole layer's attention or MLP hurts
    # the protected families give no units, and the ratio still counts their parameters: the
    # others give that much more, so the model shrinks as much as without the analysis
    for text in ("prune{ratio=0.15,metric=magnitude}", f"lhspg{{ratio=0.15,periods=1,steps=4,seq-len=32,"
                                                        f"batch=8,data={data},progress=false}}"):
        pruned = clone_module(analysed)
        PassManager.parse(text).run(pruned)
        removed = pruned.attributes["prune-mask"].as_dict()
        assert removed and not set(removed) & set(knowledge.protected)
        share, unit = _removed_share(pruned)
        assert abs(share - 0.15) <= unit, text


def test_graded_knowledge_takes_more_from_the_less_sensitive_layer(trained):
    """``knowledge{spread=0.5}``: of the two MLP families the one whose removal hurt less gives
    three times the share of the other (1.5 vs 0.5), and the ratio still holds."""
    module, data, _ = trained
    analysed = clone_module(module)
    PassManager.parse(f"knowledge{{gamma=0,spread=0.5,data={data},seq-len=32,batch=4,batches=2,progress=false}}"
                      ).run(analysed)
    knowledge = analysed.attributes["knowledge"]
    groups = analysed.attributes["groups"]
    increase = dict(knowledge.loss_increase)
    mlp = sorted((f for f in groups.families if f.kind == "mlp"), key=lambda f: increase[f.id])
    assert len(mlp) == 2 and knowledge.share_weights(mlp) == {mlp[0].id: 1.5, mlp[1].id: 0.5}
    for text in ("prune{ratio=0.2,metric=magnitude,attn-share=0}",
                 f"lhspg{{ratio=0.2,periods=1,steps=4,seq-len=32,batch=8,attn-share=0,data={data},progress=false}}"):
        pruned = clone_module(analysed)
        PassManager.parse(text).run(pruned)
        removed = pruned.attributes["prune-mask"].as_dict()
        light, heavy = len(removed.get(mlp[0].id, ())), len(removed.get(mlp[1].id, ()))
        assert abs(light - 3 * heavy) <= 2 and heavy > 0, (text, light, heavy)
        share, unit = _removed_share(pruned)
        assert abs(share - 0.2) <= unit, text


def test_knowledge_protection_that_leaves_too_little_to_prune_is_an_error(trained):
    module, data, _ = trained
    analysed = clone_module(module)
    PassManager.parse(f"knowledge{{gamma=0.5,data={data},seq-len=32,batch=4,batches=2,progress=false}}"
                      ).run(analysed)
    for text in ("prune{ratio=0.45,metric=magnitude}",
                 f"lhspg{{ratio=0.45,periods=1,steps=4,seq-len=32,batch=8,data={data},progress=false}}"):
        with pytest.raises(PassError, match=r"ratio=0\.45 asks for .* the 2 families the knowledge analysis "
                                            r"protects .*lower ratio or knowledge's gamma"):
            PassManager.parse(text).run(clone_module(analysed))


def test_killed_run_resumes_to_the_same_result(trained, tmp_path):
    """SIGKILL a real lhspg process after its first checkpoint; resuming gives bitwise the
    weights and masks of an uninterrupted run (CPU, one thread)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from lorashear.ir.fileformat import save_ir

    module, data, _ = trained
    torch.set_num_threads(1)
    save_ir(clone_module(module), tmp_path / "m.ir")
    ckpt = tmp_path / "ckpt"
    steps_log = tmp_path / "steps.jsonl"
    # warmup spans two periods: the learning rate is a function of the step, so it resumes too
    # attn-share=auto: the split measured before training is part of the checkpoint
    pipeline = (f"lhspg{{ratio=0.3,periods=3,steps=12,seq-len=32,batch=8,lr=5e-3,data={data},warmup=20,"
                "attn-share=auto,"
                f"progress=false,log={steps_log},checkpoint-dir={ckpt}}}")
    script = ("import torch; torch.set_num_threads(1)\n"
              "from lorashear.ir.fileformat import load_ir\nfrom lorashear.passes import PassManager\n"
              f"m = load_ir(r'{tmp_path / 'm.ir'}')\nPassManager.parse(r'{pipeline}').run(m)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (ckpt / "state.json").exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert (ckpt / "state.json").exists(), child.stderr.read().decode()[-2000:]
    import json

    assert json.loads((ckpt / "state.json").read_text())["state"]["period"] < 2, "killed too late"

    resumed = clone_module(module)
    PassManager.parse(pipeline).run(resumed)
    # each step once: the resumed run neither started over nor left the killed run's extra steps
    assert [json.loads(line)["step"] for line in steps_log.read_text().splitlines()] == list(range(1, 37))
    straight = clone_module(module)
    PassManager.parse(pipeline.replace(f",log={steps_log},checkpoint-dir={ckpt}", "")).run(straight)
    assert resumed.attributes["prune-mask"] == straight.attributes["prune-mask"]
    for name, p in straight.params.items():
        assert torch.equal(resumed.params[name].storage.load(), p.storage.load()), name


def test_checkpoint_from_before_attn_share_auto_resumes_with_the_proportional_split(trained, tmp_path,
                                                                                 monkeypatch):
    """A checkpoint written when the default split was proportional (no "split" in its state)
    resumes under today's default, auto, with the proportional split it was trained with: the
    result is bitwise a straight proportional run's."""
    import json
    from dataclasses import replace

    from lorashear.passes.pipeline import format_pass
    from lorashear.training import harness

    module, data, _ = trained
    ckpt = tmp_path / "ckpt"
    # at 0.2 auto measures share 0.5 best on this model, so the two splits differ
    common = f"ratio=0.2,periods=2,steps=4,seq-len=32,batch=8,lr=5e-3,data={data},progress=false"
    proportional = f"lhspg{{{common},attn-share=proportional}}"

    class Stop(Exception):
        pass

    real = harness.save_checkpoint

    def save_then_stop(directory, checkpoint):
        real(directory, checkpoint)
        raise Stop

    monkeypatch.setattr(harness, "save_checkpoint", save_then_stop)
    with pytest.raises(PassError, match="crashed.*Stop"):  # the manager names the exception
        PassManager.parse(proportional.replace("}", f",checkpoint-dir={ckpt}}}")).run(clone_module(module))
    monkeypatch.setattr(harness, "save_checkpoint", real)
    # forge the old checkpoint: the default options' owner, no split in the state
    default_pass = PassManager.parse(f"lhspg{{{common}}}").passes[0]
    state = json.loads((ckpt / "state.json").read_text())
    state["owner"] = format_pass(replace(default_pass, progress=True))
    del state["state"]["split"], state["state"]["attn_share"]
    assert state["state"]["period"] == 0
    (ckpt / "state.json").write_text(json.dumps(state))
    resumed = clone_module(module)
    PassManager.parse(f"lhspg{{{common},checkpoint-dir={ckpt}}}").run(resumed)
    straight = clone_module(module)
    PassManager.parse(proportional).run(straight)
    assert resumed.attributes["prune-mask"] == straight.attributes["prune-mask"]
    for name, p in straight.params.items():
        assert torch.equal(resumed.params[name].storage.load(), p.storage.load()), name


def test_trim_log_after_drops_only_the_killed_runs_tail(tmp_path):
    import json

    from lorashear.training.checkpoint import trim_log_after

    log = tmp_path / "steps.jsonl"
    earlier = [json.dumps({"step": s}) + "\n" for s in (1, 2, 3)]  # another run, same file
    killed = [json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4, 5)]
    log.write_text("".join(earlier + killed) + '{"step": 6, "lo')  # torn by the kill
    trim_log_after(log, 3)
    assert log.read_text() == "".join(earlier + killed[:3])
    trim_log_after(log, 3)  # nothing past step 3 left: unchanged
    assert log.read_text() == "".join(earlier + killed[:3])
    trim_log_after(tmp_path / "absent.jsonl", 0)  # no log yet: nothing to do


def test_metric_obs_chooses_the_groups_and_compress_stays_exact(trained):
    """lhspg takes the reconstruction-aware metric as prune does (scores from its own
    calibration windows): the ratio is reached and masked == compressed."""
    module, data, windows = trained
    after = _lhspg(module, data, periods=2, steps=4, metric="obs", **{"attn-share": 0})
    groups, removed = after.attributes["groups"], after.attributes["prune-mask"].as_dict()
    share, unit = _removed_share(after)
    assert abs(share - 0.3) <= unit
    compressed = clone_module(after)
    compress_module(compressed, groups, removed)
    with torch.no_grad():
        masked = emit_torch(after)(windows[:4]).logits
        sliced = emit_torch(compressed)(windows[:4]).logits
    assert torch.allclose(masked, sliced, atol=1e-4)


def test_batches_sets_the_calibration_that_scores_the_groups(trained, monkeypatch):
    from lorashear.passes import lhspg

    module, data, _ = trained
    seen = []

    def recording(*args, batches, **kwargs):
        seen.append(tuple(batches.shape))
        return score_groups(*args, batches=batches, **kwargs)

    score_groups = lhspg.score_groups
    monkeypatch.setattr(lhspg, "score_groups", recording)
    _lhspg(module, data, steps=2, batches=2, batch=4)
    _lhspg(module, data, steps=2, batch=4)
    assert seen == [(2, 4, 32), (4, 4, 32)]  # 2 asked for; 4 by default
