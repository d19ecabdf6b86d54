"""``shard=fsdp2`` of lhspg and recover: two gloo processes, each holding half the rows of every
parameter, give the one-process result (masks equal, weights within 1e-5); the projection
gathers no base weight; checkpoints hold whole tensors that resume in either layout; asking
for it without a process group, or with what it does not support, fails clearly."""

from __future__ import annotations

import json
import os
import signal
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
from lorashear.runtime.executor import lora_param_names
from tests.conftest import training_setup

SEQ = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(lowered, tmp_path_factory):
    return training_setup(clone_module(lowered("llama", True)), tmp_path_factory.mktemp("fsdp2"))


def lhspg_text(root, **opts) -> str:
    # settle=0: the shrink spans every step, so the sharded projection's summed norms and
    # inner products decide (with the default the one shrink step only forces zeros)
    options = {"ratio": 0.3, "periods": 2, "steps": 4, "settle": 0, "seq-len": SEQ, "batch": 8,
               "lr": 5e-3, "data": root / "a.ids", "progress": "false", "device": "cpu", **opts}
    return "lhspg{" + ",".join(f"{k}={v}" for k, v in options.items()) + "}"


def recover_text(root, **opts) -> str:
    options = {"data": root / "spec.yaml", "steps": 6, "stage1-steps": 3, "probe-every": 3,
               "seq-len": SEQ, "batch": 8, "lr": 5e-3, "probe-windows": 4, "loss": "kd",
               "reference": root / "reference.ir", "train": "lora+norms", "progress": "false",
               "device": "cpu", **opts}
    return "recover{" + ",".join(f"{k}={v}" for k, v in options.items()) + "}"


#: the two-process side: lhspg then recover (saving a checkpoint), each rank's result saved;
#: then recover again from that checkpoint on the lhspg result (it resumes at the end); what
#: each rank held and what the projection gathered, as JSON
FSDP_SCRIPT = """
import json, os, sys, torch
torch.set_num_threads(1)
import torch.distributed as dist
from safetensors.torch import save_file
from lorashear.ir.core import clone_module
from lorashear.ir.fileformat import load_ir
from lorashear.passes import PassManager
import lorashear.passes.lhspg as lhspg
from lorashear.training.harness import LoraHarness

models, gathered = [], []
build = LoraHarness.build
def recording_build(self, *args, **kwargs):
    model = build(self, *args, **kwargs)
    models.append(model)
    return model
LoraHarness.build = recording_build
whole = lhspg.whole
def recording_whole(tensor):
    gathered.append(next(n for n, p in models[-1].named_parameters() if p is tensor))
    return whole(tensor)
lhspg.whole = recording_whole

module = load_ir(sys.argv[1])
out = sys.argv[2]
rank = int(os.environ["RANK"])
held = []
for stage, pipeline in enumerate(sys.argv[3:5]):
    if stage == 1:
        pruned = clone_module(module)
    PassManager.parse(pipeline).run(module)
    model = models[-1]
    held.append({"rows": {n: [p.to_local().shape[0], p.shape[0]] for n, p in model.named_parameters()},
                 "layers": sorted(type(m).__name__ for m in model._layer_calls.values())})
    save_file({n: p.storage.load().contiguous() for n, p in module.params.items()},
              f"{out}/stage{stage}.rank{rank}.safetensors")
    if rank == 0:
        open(f"{out}/stage{stage}.mask", "w").write(repr(module.attributes.get("prune-mask")))
PassManager.parse(sys.argv[4]).run(pruned)
save_file({n: p.storage.load().contiguous() for n, p in pruned.params.items()},
          f"{out}/resumed.rank{rank}.safetensors")
json.dump({"held": held, "gathered": sorted(set(gathered))}, open(f"{out}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def test_fsdp2_lhspg_then_recover_equal_one_process(setup, tmp_path):
    """torchrun --nproc-per-node 2 with shard=fsdp2 on the CPU (gloo): after lhspg and after
    recover every rank's written-back tensors are within 1e-5 of the one-process run's and
    the masks are equal; each rank held half the rows of every parameter, every decoder layer
    was its own FSDP2 module, and the projection gathered only LoRA A factors whole."""
    module, root = setup
    save_ir(clone_module(module), tmp_path / "in.ir")
    (tmp_path / "fsdp.py").write_text(textwrap.dedent(FSDP_SCRIPT))
    out = tmp_path / "out"
    out.mkdir()
    ckpt = tmp_path / "ckpt"
    # lhspg also recomputes its activations (inside each layer's FSDP2 call): the same result
    sharded = (lhspg_text(root, shard="fsdp2", **{"grad-checkpoint": "true"}), recover_text(root, shard="fsdp2", **{"checkpoint-dir": ckpt}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(tmp_path / "fsdp.py"), str(tmp_path / "in.ir"), str(out), *sharded]
    path = os.pathsep.join([str(Path(lorashear.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})

    one = clone_module(module)  # the one-process run, while the two processes work
    expected = []
    for pipeline in (lhspg_text(root), recover_text(root)):
        again = clone_module(one)  # for the resumed recover below
        PassManager.parse(pipeline).run(one)
        expected.append(({n: p.storage.load() for n, p in one.params.items()},
                         repr(one.attributes.get("prune-mask"))))
    try:  # a few tens of seconds alone; minutes on a crowded CPU
        output, _ = child.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the launcher and its two workers
        output, _ = child.communicate()
        pytest.fail("the two processes did not finish:\n" + output.decode()[-3000:])
    assert child.returncode == 0, output.decode()[-3000:]

    worst = 0.0
    for stage, (params, mask) in enumerate(expected):
        ranks = [load_file(str(out / f"stage{stage}.rank{r}.safetensors")) for r in (0, 1)]
        for name, want in params.items():
            for got in ranks:
                worst = max(worst, (got[name] - want).abs().max().item())
            assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks disagree on {name}"
        assert (out / f"stage{stage}.mask").read_text() == mask
        assert mask != "None"
        trained = [n for n in lora_param_names(module)
                   if not torch.equal(params[n], module.params[n].storage.load())]
        assert trained, "nothing trained"
    assert worst <= 1e-5, worst

    for rank in (0, 1):
        report = json.loads((out / f"rank{rank}.json").read_text())
        for held in report["held"]:
            assert len(held["layers"]) == 2 and all(t.startswith("FSDP") for t in held["layers"])
            for name, (local, rows) in held["rows"].items():
                assert local == (rows + 1) // 2 if rank == 0 else local == rows // 2, name
        assert report["gathered"], "the projection gathered nothing"
        assert all(n.endswith("lora_A.weight") for n in report["gathered"]), report["gathered"]

    # the sharded checkpoint holds whole tensors: the sharded rerun resumed at its end (its
    # ranks' rows put back), and so does one process, both to the sharded result exactly
    final = load_file(str(out / "stage1.rank0.safetensors"))
    resumed = [load_file(str(out / f"resumed.rank{r}.safetensors")) for r in (0, 1)]
    PassManager.parse(recover_text(root, **{"checkpoint-dir": ckpt})).run(again)
    for name in lora_param_names(module):
        assert torch.equal(resumed[0][name], final[name]) and torch.equal(resumed[1][name], final[name]), name
        assert torch.equal(again.params[name].storage.load(), final[name]), name


def test_fsdp2_needs_a_process_group(setup, monkeypatch):
    """shard=fsdp2 in one process fails before training, naming the option and torchrun."""
    module, root = setup
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for text in (lhspg_text(root, shard="fsdp2"), recover_text(root, shard="fsdp2")):
        with pytest.raises(PassError, match="shard=fsdp2 shards the model over the processes of a "
                           "torchrun launch, and this is one process"):
            PassManager.parse(text).run(clone_module(module))


@pytest.mark.parametrize("option", ["cuda-graph=true", "reconstruct=true",
                                    "metric=taylor,rescore=true"])
def test_fsdp2_refuses_what_it_does_not_support(setup, option):
    _, root = setup
    with pytest.raises(PassError, match="shard=fsdp2 does not support"):
        PassManager.parse(lhspg_text(root, shard="fsdp2")[:-1] + "," + option + "}")


def test_shard_option_text_is_checked(setup):
    _, root = setup
    for text in (lhspg_text(root, shard="fsdp"), recover_text(root, shard="zero3")):
        with pytest.raises(PassError):
            PassManager.parse(text)
