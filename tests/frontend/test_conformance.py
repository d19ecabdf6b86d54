"""The conformance sweep (``tools/conformance.py``) over a fixed subset of transformers'
architectures, each row's outcome as expected: the families that go all the way (lowered
logits equal peft's, groups of the expected kinds, random prune + compress exact with fewer
parameters, ONNX Runtime equal to torch), and the ones that stop, with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FULL = {"builds": True, "lower": True, "compress": True, "onnx": True}
#: architecture -> the row's expected outcome: stage results, group kinds, reason fragment
EXPECTED = {
    "llama": {**FULL, "kinds": {"attn", "mlp", "hidden"}},
    "qwen2": {**FULL, "kinds": {"attn", "mlp", "hidden"}},
    "gemma2": {**FULL, "kinds": {"attn", "mlp", "hidden"}},
    "gpt_neox": {**FULL, "kinds": {"attn", "mlp"}},  # LayerNorm: no hidden groups
    "phi3": {**FULL, "kinds": {"attn", "mlp", "hidden"}},  # q | k | v: row ranges of qkv_proj
    "bloom": {**FULL, "kinds": {"mlp"}},  # ALiBi's per-head slopes pin the heads
    "persimmon": {**FULL, "kinds": {"attn", "mlp"}},  # q, k, v picked out of query_key_value by select
    # fused query_key_value split on load, DeepSeek-V3 routing (a scattered group mask), experts
    "sarvam_moe": {**FULL, "kinds": {"attn", "expert", "hidden", "mlp"}},
    "gpt2": {**FULL, "kinds": {"attn", "mlp"}},  # Conv1D + LoRA: a linear on the weight read transposed
}


def test_conformance_subset(tmp_path):
    results = tmp_path / "rows.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "conformance.py"), "--only", ",".join(EXPECTED),
                           "--results", str(results), "--timeout", "600"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {row["architecture"]: row for row in map(json.loads, results.read_text().splitlines())}
    assert set(rows) == set(EXPECTED)
    for name, want in EXPECTED.items():
        row = rows[name]
        assert row["lorashear_error"], (name, row.get("traceback"))  # never a crash
        for stage in ("builds", "lower", "compress", "onnx"):
            if stage in want:
                assert row[stage] is want[stage], (name, stage, row["reason"])
        assert set(row["groups"]) == want["kinds"], (name, row["groups"])
        assert want.get("reason", "") in row["reason"], (name, row["reason"])
        if row.get("compress"):
            before, after = row["params"]
            assert after < before, name
