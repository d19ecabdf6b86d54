"""`bench/gpu_pipeline.py` (the prepared GPU script of the scale issue) at its tiny shape on the
CPU: every stage runs, so the script cannot rot between the sessions that get a GPU."""

from __future__ import annotations

import json
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
