"""Pipeline checkpoints: ``lorashear-opt --checkpoint-dir D [--resume]`` survives ``kill -9``.

The directory ``D`` of one run holds:

- ``run.json``: what the run is (the pipeline, less the options that do not change its
  result, and a fingerprint of the input file), so a resume with another pipeline or
  another input is refused instead of mixing two runs;
- ``pass-<i>/``: the module after pass ``i`` (1-based) completed (``module.ir`` and its
  sidecar) and ``pass.json`` (the pass and the records of passes 1..i);
- ``<i>-<name>/``: the checkpoint of a training pass (``lhspg``, ``recover``) while it runs,
  unless the pipeline gave that pass a ``checkpoint-dir`` of its own.

Every one of them is written atomically (a temporary sibling renamed into place), so a kill
at any moment leaves the previous state whole. A resume loads the newest ``pass-<i>`` and
continues with pass ``i + 1``, whose own checkpoint (if any) continues it mid-pass; the
training passes seed and order their data by step, so the result is the one an uninterrupted
run gives (bitwise on CPU). Only the newest module is kept, and a training checkpoint is
removed once its pass's module is saved: the directory holds about one model, not one per pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorashear._atomic import atomic_path
from lorashear.errors import LorashearError, PassError
from lorashear.ir.core import Module, clone_module
from lorashear.passes.base import ModulePass
from lorashear.passes.pipeline import format_pass

FORMAT_VERSION = 1
RUN_FILE, PASS_FILE, MODULE_FILE = "run.json", "pass.json", "module.ir"


def run_only_options(p: ModulePass | type[ModulePass]) -> tuple[str, ...]:
    """The options of ``p`` declared ``option(..., run_only=True)``: they change how it runs
    (where it trains, logs, checkpoints, how much memory it spends), never what it computes,
    so a resume may change them."""
    return tuple(f.name for f in p.option_fields() if f.metadata.get("run_only", False))


def result_text(p: ModulePass) -> str:
    """The pass text with its run-only options at their defaults: what decides its result.

    It identifies a pipeline checkpoint's passes and a training pass's own checkpoint alike."""
    defaults = {f.name: f.default for f in p.option_fields() if f.name in run_only_options(p)}
    return format_pass(dataclasses.replace(p, **defaults)) if defaults else format_pass(p)


def input_fingerprint(path: str | os.PathLike) -> str:
    """A fingerprint of a ``.ir`` file: the hash of its text and of its sidecar's header and size.

    The sidecar's tensor bytes are not read (they can be many GB); its header (names, dtypes,
    shapes, offsets) and size change whenever another set of tensors is saved."""
    from lorashear.ir.fileformat import sidecar_path

    digest = hashlib.sha256(Path(path).read_bytes())
    side = sidecar_path(path)
    if side.is_file():
        with open(side, "rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            digest.update(head + f.read(min(length, 1 << 24)))
        digest.update(str(side.stat().st_size).encode())
    return digest.hexdigest()


@dataclass
class ResumePoint:
    """Where a resumed run continues: after ``completed`` passes, from ``module``."""

    completed: int
    module: Module
    records: list[dict[str, Any]]


class PipelineCheckpoint:
    """The checkpoint directory of one ``lorashear-opt`` run (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, *, input_key: str, input_name: str = "",
                 resume: bool = False, notify: Callable[[str], None] | None = None) -> None:
        self.directory = Path(directory).expanduser()
        self.input_key = input_key  # identifies the input (input_fingerprint of its file)
        self.input_name = input_name  # where the input came from, for messages
        self.resume = resume
        self.notify = notify or (lambda line: None)
        self._origin: Path | None = None  # the pass dir a resumed module may still read lazily
        self._count = 0
        self._writer = True  # whether this process writes (rank 0 under torchrun)

    # --- start ---------------------------------------------------------------------------------
    def start(self, passes: Sequence[ModulePass]) -> ResumePoint | None:
        """Check the directory against this run; on ``--resume``, the point to continue from.

        A fresh run needs an empty (or new) directory; a resume needs the directory of the
        same pipeline over the same input."""
        from lorashear.training.runtime import is_main_process

        d = self.directory
        self._count = len(passes)
        # Under torchrun every rank resumes from the same point, and rank 0 alone writes: the
        # other ranks neither check a fresh directory (rank 0 may already have written to it)
        # nor write to it.
        self._writer = is_main_process()
        if not self._writer and not self.resume:
            return None
        if d.exists() and not d.is_dir():
            raise PassError(f"checkpoint dir {d} is a file, not a directory")
        key = ",".join(result_text(p) for p in passes)
        entries = [e for e in (d.iterdir() if d.is_dir() else ()) if not _is_leftover(e)]
        if not entries:
            if self.resume:
                self.notify(f"--resume: {d} holds no checkpoint yet; starting from the first pass")
            if self._writer:
                self._write_run(key)
            return None
        if not self.resume:
            raise PassError(f"checkpoint dir {d} is not empty (it holds "
                            f"{', '.join(sorted(e.name for e in entries)[:3])}"
                            f"{', ...' if len(entries) > 3 else ''})",
                            hint="add --resume to continue the run it holds, or give a fresh "
                            "--checkpoint-dir")
        run = self._read_json(d / RUN_FILE, "is not a lorashear-opt checkpoint dir (no run.json)")
        if run.get("format") != FORMAT_VERSION:
            raise PassError(f"checkpoint dir {d} has format {run.get('format')!r}, this lorashear "
                            f"reads {FORMAT_VERSION}", hint="give a fresh --checkpoint-dir")
        if run.get("pipeline") != key:
            raise PassError(f"checkpoint dir {d} belongs to another pipeline: it holds "
                            f"{run.get('pipeline')!r}, this run asks for {key!r}",
                            hint="resume with the same --passes, or give a fresh --checkpoint-dir")
        if run.get("input") != self.input_key:
            raise PassError(f"checkpoint dir {d} belongs to another input: it was made from "
                            f"{run.get('input_name') or 'another file'}, and this input differs",
                            hint="resume with the same input IR file, or give a fresh "
                            "--checkpoint-dir")
        for leftover in filter(_is_leftover, d.iterdir() if self._writer else ()):
            _remove(leftover)  # temporaries of a killed write
        done = sorted((int(e.name[5:]), e) for e in entries
                      if e.name.startswith("pass-") and e.name[5:].isdigit()
                      and (e / PASS_FILE).is_file())
        if not done:
            self.notify(f"resuming in {d}: no pass had completed; starting with pass 1/"
                        f"{len(passes)} ({format_pass(passes[0])})")
            return None
        completed, folder = done[-1]
        record = self._read_json(folder / PASS_FILE, "is unreadable")
        if not 1 <= completed <= len(passes) or record.get("pass") != result_text(passes[completed - 1]):
            raise PassError(f"checkpoint {folder} does not match pass {completed} of this pipeline",
                            hint="give a fresh --checkpoint-dir")
        from lorashear.ir.fileformat import load_ir

        try:
            module = load_ir(folder / MODULE_FILE)
        except LorashearError as exc:
            raise PassError(f"checkpoint {folder} cannot be loaded: {exc.message}",
                            hint="give a fresh --checkpoint-dir") from None
        self._origin = folder
        names = ", ".join(p.name for p in passes[:completed])
        if completed == len(passes):
            self.notify(f"resuming from {folder}: all {completed} passes were done ({names})")
        else:
            self.notify(f"resuming from {folder}: passes 1-{completed} of {len(passes)} done "
                        f"({names}); continuing with pass {completed + 1} "
                        f"({format_pass(passes[completed])})")
        return ResumePoint(completed, module, list(record.get("records", [])))

    def _write_run(self, key: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.directory / RUN_FILE) as tmp:
            tmp.write_text(json.dumps({"format": FORMAT_VERSION, "pipeline": key,
                                       "input": self.input_key, "input_name": self.input_name},
                                      indent=1, sort_keys=True))

    def _read_json(self, path: Path, problem: str) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise PassError(f"checkpoint dir {self.directory} {problem}" if path.name == RUN_FILE
                            else f"checkpoint {path} {problem}",
                            hint="give a fresh --checkpoint-dir") from None
        if not isinstance(data, dict):
            raise PassError(f"checkpoint {path} is not a JSON object", hint="give a fresh --checkpoint-dir")
        return data

    # --- during the run ------------------------------------------------------------------------
    def training_dir(self, index: int, p: ModulePass) -> Path:
        """Where pass ``index`` (0-based) keeps its own checkpoint when the user set none."""
        return self.directory / f"{index + 1}-{p.name}"

    def configure(self, index: int, p: ModulePass) -> ModulePass:
        """The pass as it runs: a training pass without a checkpoint dir gets one in ``D``,
        and a note says when it will continue from a checkpoint instead of starting over."""
        if not any(f.name == "checkpoint_dir" for f in p.option_fields()):
            return p
        if not p.checkpoint_dir:  # type: ignore[attr-defined]
            p = dataclasses.replace(p, checkpoint_dir=str(self.training_dir(index, p)))
        state_file = Path(p.checkpoint_dir) / "state.json"  # type: ignore[attr-defined]
        if state_file.is_file():
            try:
                state = json.loads(state_file.read_text()).get("state", {})
            except (OSError, ValueError):
                state = {}
            step = state.get("step", state.get("step_total"))
            at = f" at step {step}" if isinstance(step, int) else ""
            self.notify(f"pass {index + 1}/{self._count} ({p.name}) continues from its checkpoint "
                        f"{state_file.parent}{at}")
        return p

    def pass_done(self, index: int, p: ModulePass, module: Module,
                  records: Sequence[dict[str, Any]]) -> None:
        """Save the module after pass ``index`` (0-based) and drop what it supersedes."""
        from lorashear.ir.fileformat import save_ir

        if not self._writer:
            return
        folder = self.directory / f"pass-{index + 1}"
        try:
            with atomic_path(folder, directory=True) as tmp:
                save_ir(clone_module(module), tmp / MODULE_FILE)  # a clone: the live module keeps its storage
                (tmp / PASS_FILE).write_text(json.dumps(
                    {"index": index + 1, "pass": result_text(p), "records": list(records)},
                    indent=1, sort_keys=True, default=str))
        except OSError as exc:
            raise PassError(f"cannot save the module after pass {index + 1} ({p.name}) in "
                            f"{folder}: {exc.strerror or exc}") from exc
        _remove(self.training_dir(index, p))
        for older in self.directory.glob("pass-*"):
            number = older.name[5:]
            if number.isdigit() and int(number) <= index and older != self._origin:
                _remove(older)

    def close(self) -> None:
        """After the output is written: drop the module a resume loaded, if a newer one exists."""
        if self._writer and self._origin is not None and any(
                p.name[5:].isdigit() and p != self._origin for p in self.directory.glob("pass-*")):
            _remove(self._origin)
        self._origin = None


def _is_leftover(entry: Path) -> bool:
    """A temporary of an atomic write that a kill interrupted (``.name.xyz.tmp``/``.old``)."""
    return entry.name.startswith(".") and entry.name.endswith((".tmp", ".old"))


def _remove(path: Path) -> None:
    """Remove a file or directory; a directory is first renamed to a leftover name, so a kill
    during the removal never leaves a half-deleted checkpoint that looks whole."""
    if path.is_dir() and not path.is_symlink():
        if not _is_leftover(path):
            doomed = path.with_name(f".{path.name}.{os.getpid()}.old")
            os.replace(path, doomed)
            path = doomed
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
