"""The harness of a LoRA-training pass (``lhspg``, ``recover``): all of a training run that
is not the pass's algorithm.

A pass builds a :class:`LoraHarness` from its options at the start of ``run`` and then says
only what its algorithm does: which batch and which loss a step trains on, what happens after
each optimizer step, what its checkpoint remembers. The harness owns

- the :class:`~lorashear.training.runtime.TrainingRuntime`: device, precision, activation
  checkpointing and data parallelism (``harness.runtime`` also slices batches, autocasts and
  broadcasts rank 0's decisions);
- the model and the AdamW optimizer of its LoRA factors, with the learning-rate warmup and
  schedule;
- the *kept* tensors: the LoRA factors and whatever else the pass changes (:meth:`track`).
  They are resynced across ranks, saved in checkpoints and, at the end, written back into
  the IR (:meth:`write_back`);
- checkpoint and resume (:mod:`lorashear.training.checkpoint`): a checkpoint belongs to the
  pass text less its run-only options (the *owner*), holds the kept tensors, the optimizer
  moments, every rank's RNG state and the pass's own JSON state;
- the JSON-lines step log (``log=``, rank 0 only, flushed after every line and trimmed on
  resume) and the progress bars.

Sharding (``shard=fsdp2``, :class:`~lorashear.training.runtime.TrainingRuntime`): :meth:`build`
shards the model per decoder layer with FSDP2 and makes the optimizer over the local shards
(FSDP2's parameters are DTensors, and AdamW's moments follow them); :meth:`step` lets FSDP2
reduce-scatter the gradients inside the backward pass; the kept tensors are gathered whole
(``DTensor.full_tensor``, every rank in sorted name order) by :meth:`checkpoint` and
:meth:`write_back`, and :meth:`resume` puts each rank's rows of a checkpoint's whole tensors
(and of its optimizer moments) back into its shards. A pass that changes base weights in place
(``lhspg``'s projection) names them with :meth:`track` and works on each rank's rows
(:func:`~lorashear.training.runtime.local_rows_of`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import torch
from tqdm.auto import tqdm

from lorashear.errors import PassError
from lorashear.ir.core import Module
from lorashear.ir.storage import DataStorage
from lorashear.ir.types import torch_dtype
from lorashear.runtime.executor import IRModel, lora_param_names
from lorashear.training.checkpoint import (
    TrainingCheckpoint,
    load_checkpoint,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
    trim_log_after,
)
from lorashear.training.runtime import (
    Precision,
    Schedule,
    TrainingRuntime,
    is_sharded,
    local_rows_of,
    set_warmup_lr,
    warmup_steps,
    whole,
)


def shard_like(model: IRModel, key: str, value: torch.Tensor) -> torch.Tensor:
    """A checkpoint tensor as the sharded run holds it: an optimizer moment (``opt.<param>.<slot>``)
    of a sharded parameter as a DTensor of this rank's rows, placed like the parameter; any
    other tensor as it is."""
    name, _, slot = key[4:].rpartition(".")
    if not key.startswith("opt.") or slot == "step":
        return value
    param = model.tensor(name)
    if not is_sharded(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                             src_data_rank=None)


class TrainingOptions(Protocol):
    """The options every LoRA-training pass has (``lhspg`` and ``recover`` declare them)."""

    name: str
    device: str
    precision: Precision
    grad_checkpoint: bool
    batch: int
    lr: float
    warmup: int
    log: str
    checkpoint_dir: str
    progress: bool
    shard: str


@dataclass
class LoraHarness:
    """One training run of a pass: its runtime, model, optimizer, checkpoints, log and bars."""

    runtime: TrainingRuntime
    owner: str  # the pass text a checkpoint of this run belongs to (no run-only options)
    lr: float
    warmup: int  # steps, resolved
    schedule: Schedule
    total_steps: int
    checkpoint_dir: str
    log_path: str
    show_progress: bool
    model: IRModel | None = None
    optimizer: torch.optim.Optimizer | None = None
    trainable: list[torch.nn.Parameter] = field(default_factory=list)
    kept: set[str] = field(default_factory=set)
    seed: int = 0
    _names: dict[int, str] = field(default_factory=dict)
    _log_file: IO[str] | None = None

    @classmethod
    def create(cls, options: TrainingOptions, module: Module, *, owner: str, total_steps: int,
               schedule: Schedule = "constant") -> LoraHarness:
        """Check that ``module`` has LoRA factors to train, resolve the runtime (joining the
        process group under ``torchrun``) and check that the batch splits over its ranks."""
        if not lora_param_names(module):
            raise PassError(f"{options.name} trains LoRA adapters, and the module has none",
                            hint="lower with --adapter DIR or --lora-rank R")
        runtime = TrainingRuntime.create(options.name, options.device, options.precision,
                                         options.grad_checkpoint, options.shard)
        runtime.check_batch(options.batch)
        return cls(runtime, owner, options.lr, warmup_steps(options.warmup, total_steps), schedule,
                   total_steps, options.checkpoint_dir, options.log, options.progress)

    # --- the model -----------------------------------------------------------------------------
    def build(self, module: Module, seed: int, also_train: Iterable[str] = (),
              also_lr: float | None = None) -> IRModel:
        """Seed the torch RNG (LoRA dropout), put ``module`` on the device in training mode and
        make the AdamW optimizer (no weight decay) of its LoRA factors and of the base
        parameters named in ``also_train`` (kept like the factors: checkpointed, written back),
        those at learning rate ``also_lr`` when given (warmed up and scheduled alike)."""
        self.seed = seed
        self.runtime.seed(seed)
        also_train = frozenset(also_train)
        self.model = self.runtime.build_model(module, also_train=also_train)
        for name in sorted(also_train):
            self.model.tensor(name).requires_grad_(True)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._names = {id(p): n for n, p in self.model.named_parameters()}
        base_ids = {id(self.model.tensor(name)) for name in also_train}
        base = [p for p in self.trainable if id(p) in base_ids]
        if base and also_lr is not None:
            factors = [p for p in self.trainable if id(p) not in base_ids]
            groups = [{"params": factors}, {"params": base, "peak_lr": also_lr}]
        else:
            groups = [{"params": self.trainable}]
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=0.0)
        self.kept = {self._names[id(p)] for p in self.trainable}
        return self.model

    def frozen(self, module: Module) -> IRModel:
        """``module`` on the device in eval mode with nothing to train (a teacher, a reference)."""
        return self.runtime.build_model(module, trainable=False)

    def track(self, names: Iterable[str]) -> None:
        """Parameters besides the LoRA factors that the pass changes in place: they are kept
        like the factors (resynced, checkpointed, written back)."""
        self.kept |= set(names)

    def _kept_tensor(self, name: str) -> torch.Tensor:
        """A kept tensor whole (sharded: gathered from the ranks' shards, a collective, and
        moved to the host at once, so the device never holds more than one whole tensor)."""
        tensor = self.model.tensor(name)
        return whole(tensor).cpu() if self.runtime.sharded else tensor

    def _kept_names(self) -> list[str]:
        """The kept tensors' names, sorted when sharded: every rank gathers them in one order."""
        return sorted(self.kept) if self.runtime.sharded else list(self.kept)

    def _load_kept(self, name: str, value: torch.Tensor) -> None:
        """Set kept tensor ``name`` to the whole tensor ``value`` (this rank's rows when sharded)."""
        local, start = local_rows_of(self.model.tensor(name))
        local.copy_(value[start:start + local.shape[0]])

    # --- training ------------------------------------------------------------------------------
    def step(self, loss: torch.Tensor, step: int, share: float | None = None) -> float:
        """One optimizer step at the learning rate of step ``step`` (0-based, over the run);
        returns the loss over the global batch. ``share``: this rank's share of the global
        batch's tokens (an equal share when None)."""
        set_warmup_lr(self.optimizer, self.lr, step, self.warmup, self.schedule, self.total_steps)
        if share is None:
            share = 1.0 / self.runtime.world_size  # full windows: equal token counts per rank
        return self.runtime.step(loss, self.optimizer, self.trainable, share)

    def bar(self, steps: Iterable[int], desc: str) -> tqdm:
        """A progress bar over ``steps`` (rank 0, when the pass asked for one)."""
        return tqdm(steps, desc=desc, disable=not self.runtime.progress(self.show_progress),
                    leave=False)

    # --- the step log --------------------------------------------------------------------------
    @contextlib.contextmanager
    def logging(self) -> Iterator[None]:
        """The log file open (appending; rank 0 and ``log=`` only) for the training loop."""
        if self.log_path and self.runtime.is_main:
            self._log_file = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115
        try:
            yield
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def write_log(self, record: dict[str, Any], *, sort_keys: bool = False) -> None:
        """Append ``record`` as a JSON line, flushed: a live plot (or a kill) sees every line."""
        if self._log_file is not None:
            self._log_file.write(json.dumps(record, sort_keys=sort_keys) + "\n")
            self._log_file.flush()

    # --- checkpoints ---------------------------------------------------------------------------
    @property
    def saves_checkpoints(self) -> bool:
        return bool(self.checkpoint_dir)

    def resume(self, step_key: str) -> dict[str, Any] | None:
        """The pass state of the checkpoint in ``checkpoint-dir`` (None when there is none),
        with the kept tensors, the optimizer and the RNG streams restored from it. Log lines
        past the checkpoint's step ``state[step_key]`` (a killed run's last steps, which the
        resumed run trains again) are dropped."""
        if not self.checkpoint_dir:
            return None
        resumed = load_checkpoint(self.checkpoint_dir, self.owner)
        if resumed is None:
            return None
        with torch.no_grad():
            for name in self.kept:
                if self.runtime.sharded:
                    self._load_kept(name, resumed.tensors[name])
                else:
                    self._kept_tensor(name).copy_(resumed.tensors[name])
        tensors = resumed.tensors
        if self.runtime.sharded:  # each rank's rows of the moments of its shards
            tensors = {key: shard_like(self.model, key, value) for key, value in tensors.items()}
        restore_optimizer(self.optimizer, dict(self.model.named_parameters()), tensors)
        step = resumed.state[step_key]
        self.runtime.restore_rng(resumed.tensors, self.seed, step)
        if self.log_path and self.runtime.is_main:
            trim_log_after(self.log_path, step)
        return resumed.state

    def checkpoint(self, state: dict[str, Any]) -> None:
        """Resync the kept tensors to rank 0's and, with a ``checkpoint-dir``, save them, the
        optimizer moments, every rank's RNG state and the pass's ``state`` (rank 0 writes)."""
        self.runtime.sync_tensors(self.model.tensor(n) for n in sorted(self.kept))
        if not self.checkpoint_dir:
            return
        moments = optimizer_tensors(self.optimizer, self._names)
        if self.runtime.sharded:  # gathered whole by every rank in one order; rank 0 keeps them
            tensors = {}
            for key in sorted(self.kept) + sorted(moments):
                value = self._kept_tensor(key) if key in self.kept else whole(moments[key]).cpu()
                if self.runtime.is_main:
                    tensors[key] = value
        else:
            tensors = {n: self._kept_tensor(n) for n in self.kept}
            tensors.update(moments)
        tensors.update(self.runtime.rng_tensors())  # a collective: every rank takes part
        if self.runtime.is_main:
            save_checkpoint(self.checkpoint_dir, TrainingCheckpoint(self.owner, state, tensors))

    # --- the result ----------------------------------------------------------------------------
    def write_back(self, module: Module) -> None:
        """The kept tensors, as trained, into ``module``'s parameters (in their IR dtype)."""
        with torch.no_grad():
            for name in self._kept_names():
                ir_dtype = torch_dtype(module.params[name].type.dtype)
                module.params[name].storage = DataStorage(
                    self._kept_tensor(name).detach().to(device="cpu", dtype=ir_dtype).clone())
