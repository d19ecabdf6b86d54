"""The training runtime of lhspg and recover: two gloo processes give the single-process
result, activation checkpointing changes nothing, and bad device/precision/batch fail early."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorashear
from lorashear.errors import PassError
from lorashear.ir.core import clone_module
from lorashear.ir.fileformat import save_ir
from lorashear.passes import PassManager
from lorashear.runtime.executor import IRModel, lora_param_names
from tests.conftest import training_setup

SEQ = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(lowered, tmp_path_factory):
    return training_setup(clone_module(lowered("llama", True)), tmp_path_factory.mktemp("training"))


def lhspg_text(root, **opts) -> str:
    options = {"ratio": 0.3, "periods": 2, "steps": 4, "seq-len": SEQ, "batch": 8, "lr": 5e-3,
               "data": root / "a.ids", "progress": "false", "device": "cpu", **opts}
    return "lhspg{" + ",".join(f"{k}={v}" for k, v in options.items()) + "}"


def recover_text(root, **opts) -> str:
    options = {"data": root / "spec.yaml", "steps": 6, "stage1-steps": 3, "probe-every": 3,
               "seq-len": SEQ, "batch": 8, "lr": 5e-3, "probe-windows": 4, "loss": "kd",
               "reference": root / "reference.ir", "progress": "false", "device": "cpu", **opts}
    return "recover{" + ",".join(f"{k}={v}" for k, v in options.items()) + "}"


DP_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
import torch.distributed as dist
from safetensors.torch import save_file
from lorashear.ir.fileformat import load_ir
from lorashear.passes import PassManager

module = load_ir(sys.argv[1])
out = sys.argv[2]
for stage, pipeline in enumerate(sys.argv[3:]):
    PassManager.parse(pipeline).run(module)
    rank = dist.get_rank()
    save_file({n: p.storage.load().contiguous() for n, p in module.params.items()},
              f"{out}/stage{stage}.rank{rank}.safetensors")
    if rank == 0:
        open(f"{out}/stage{stage}.mask", "w").write(repr(module.attributes.get("prune-mask")))
dist.destroy_process_group()
"""


def test_two_gloo_processes_equal_one_process(setup, tmp_path):
    """torchrun --nproc-per-node 2 on the CPU: every LoRA factor, base weight, mask and logged
    loss after lhspg and after recover equals the one-process run on the same global batch."""
    module, root = setup
    save_ir(clone_module(module), tmp_path / "in.ir")
    (tmp_path / "dp.py").write_text(textwrap.dedent(DP_SCRIPT))
    out = tmp_path / "out"
    out.mkdir()
    logs = {"dp": (out / "lhspg.jsonl", out / "recover.jsonl"),
            "one": (tmp_path / "lhspg.jsonl", tmp_path / "recover.jsonl")}
    pipelines = {k: (lhspg_text(root, log=a), recover_text(root, log=b)) for k, (a, b) in logs.items()}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(tmp_path / "dp.py"), str(tmp_path / "in.ir"), str(out), *pipelines["dp"]]
    # the children import this checkout's lorashear, not whichever one is installed
    path = os.pathsep.join([str(Path(lorashear.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})

    one = clone_module(module)  # the single-process run, while the two processes work
    expected = []
    for pipeline in pipelines["one"]:
        PassManager.parse(pipeline).run(one)
        expected.append(({n: p.storage.load() for n, p in one.params.items()},
                         repr(one.attributes.get("prune-mask"))))
    output, _ = child.communicate(timeout=120)
    assert child.returncode == 0, output.decode()[-3000:]

    worst = 0.0
    for stage, (params, mask) in enumerate(expected):
        ranks = [load_file(str(out / f"stage{stage}.rank{r}.safetensors")) for r in (0, 1)]
        for name, want in params.items():
            for got in ranks:
                worst = max(worst, (got[name] - want).abs().max().item())
            assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks disagree on {name}"
        assert (out / f"stage{stage}.mask").read_text() == mask
        chosen = [n for n in lora_param_names(module) if not torch.equal(params[n], module.params[n].storage.load())]
        assert chosen, "nothing trained"
    assert worst <= 1e-5, worst
    for dp_log, one_log in zip(logs["dp"], logs["one"], strict=True):
        dp_rows = [json.loads(line) for line in dp_log.read_text().splitlines()]
        one_rows = [json.loads(line) for line in one_log.read_text().splitlines()]
        assert len(dp_rows) == len(one_rows) > 0  # rank 0 alone wrote the log
        for a, b in zip(dp_rows, one_rows, strict=True):
            assert a.keys() == b.keys()
            if "loss" in a:
                assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
                assert (a["step"], a["chosen"], a["chosen_zero_share"]) == (b["step"], b["chosen"],
                                                                            b["chosen_zero_share"])
            else:
                assert a["weights"] == pytest.approx(b["weights"], abs=1e-5)
    print(f"2-process max abs diff: {worst:.3g}")


def test_gradient_checkpointing_changes_nothing(lowered):
    """Logits and every LoRA gradient equal the plain forward's (dropout on: the checkpoint
    replays the RNG)."""
    module = lowered("llama", True)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = IRModel(module, gradient_checkpointing=checkpointing).train()
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (plain_logits, plain_grads), (ckpt_logits, ckpt_grads) = results
    assert (plain_logits - ckpt_logits).abs().max() <= 1e-6
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert (grad - ckpt_grads[name]).abs().max() <= 1e-6, name


def test_grad_checkpoint_option_gives_the_same_lhspg_result(setup):
    module, root = setup
    plain, checkpointed = clone_module(module), clone_module(module)
    PassManager.parse(lhspg_text(root, periods=1, steps=2)).run(plain)
    PassManager.parse(lhspg_text(root, periods=1, steps=2, **{"grad-checkpoint": "true"})).run(checkpointed)
    for name, p in plain.params.items():
        assert (checkpointed.params[name].storage.load() - p.storage.load()).abs().max() <= 1e-6, name


def test_precision_and_device_errors(setup):
    module, root = setup
    for pass_text in (lhspg_text(root, precision="bf16"), recover_text(root, precision="fp16")):
        with pytest.raises(PassError, match=r"precision=(bf16|fp16) needs a CUDA device"):
            PassManager.parse(pass_text).run(clone_module(module))
    if not torch.cuda.is_available():
        with pytest.raises(PassError, match="CUDA is not available"):
            PassManager.parse(lhspg_text(root, device="cuda")).run(clone_module(module))
    with pytest.raises(PassError, match="is not one of auto, cpu, cuda"):
        PassManager.parse(lhspg_text(root, device="tpu"))


def test_batch_must_split_over_the_processes(setup, monkeypatch):
    """With WORLD_SIZE=3 (and a process group already there) batch 8 fails before training."""
    import torch.distributed as dist

    module, root = setup
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setenv("WORLD_SIZE", "3")
    for pass_text in (lhspg_text(root), recover_text(root)):
        with pytest.raises(PassError, match="batch=8 does not split over 3 data-parallel processes"):
            PassManager.parse(pass_text).run(clone_module(module))


def assert_removed_units_zero(module) -> None:
    """Every member slice of a unit in the prune mask is exactly zero (LoRA factors too)."""
    groups, removed = module.attributes["groups"], module.attributes["prune-mask"].as_dict()
    assert removed
    for family_id, units in removed.items():
        family = groups.families[family_id]
        for m in family.members:
            tensor = module.params[m.param].storage.load()
            assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
            dead = torch.isin(m.unit_of(tensor.shape[m.axis], family.size), torch.tensor(units))
            assert torch.all(tensor.movedim(m.axis, 0)[dead] == 0), m.param


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lhspg_bf16_and_recover_fp16_on_cuda(setup):
    """lhspg on CUDA with bf16 base weights zeroes the chosen groups (written back in the IR's
    fp32); recover in fp16 with a GradScaler keeps them zero and trains."""
    module, root = setup
    after = clone_module(module)
    PassManager.parse(lhspg_text(root, device="cuda", precision="bf16", **{"grad-checkpoint": "true"})).run(after)
    assert_removed_units_zero(after)
    assert all(torch.isfinite(torch.tensor(p["mean_loss"])) for p in after.attributes["lhspg-log"].periods)
    recovered = clone_module(after)
    PassManager.parse(recover_text(root, device="cuda", precision="fp16", **{"grad-checkpoint": "true"})).run(recovered)
    assert_removed_units_zero(recovered)
    probes = recovered.attributes["recover-log"].probes
    assert all(torch.isfinite(torch.tensor(list(p["ppl"].values()))).all() for p in probes)
    assert any(not torch.equal(after.params[n].storage.load(), recovered.params[n].storage.load())
               for n in lora_param_names(module)), "recover did not train"


@pytest.mark.parametrize("warmup", [0, 3])
def test_cosine_schedule_decays_from_lr_after_the_warmup(warmup):
    """The rates of every step: the warmup's linear rise, then lr falling along half a cosine
    (lr/2 halfway, above 0 at the last step); constant keeps lr."""
    from lorashear.training.runtime import set_warmup_lr

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    total, lr = 11, 0.4

    def rates(schedule):
        out = []
        for step in range(total):
            set_warmup_lr(optimizer, lr, step, warmup, schedule, total)
            out.append(optimizer.param_groups[0]["lr"])
        return out

    cosine, constant = rates("cosine"), rates("constant")
    rise = [lr * (s + 1) / warmup for s in range(warmup)]
    assert constant == pytest.approx(rise + [lr] * (total - warmup))
    assert cosine[:warmup + 1] == pytest.approx(rise + [lr])
    decay = cosine[warmup:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False)) and decay[-1] > 0
    if (total - warmup) % 2 == 0:
        assert decay[(total - warmup) // 2] == pytest.approx(lr / 2)


def test_a_training_checkpoint_resumes_under_other_run_only_options(setup, tmp_path):
    """A training checkpoint belongs to the pass less its run-only options (the text that
    fingerprints a pipeline checkpoint too): a run on device=cpu without activation
    checkpointing resumes with device=auto, grad-checkpoint=true and a log, to its result."""
    from lorashear.passes.resume import result_text

    module, root = setup
    ckpt = tmp_path / "ckpt"
    opts = {"steps": 2, "stage1-steps": 2, "probe-every": 1, "checkpoint-dir": ckpt}
    first, again = clone_module(module), clone_module(module)
    manager = PassManager.parse(recover_text(root, **opts))
    manager.run(first)
    owner = json.loads((ckpt / "state.json").read_text())["owner"]
    assert owner == result_text(manager.passes[0])
    assert "device" not in owner and "checkpoint" not in owner and "progress" not in owner
    PassManager.parse(recover_text(root, **opts, device="auto", log=tmp_path / "probes.jsonl",
                                   **{"grad-checkpoint": "true"})).run(again)
    assert again.attributes["recover-log"] == first.attributes["recover-log"]
    for name in lora_param_names(module):
        assert torch.equal(again.params[name].storage.load(), first.params[name].storage.load()), name
