"""recover: sampling follows the degradation, and weighted sampling recovers the damaged source
faster than uniform sampling; stage 2 distils; masked groups stay zero; errors come early."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from lorashear.analysis.groups import PruneMaskAttr
from lorashear.analysis.masking import zero_groups
from lorashear.errors import PassError
from lorashear.ir.core import clone_module
from lorashear.ir.fileformat import save_ir
from lorashear.passes import PassManager
from lorashear.runtime.executor import lora_param_names
from tests.conftest import (
    build_tiny,
    fork_run,
    kill_when,
    markov_tokens,
    save_base_and_lower,
    save_word_tokenizer,
    train_all_weights,
)

SEQ = 32


@pytest.fixture(scope="module")
def recovery_setup(tmp_path_factory):
    """The reference: a tiny Llama trained on chains A and B. The damaged model: the same
    model fine-tuned on A alone (it forgets B), then masked (some MLP groups zeroed)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("recover")
    a, b = markov_tokens(5000, 5, 3, seed=0), markov_tokens(5000, 7, 11, seed=1)
    (root / "a.ids").write_text(" ".join(map(str, a.tolist())))
    (root / "b.ids").write_text(" ".join(map(str, b.tolist())))
    (root / "spec.yaml").write_text("sources:\n  - path: a.ids\n    name: a\n  - path: b.ids\n    name: b\n")
    windows_a, windows_b = a[: 5000 // SEQ * SEQ].view(-1, SEQ), b[: 5000 // SEQ * SEQ].view(-1, SEQ)
    tm = build_tiny("llama", root, seed=3)
    base = tm.peft.get_base_model()
    with tm.peft.disable_adapter():
        train_all_weights(base, torch.cat([windows_a, windows_b]), 150, seed=0)
        reference = save_base_and_lower(base, tm.model_dir, tm.adapter_dir)
        damaged_dir = root / "damaged-model"
        shutil.copytree(tm.model_dir, damaged_dir)
        train_all_weights(base, windows_a, 40, seed=1)
        damaged = save_base_and_lower(base, damaged_dir, tm.adapter_dir)
    save_ir(clone_module(reference), root / "reference.ir")
    PassManager.parse("discover").run(damaged)
    groups = damaged.attributes["groups"]
    mlp = [f for f in groups.families if f.kind == "mlp"][0]
    removed = {mlp.id: tuple(range(0, mlp.size, 8))}
    zero_groups(damaged, groups, removed)
    damaged.attributes["prune-mask"] = PruneMaskAttr.from_dict(removed)
    return damaged, root


def _recover(module, root, **opts):
    options = {"data": root / "spec.yaml", "steps": 30, "stage1-steps": 30, "probe-every": 10,
               "seq-len": SEQ, "batch": 8, "lr": 5e-3, "probe-windows": 8,
               "reference": root / "reference.ir", "progress": "false", **opts}
    text = ",".join(f"{k}={v}" for k, v in options.items())
    result = clone_module(module)
    PassManager.parse(f"recover{{{text}}}").run(result)
    return result


def test_weights_follow_degradation_and_beat_uniform_sampling(recovery_setup):
    damaged, root = recovery_setup
    dynamic = _recover(damaged, root)
    static = _recover(damaged, root, sampling="static")
    probes = dynamic.attributes["recover-log"].probes
    assert [p["step"] for p in probes] == [0, 10, 20, 30]
    first = probes[0]
    assert first["ppl"]["b"] / first["reference_ppl"]["b"] > first["ppl"]["a"] / first["reference_ppl"]["a"]
    assert first["weights"]["b"] > 0.5, first
    assert static.attributes["recover-log"].probes[0]["weights"] == {"a": 0.5, "b": 0.5}
    final_dynamic = probes[-1]["ppl"]["b"]
    final_static = static.attributes["recover-log"].probes[-1]["ppl"]["b"]
    assert final_dynamic < first["ppl"]["b"]
    assert final_dynamic < final_static, (first["ppl"]["b"], final_dynamic, final_static)
    # the masked groups stay exactly zero, including the trained LoRA factors
    groups, removed = damaged.attributes["groups"], damaged.attributes["prune-mask"].as_dict()
    for family_id, units in removed.items():
        family = groups.families[family_id]
        for m in family.members:
            tensor = dynamic.params[m.param].storage.load()
            unit = m.unit_of(tensor.shape[m.axis], family.size)
            dead = torch.isin(unit, torch.tensor(units))
            assert torch.all(tensor.movedim(m.axis, 0)[dead] == 0), m.param
    changed = [n for n in lora_param_names(damaged) if not torch.equal(
        damaged.params[n].storage.load(), dynamic.params[n].storage.load())]
    assert changed, "LoRA did not train"


def test_stage2_distils_logs_and_resumes(recovery_setup, tmp_path):
    damaged, root = recovery_setup
    log = tmp_path / "recover.jsonl"
    ckpt = tmp_path / "ckpt"
    opts = dict(steps=6, **{"stage1-steps": 3, "probe-every": 3}, loss="kd", log=log,
                **{"checkpoint-dir": ckpt})
    first = _recover(damaged, root, **opts)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(line["step"], line["stage"]) for line in lines] == [(0, 1), (3, 2), (6, 2)]
    assert set(lines[-1]["weights"]) == {"a", "b"}
    assert (ckpt / "state.json").is_file()
    again = _recover(damaged, root, **opts)  # resumes at the end: the same weights, no steps
    for name in lora_param_names(damaged):
        assert torch.equal(first.params[name].storage.load(), again.params[name].storage.load())
    assert again.attributes["recover-log"] == first.attributes["recover-log"]


def test_killed_run_resumes_to_the_same_result(recovery_setup, tmp_path):
    """SIGKILL a real recover process after its first checkpoint (stage 1); resuming gives
    bitwise the LoRA factors and the recover-log of an uninterrupted run (CPU, one thread),
    across the switch to stage 2 (distillation)."""
    damaged, root = recovery_setup
    torch.set_num_threads(1)
    ckpt, err = tmp_path / "ckpt", tmp_path / "err.txt"
    log = tmp_path / "probes.jsonl"
    opts = dict(steps=16, **{"stage1-steps": 8, "probe-every": 4, "checkpoint-dir": ckpt}, loss="kd",
                warmup=6)  # the learning rate is a function of the step: resumes exactly too
    kill_when(fork_run(lambda: _recover(damaged, root, **opts, log=log), err), ckpt / "state.json", err)
    assert json.loads((ckpt / "state.json").read_text())["state"]["step"] < 16, "killed too late"

    resumed = _recover(damaged, root, **opts, log=log)
    # each probe once: the resumed run neither started over nor repeated the killed run's probes
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 4, 8, 12, 16]
    straight = _recover(damaged, root, **{**opts, "checkpoint-dir": '""'})
    assert resumed.attributes["recover-log"] == straight.attributes["recover-log"]
    assert [p["step"] for p in straight.attributes["recover-log"].probes] == [0, 4, 8, 12, 16]
    for name in lora_param_names(damaged):
        assert torch.equal(resumed.params[name].storage.load(), straight.params[name].storage.load()), name


def test_a_second_run_draws_the_windows_after_the_first(recovery_setup, monkeypatch):
    """Two chained runs (stage 1, then a KD stage 2 as its own pass) draw exactly the windows
    one run of both lengths draws, not the first run's windows again; the cursor that says
    where to go on prints and parses with the module."""
    from lorashear.ir.parser import parse_module
    from lorashear.ir.printer import print_module
    from lorashear.passes import recover

    damaged, root = recovery_setup
    drawn = []
    real = recover.batch_for_step
    monkeypatch.setattr(recover, "batch_for_step", lambda *a: drawn.append(real(*a)) or drawn[-1])
    opts = dict(sampling="static", loss="kd", **{"probe-every": 100})
    _recover(damaged, root, steps=7, **{"stage1-steps": 4}, **opts)
    whole, drawn[:] = list(drawn), []
    first = _recover(damaged, root, steps=4, **{"stage1-steps": 4}, **opts)
    assert first.attributes["recover-cursor"].steps == 4
    second = _recover(first, root, steps=3, **{"stage1-steps": 0}, **opts)
    assert len(drawn) == len(whole) == 7
    assert all(torch.equal(a, b) for a, b in zip(drawn, whole, strict=True))
    assert not torch.equal(drawn[4], drawn[0])  # the second run's first batch is a new one
    assert second.attributes["recover-cursor"].steps == 7
    assert parse_module(print_module(second)).attributes["recover-cursor"] == second.attributes["recover-cursor"]


def test_warmup_scales_the_first_steps(recovery_setup):
    """AdamW's first step moves every element by about lr; warmup=10 makes that lr/10."""
    damaged, root = recovery_setup
    opts = dict(steps=1, **{"stage1-steps": 1, "probe-every": 1})
    moved = {}
    for warmup in (0, 10):
        after = _recover(damaged, root, **opts, warmup=warmup)
        moved[warmup] = max(float((after.params[n].storage.load() - damaged.params[n].storage.load())
                                  .abs().max()) for n in lora_param_names(damaged))
    assert moved[0] == pytest.approx(5e-3, rel=0.05)  # the lr of _recover
    assert moved[10] == pytest.approx(moved[0] / 10, rel=0.05)
    with pytest.raises(PassError, match="warmup must be >= 0"):
        _recover(damaged, root, **opts, warmup=-2)


def test_without_reference_the_start_model_is_the_reference(recovery_setup):
    damaged, root = recovery_setup
    result = _recover(damaged, root, steps=2, **{"stage1-steps": 2, "probe-every": 2}, reference='""')
    first = result.attributes["recover-log"].probes[0]
    assert first["ppl"] == pytest.approx(first["reference_ppl"])
    assert first["weights"] == pytest.approx({"a": 0.5, "b": 0.5})


def _spec(tmp_path, body: str):
    path = tmp_path / "spec.yaml"
    path.write_text(body)
    return path


def test_errors_before_training(recovery_setup, tmp_path):
    """One clear error per bad input, naming the file, record or option, raised while the
    data loads: no step runs and no checkpoint is written."""
    damaged, root = recovery_setup
    a = root / "a.ids"
    ckpt = tmp_path / "ckpt"

    def fails(match: str, **opts) -> None:
        with pytest.raises(PassError, match=match):
            _recover(damaged, root, **{"checkpoint-dir": ckpt}, **opts)
        assert not ckpt.exists(), "training started before the error"

    fails(r"data spec .*spec.yaml: data file .*missing\.ids does not exist",
          data=_spec(tmp_path, f"sources:\n  - path: {a}\n  - path: {tmp_path}/missing.ids\n"))
    (tmp_path / "empty.ids").write_text("")
    fails(r"source empty \(.*empty\.ids\) is empty",
          data=_spec(tmp_path, f"sources:\n  - path: {a}\n  - path: empty.ids\n"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    fails(r"source .*blank\.txt is empty: it holds no text",
          data=_spec(tmp_path, f"sources:\n  - path: {a}\n  - path: blank.txt\n"))
    (tmp_path / "none.jsonl").write_text("")
    fails(r"source .*none\.jsonl is empty: it has no records",
          data=_spec(tmp_path, f"sources:\n  - path: {a}\n  - path: none.jsonl\n"))
    (tmp_path / "alpaca.jsonl").write_text('{"instruction": "say hi", "output": "hi"}\n{"output": "x"}\n')
    fails(r"record 2 of .*alpaca\.jsonl has no 'instruction' field",
          data=_spec(tmp_path, f"sources:\n  - path: {a}\n  - path: alpaca.jsonl\n"))
    fails(r"recover: seq-len 512 exceeds the model's maximum of 256 tokens \(max_position_embeddings\)",
          **{"seq-len": 512})
    fails("needs it", **{"stage1-steps": 10}, loss="kd", reference='""')
    fails("stage 2 needs an instruction source", **{"stage1-steps": 10})


def test_stage2_without_its_data_fails_while_the_pipeline_parses(tmp_path):
    """A plain text file cannot feed instruction tuning, and KD needs its teacher: both are plain
    from the options, so the pipeline is refused before its first pass runs."""
    ahead = "discover,lhspg{ratio=0.2,data=book.txt},"
    for data in ("book.txt", "book.IDS"):
        with pytest.raises(PassError, match=r"stage 2 \(loss=lm\) tunes on instruction records, and "
                                            rf"data={re.escape(data)} is plain text.*loss=kd,reference="):
            PassManager.parse(f"{ahead}recover{{data={data}}}")
    with pytest.raises(PassError, match="loss=kd distils the unpruned model's logits and needs it"):
        PassManager.parse(f"{ahead}recover{{data=book.txt,loss=kd}}")
    for ok in ("recover{data=book.txt,loss=kd,reference=model.ir}", "recover{data=book.txt,stage1-steps=40}",
               "recover{data=sources.yaml}"):
        PassManager.parse(ahead + ok)


# --- stage 2 with a real tokenizer --------------------------------------------------------------
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow",
             "old": "new", "open": "closed", "left": "right", "early": "late", "light": "dark",
             "wet": "dry", "full": "empty"}


@pytest.fixture(scope="module")
def instruction_setup(tmp_path_factory):
    """A tiny Llama whose directory holds a word-level tokenizer (trained here, offline, with
    the `tokenizers` library), lowered so that recover finds the tokenizer through the
    module's source; and Alpaca records (JSON Lines) in that tokenizer's vocabulary."""
    from lorashear.data.loaders import InstructionRecord
    from lorashear.frontend.pretrained import lower_pretrained

    root = tmp_path_factory.mktemp("instructions")
    records = [{"instruction": f"Give the opposite of the word {word}.", "output": f"The opposite is {opposite}."}
               for word, opposite in OPPOSITES.items()]
    records += [{"instruction": "Give the opposite of this word.", "input": opposite,
                 "output": f"The opposite is {word}."} for word, opposite in OPPOSITES.items()]
    path = root / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tm = build_tiny("llama", root, seed=5)
    save_word_tokenizer(tm.model_dir, [InstructionRecord(**r).as_text() for r in records],
                        vocab_size=128)  # the tiny model's vocabulary
    module = lower_pretrained(tm.model_dir, adapter=tm.adapter_dir)
    return module, path, [InstructionRecord(**r) for r in records]


def test_stage2_instruction_tuning_with_a_real_tokenizer(instruction_setup):
    from transformers import AutoTokenizer

    from lorashear.runtime.executor import emit_torch

    module, path, records = instruction_setup
    options = f"data={path},steps=30,stage1-steps=0,seq-len=64,batch=8,lr=1e-2,progress=false"
    recover = PassManager.parse(f"recover{{{options}}}").passes[0]
    windows, rows, _ = recover.load_data(module)
    assert not windows and rows is not None and len(rows.input_ids) == len(records)
    tokenizer = AutoTokenizer.from_pretrained(module.attributes["source"].model)
    for row, record in enumerate(records):
        prompt = tokenizer(record.alpaca_prompt(), add_special_tokens=False)["input_ids"]
        response = tokenizer(record.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert tokenizer.unk_token_id not in prompt + response
        labels, ids = rows.labels[row], rows.input_ids[row]
        end = len(prompt) + len(response)
        assert torch.all(labels[:len(prompt)] == -100), "a prompt token carries a label"
        assert labels[len(prompt):end].tolist() == response == ids[len(prompt):end].tolist()
        assert torch.all(labels[end:] == -100) and rows.attention_mask[row].sum() == end

    def instruction_loss(m) -> float:
        with torch.no_grad():
            return emit_torch(m)(rows.input_ids, attention_mask=rows.attention_mask,
                                 labels=rows.labels).loss.item()

    trained = clone_module(module)
    PassManager.parse(f"recover{{{options}}}").run(trained)
    before, after = instruction_loss(module), instruction_loss(trained)
    assert after < before - 0.5, (before, after)  # 4.98 -> 3.79 nats here


def test_stage2_kd_moves_the_student_towards_the_teacher(recovery_setup):
    """loss=kd with no instruction data: the KL divergence to the unpruned model falls."""
    import torch.nn.functional as F

    from lorashear.ir.fileformat import load_ir
    from lorashear.runtime.executor import emit_torch

    damaged, root = recovery_setup
    teacher = emit_torch(load_ir(root / "reference.ir"))
    tokens = torch.tensor([int(w) for w in (root / "b.ids").read_text().split()])
    windows = tokens[-16 * SEQ:].view(16, SEQ)

    def kl(m) -> float:
        with torch.no_grad():
            target = F.log_softmax(teacher(windows).logits, -1).flatten(0, 1)
            student = F.log_softmax(emit_torch(m)(windows).logits, -1).flatten(0, 1)
            return F.kl_div(student, target, log_target=True, reduction="batchmean").item()

    distilled = _recover(damaged, root, steps=20, **{"stage1-steps": 0, "probe-every": 20}, loss="kd")
    before, after = kl(damaged), kl(distilled)
    assert after < 0.7 * before, (before, after)
    assert [p["stage"] for p in distilled.attributes["recover-log"].probes] == [2, 2]


def test_stage1_steps_defaults_to_half_the_steps(recovery_setup):
    """stage1-steps follows steps: half of them, rounded up, so the default 40 keeps its 20
    stage-1 steps and recover{steps=4} trains 2 + 2 instead of failing."""
    from lorashear.passes.recover import Recover

    def stage1(options: str) -> int:
        return PassManager.parse(f"recover{{data=s.yaml,loss=kd,reference=r.ir{options}}}").passes[0].stage1_length

    assert stage1("") == 20 and stage1(",steps=4") == 2 and stage1(",steps=5") == 3 and stage1(",steps=1") == 1
    assert stage1(",steps=4,stage1-steps=0") == 0 and stage1(",stage1-steps=40") == 40
    assert "-1: half of steps" in Recover.__dataclass_fields__["stage1_steps"].metadata["doc"]
    with pytest.raises(PassError, match="stage1-steps <= steps"):
        PassManager.parse("recover{data=s.yaml,steps=4,stage1-steps=-2}")
    damaged, root = recovery_setup
    result = clone_module(damaged)
    PassManager.parse(f"recover{{data={root / 'spec.yaml'},steps=4,probe-every=1,seq-len={SEQ},batch=8,"
                      f"loss=kd,reference={root / 'reference.ir'},progress=false}}").run(result)
    assert [p["stage"] for p in result.attributes["recover-log"].probes] == [1, 1, 2, 2, 2]


@pytest.mark.parametrize("train", ["lora+norms", "all"])
def test_training_base_weights_keeps_removed_units_zero_and_reloads(recovery_setup, tmp_path, train):
    """recover{train=...}: the named base tensors change, removed units stay exactly zero (so
    compress is exact), and the result reloads with the same logits."""
    from lorashear.analysis.masking import keep_masks
    from lorashear.runtime.executor import emit_torch
    from lorashear.runtime.hf import load_pretrained, save_model_dir

    damaged, root = recovery_setup
    before = {n: p.storage.load().clone() for n, p in damaged.params.items()}
    result = _recover(damaged, root, steps=6, **{"stage1-steps": 6, "probe-every": 6, "train": train})
    lora = lora_param_names(damaged)
    changed = {n for n, p in result.params.items()
               if n not in lora and not torch.equal(p.storage.load(), before[n])}
    norms = {n for n, p in damaged.params.items() if p.type.rank == 1 and not p.buffer}
    matrices = {n for n, p in damaged.params.items() if p.type.rank == 2 and n not in lora}
    assert changed & norms  # the norm scales trained
    if train == "all":
        assert changed & matrices
    else:
        assert not changed & matrices
    groups, removed = damaged.attributes["groups"], result.attributes["prune-mask"].as_dict()
    for (name, axis), keep in keep_masks(result, groups, removed).items():
        tensor = result.params[name].storage.load()
        dropped = tensor.index_select(axis, (~keep).nonzero().flatten())
        assert dropped.abs().max() == 0, name
    compressed = clone_module(result)
    PassManager.parse("compress").run(compressed)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked = emit_torch(result)(ids).logits
        small = emit_torch(compressed)(ids).logits
        save_model_dir(compressed, tmp_path / "out", merge=True)
        reloaded = load_pretrained(tmp_path / "out")(ids).logits
    assert (masked - small).abs().max() <= 1e-4
    assert (reloaded - small).abs().max() <= 1e-4


def test_base_weights_train_at_base_lr_and_the_factors_at_lr(recovery_setup):
    """recover{train=all}: AdamW's first step moves each element by about its learning rate,
    so the base matrices and norms move by at most ``base-lr`` and the LoRA factors by up to
    ``lr`` (50x more here), each nearly that far somewhere."""
    damaged, root = recovery_setup
    before = {n: p.storage.load().clone() for n, p in damaged.params.items()}
    result = _recover(damaged, root, steps=1, **{"stage1-steps": 1, "probe-every": 1, "train": "all",
                                                 "lr": 5e-3, "base-lr": 1e-4, "warmup": 0})
    lora = lora_param_names(damaged)
    moved = {n: float((p.storage.load() - before[n]).abs().max()) for n, p in result.params.items()
             if not p.buffer and p.storage.load().is_floating_point()}
    base = max(v for n, v in moved.items() if n not in lora)
    factors = max(v for n, v in moved.items() if n in lora)
    assert 0.9e-4 <= base <= 1.01e-4, base  # fp32 rounding of weights near 1
    assert 0.9 * 5e-3 <= factors <= 1.01 * 5e-3, factors


def test_train_option_is_validated():
    with pytest.raises(PassError, match="train"):
        PassManager.parse("recover{data=x.yaml,train=everything}")


def test_stage2_kd_hidden_moves_every_layer_towards_the_teacher(recovery_setup):
    """loss=kd-hidden: the layers' outputs move towards the reference's, and the logits too."""
    from lorashear.ir.fileformat import load_ir
    from lorashear.passes.recover import Recover
    from lorashear.runtime.executor import emit_torch

    damaged, root = recovery_setup
    teacher = emit_torch(load_ir(root / "reference.ir"))
    tokens = torch.tensor([int(w) for w in (root / "b.ids").read_text().split()])
    windows = tokens[-16 * SEQ:].view(16, SEQ)

    def hidden_error(m) -> float:
        with torch.no_grad():
            want = teacher(windows, output_hidden_states=True).hidden_states
            got = emit_torch(m)(windows, output_hidden_states=True).hidden_states
            return float(Recover.hidden_error(got, want, None))

    distilled = _recover(damaged, root, steps=20, **{"stage1-steps": 0, "probe-every": 20},
                         loss="kd-hidden", **{"hidden-weight": 1.0})
    before, after = hidden_error(damaged), hidden_error(distilled)
    assert after < 0.8 * before, (before, after)
    with pytest.raises(PassError, match="loss=kd-hidden distils the unpruned model"):
        PassManager.parse(f"recover{{data={root / 'spec.yaml'},steps=4,stage1-steps=2,loss=kd-hidden}}")
