"""`lorashear-opt --checkpoint-dir D [--resume]`: a run killed with SIGKILL at any point
continues to the result of an uninterrupted run, and a directory of another run is refused."""

from __future__ import annotations

import json

import pytest
import torch

from lorashear.cli import opt as opt_cli
from lorashear.ir.core import clone_module
from lorashear.ir.fileformat import load_ir, save_ir
from tests.conftest import fork_run, kill_when, markov_tokens


@pytest.fixture(scope="module")
def setup(lowered, tmp_path_factory):
    """The lowered tiny Llama with its LoRA adapter, two Markov streams and a data spec."""
    root = tmp_path_factory.mktemp("resume")
    save_ir(clone_module(lowered("llama", True)), root / "m.ir")
    for name, (mult, offset, seed) in {"a": (5, 3, 0), "b": (7, 11, 1)}.items():
        tokens = markov_tokens(3000, mult, offset, seed=seed)
        (root / f"{name}.ids").write_text(" ".join(map(str, tokens.tolist())))
    (root / "spec.yaml").write_text("sources:\n  - path: a.ids\n    name: a\n"
                                    "  - path: b.ids\n    name: b\n")
    pipeline = (f"discover,lhspg{{ratio=0.3,periods=3,steps=8,seq-len=32,batch=8,data={root / 'a.ids'},"
                f"progress=false}},recover{{data={root / 'spec.yaml'},steps=16,stage1-steps=16,"
                "probe-every=4,seq-len=32,batch=4,probe-windows=4,progress=false},compress")
    return root, pipeline


def test_killed_twice_then_resumed_equals_an_uninterrupted_run(setup, tmp_path, capsys):
    """SIGKILL a real lorashear-opt process inside lhspg (after its first period), resume in
    another and kill it inside recover (after its first probe), resume to the end: the same
    weights and logs as a run never killed (CPU, one thread)."""
    torch.set_num_threads(1)
    root, pipeline = setup
    ckpt, out, err = tmp_path / "ckpt", tmp_path / "resumed.ir", tmp_path / "err.txt"
    argv = [str(root / "m.ir"), f"--passes={pipeline}", "-o", str(out), "--checkpoint-dir", str(ckpt)]

    kill_when(fork_run(lambda: opt_cli.main(argv), err), ckpt / "2-lhspg" / "state.json", err)
    assert (ckpt / "pass-1" / "pass.json").is_file() and not (ckpt / "pass-2").exists(), \
        "killed after lhspg had finished"
    assert json.loads((ckpt / "2-lhspg" / "state.json").read_text())["state"]["period"] < 2
    assert not out.exists()

    kill_when(fork_run(lambda: opt_cli.main([*argv, "--resume"]), err),
              ckpt / "3-recover" / "state.json", err)
    said = err.read_text()
    assert "continuing with pass 2 (lhspg" in said and "pass 2/4 (lhspg) continues from its checkpoint" in said
    assert (ckpt / "pass-2").is_dir() and not (ckpt / "2-lhspg").exists(), "lhspg's checkpoint was kept"
    assert json.loads((ckpt / "3-recover" / "state.json").read_text())["state"]["step"] < 16, \
        "killed after recover had finished"
    assert not out.exists()

    assert opt_cli.main([*argv, "--resume"]) == 0
    said = capsys.readouterr().err
    assert "resuming from" in said and "continuing with pass 3 (recover" in said
    assert "pass 3/4 (recover) continues from its checkpoint" in said
    assert sorted(p.name for p in ckpt.iterdir()) == ["pass-4", "run.json"]

    straight = tmp_path / "straight.ir"
    assert opt_cli.main([str(root / "m.ir"), f"--passes={pipeline}", "-o", str(straight)]) == 0
    resumed, expected = load_ir(out), load_ir(straight)
    assert resumed.attributes == expected.attributes  # prune-mask, lhspg-log, recover-log, ...
    assert resumed.params.keys() == expected.params.keys()
    for name, p in expected.params.items():
        assert torch.equal(resumed.params[name].storage.load(), p.storage.load()), name


def _fails(argv, capsys, *must_contain: str) -> None:
    assert opt_cli.main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in must_contain:
        assert text in err, err


def test_a_checkpoint_dir_of_another_run_is_refused(setup, tmp_path, capsys):
    root, _ = setup
    ckpt, out = tmp_path / "ckpt", tmp_path / "o.ir"
    base = [str(root / "m.ir"), "--passes=discover,dce", "-o", str(out), "--checkpoint-dir", str(ckpt)]
    assert opt_cli.main(base) == 0
    capsys.readouterr()
    _fails(base, capsys, "is not empty", "--resume")
    _fails([*base[:1], "--passes=discover", *base[2:], "--resume"], capsys, "another pipeline")
    other = tmp_path / "other.ir"
    save_ir(load_ir(out), other)
    _fails([str(other), *base[1:], "--resume"], capsys, "another input", str(root / "m.ir"))
    _fails([*base[:4], "--resume"], capsys, "--resume needs the --checkpoint-dir")
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("mine")
    _fails([*base[:4], "--checkpoint-dir", str(tmp_path / "stray"), "--resume"], capsys,
           "not a lorashear-opt checkpoint dir")
    # a finished run resumes to its output without running anything
    again = tmp_path / "again.ir"
    assert opt_cli.main([*base[:3], str(again), "--checkpoint-dir", str(ckpt), "--resume"]) == 0
    assert "all 2 passes were done" in capsys.readouterr().err
    assert again.read_text() == out.read_text()


def test_resume_of_an_empty_dir_starts_from_the_first_pass(setup, tmp_path, capsys):
    root, _ = setup
    ckpt = tmp_path / "new"
    assert opt_cli.main([str(root / "m.ir"), "--passes=discover", "-o", str(tmp_path / "o.ir"),
                         "--checkpoint-dir", str(ckpt), "--resume"]) == 0
    assert "holds no checkpoint yet" in capsys.readouterr().err
    assert (ckpt / "pass-1" / "module.ir").is_file()
