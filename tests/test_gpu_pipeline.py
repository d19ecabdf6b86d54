"""`bench/gpu_pipeline.py` (the prepared GPU script of the scale issue) at its tiny shape on the
CPU: every stage runs, so the script cannot rot between the sessions that get a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_pipeline_runs_every_stage(tmp_path):
    out = tmp_path / "pipeline.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_pipeline.py"), "--shape", "tiny",
                           "--device", "cpu", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    stages = [row["stage"] for row in report["stages"]]
    assert stages == ["lower (+ random weights)", "discover", "knowledge", "lhspg{ratio=0.2}",
                      "recover", "compress", "emit hf"]
    assert all("error" not in row for row in report["stages"])
    assert report["step_ms"]["LHSPG, torch plan"] > 0 and report["step_ms"]["plain LoRA AdamW"] > 0


def test_tiny_pipeline_runs_with_fsdp2_over_two_processes(tmp_path):
    """``--fsdp2`` under torchrun (2 gloo processes): every stage runs, lhspg and recover sharded."""
    out = tmp_path / "pipeline.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(ROOT / "bench" / "gpu_pipeline.py"),
                           "--shape", "tiny", "--device", "cpu", "--fsdp2", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["fsdp2_processes"] == 2
    assert [row["stage"] for row in report["stages"]][3:5] == ["lhspg{ratio=0.2}", "recover"]
    assert all("error" not in row for row in report["stages"]) and len(report["stages"]) == 7


def test_fsdp2_needs_torchrun():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_pipeline.py"), "--shape", "tiny",
                           "--device", "cpu", "--fsdp2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items() if k != "WORLD_SIZE"})
    assert done.returncode == 2 and "torchrun --nproc-per-node N" in done.stderr
