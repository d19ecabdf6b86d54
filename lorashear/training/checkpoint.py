"""Checkpoints of training passes: tensors in safetensors, the rest in JSON, no pickle.

A checkpoint is a directory written atomically (a kill leaves the previous one whole):
``tensors.safetensors`` (parameters, optimizer moments, the torch RNG state) and
``state.json`` (counters, choices, logs, and the pass text it belongs to, so a checkpoint
of another configuration is never resumed by mistake).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorashear._atomic import atomic_path
from lorashear.errors import PassError

STATE_FILE, TENSOR_FILE = "state.json", "tensors.safetensors"


@dataclass
class TrainingCheckpoint:
    """What a training pass needs to continue exactly where it stopped."""

    owner: str  # the canonical pass text
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def save_checkpoint(directory: str | os.PathLike, checkpoint: TrainingCheckpoint) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in checkpoint.tensors.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    with atomic_path(directory, directory=True) as tmp:
        save_file(tensors, str(tmp / TENSOR_FILE), metadata={"producer": "lorashear"})
        (tmp / STATE_FILE).write_text(json.dumps({"owner": checkpoint.owner, "state": checkpoint.state},
                                                 sort_keys=True))


def load_checkpoint(directory: str | os.PathLike, owner: str) -> TrainingCheckpoint | None:
    """The checkpoint in ``directory`` if there is one (None if not); it must belong to ``owner``.

    Restores the torch RNG state as a side effect, so dropout continues the same stream."""
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        return None
    try:
        data = json.loads((directory / STATE_FILE).read_text())
        tensors = load_file(str(directory / TENSOR_FILE))
    except (OSError, ValueError) as exc:
        raise PassError(f"checkpoint {directory} is unreadable: {exc}") from None
    if data.get("owner") != owner:
        raise PassError(f"checkpoint {directory} belongs to {data.get('owner')!r}, not {owner!r}",
                        hint="use another checkpoint-dir, or delete it to start over")
    torch.set_rng_state(tensors.pop("rng.torch"))
    return TrainingCheckpoint(owner, data["state"], tensors)


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """AdamW-style per-parameter state as named tensors (``opt.<param>.<key>``)."""
    out = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            out[f"opt.{names[id(param)]}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def restore_optimizer(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter],
                      tensors: dict[str, torch.Tensor]) -> None:
    for key, value in tensors.items():
        if not key.startswith("opt."):
            continue
        name, _, slot = key[4:].rpartition(".")
        param = params[name]
        # moments live with their parameter; AdamW's step counter stays a CPU tensor
        optimizer.state[param][slot] = value.clone() if slot == "step" else value.to(param.device, copy=True)


def trim_log_after(path: str | os.PathLike, step: int) -> None:
    """Drop the trailing JSON lines of a step log whose ``step`` is past ``step``.

    A killed run may have logged steps after its last checkpoint; the resumed run does those
    steps again, so without the trim the log would hold them twice. Only the file's tail is
    trimmed: lines of earlier runs appended to the same file stay.
    """
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = len(lines)
    while keep:
        line = lines[keep - 1]
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if line.endswith("\n"):
                break  # not a log line of ours: leave it and what precedes it
            keep -= 1  # the kill tore the last line
            continue
        logged = record.get("step") if isinstance(record, dict) else None
        if not isinstance(logged, int) or logged <= step:
            break
        keep -= 1
    if keep < len(lines):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(lines[:keep]), encoding="utf-8")
