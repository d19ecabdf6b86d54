"""``bench/scale_model.py`` on a toy shape: every stage runs in its own process, reports its
peak RSS and times, and the fitted model is written (so the script cannot rot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_scale_model_runs_every_stage_on_a_toy_shape(tmp_path):
    out = tmp_path / "scale.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "scale_model.py"), "--sizes", "tiny",
                           "--dir", str(tmp_path / "work"), "--batch", "1", "--seq-len", "16",
                           "--steps", "1", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    stages = data["results"]["tiny"]["stages"]
    assert list(stages) == ["lower + discover", "saliency", "knowledge", "lhspg", "recover", "compress",
                            "emit hf"]
    assert all(s["peak_rss_gib"] > 0 and s["cpu_seconds"] > 0 for s in stages.values())
    assert (tmp_path / "work" / "tiny" / "hf" / "config.json").is_file()
    assert "| compress |" in done.stdout
