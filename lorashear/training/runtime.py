"""The runtime the training passes share (``lhspg``, ``recover``): device, precision,
activation checkpointing, and data parallelism under ``torchrun`` / ``accelerate launch``.

A pass declares the three options once each (:mod:`lorashear.passes.options`); its
:class:`~lorashear.training.harness.LoraHarness` builds a :class:`TrainingRuntime` from them,
which builds the model, slices each global batch and takes the optimizer step.

Data parallelism (``WORLD_SIZE > 1``): every rank builds the same global batch (the passes'
batches are functions of the step alone) and trains on its contiguous slice. The gradients of
the LoRA factors are all-reduced so that the update equals the single-process update on the
global batch; everything after the optimizer step (projection, masks, saliency and probe
choices) then runs identically on every rank. Only rank 0 writes checkpoints, logs, progress
bars and output files.

Sharding (``shard=fsdp2``, under ``torchrun`` only): every decoder layer's parameter
container (:meth:`IRModel.call_layers`) and then the model itself are wrapped by FSDP2's
``fully_shard`` over one process group of all ranks, so each rank holds its row-chunk (dim 0)
of every parameter: frozen base weights, LoRA factors, the trained base tensors and their
AdamW moments. A layer's whole parameters exist only while it runs forward or backward (its
hooks gather them and free them after); the embedding, final norm and head (the model's own
group) likewise. Data parallelism is as above: each rank trains on its slice of the same
global batch; FSDP2 reduce-scatters the gradients inside the backward pass, each rank's
weighted by its token share. A pass reads its sharded tensors through :func:`local_rows_of`.

With one process on the CPU in ``fp32`` the runtime adds nothing to what the passes did
before: the same calls in the same order, so results stay bitwise identical.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lorashear.analysis.placement import Placement
from lorashear.errors import PassError
from lorashear.ir.core import Module
from lorashear.runtime.executor import IRModel, lora_param_names

Precision = Literal["fp32", "bf16", "fp16"]
#: How a training pass lays its model over the processes: ``none`` replicates it on every rank
#: (data parallelism); ``fsdp2`` shards it per decoder layer with FSDP2's ``fully_shard``.
Shard = Literal["none", "fsdp2"]

_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Optimizer state that stays on the CPU whatever the device (AdamW's step counter).
_CPU_STATE = frozenset({"step"})


def check_warmup(pass_name: str, warmup: int) -> None:
    if warmup < -1:
        raise PassError(f"{pass_name} warmup must be >= 0 steps (or -1: automatic), got {warmup}")


def warmup_steps(warmup: int, total_steps: int) -> int:
    """The warmup length an option value means: ``-1`` is a third of the steps, at most 50."""
    return min(50, -(-total_steps // 3)) if warmup == -1 else warmup


#: Learning-rate schedules after the warmup: ``constant`` keeps ``lr``; ``cosine`` decays it
#: along half a cosine from ``lr`` at the first step after the warmup towards 0 at the end.
Schedule = Literal["constant", "cosine"]


def set_warmup_lr(optimizer: torch.optim.Optimizer, lr: float, step: int, warmup: int,
                  schedule: Schedule = "constant", total: int = 0) -> None:
    """Linear warmup: step ``step`` (0-based) trains at ``lr * min(1, (step + 1) / warmup)``; then
    ``schedule`` over the ``total`` steps. A function of the step alone, so a resumed run trains
    at the same rates. A parameter group with its own ``peak_lr`` follows the same curve from it."""
    factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if schedule == "cosine" and step >= warmup and total > warmup:
        factor = 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = group.get("peak_lr", lr) * factor


def check_device_text(pass_name: str, device: str) -> None:
    """Fail early on a device that is none of auto, cpu, cuda, cuda:N."""
    if not _DEVICE_PATTERN.fullmatch(device):
        raise PassError(f"{pass_name}: device={device!r} is not one of auto, cpu, cuda, cuda:N")


def check_precision_text(pass_name: str, precision: str) -> None:
    """Fail early on a precision that is none of fp32, bf16, fp16."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise PassError(f"{pass_name}: precision={precision!r} is not one of fp32, bf16, fp16")


def check_shard_text(pass_name: str, shard: str) -> None:
    """Fail early on a shard value that is none of none, fsdp2."""
    if shard not in ("none", "fsdp2"):
        raise PassError(f"{pass_name}: shard={shard!r} is not one of none, fsdp2")


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a sharded FSDP2 parameter (a DTensor) rather than a whole one."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_rows_of(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's shard of ``tensor`` as a plain tensor (a view: writing it writes the
    parameter) and the index of its first row in the whole tensor. FSDP2 shards dim 0 in
    ``torch.chunk``'s pieces; a whole tensor is its own shard, at row 0."""
    if not is_sharded(tensor):
        return tensor.data, 0
    local = tensor.to_local().detach()  # shares the shard's storage, no autograd view
    rows, world = tensor.shape[0], tensor.device_mesh.size()
    start = min(tensor.device_mesh.get_local_rank() * -(-rows // world), rows)
    if local.shape[0] != min(rows - start, -(-rows // world)):
        raise PassError(f"a sharded tensor of {rows} rows holds {local.shape[0]} rows from row {start} "
                        f"on this rank: not torch.chunk's pieces over {world} ranks")
    return local, start


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a sharded one gathered from every rank (a collective: every rank
    calls it, in the same order), a whole one as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def _resolve_device(pass_name: str, device: str, precision: str, local_rank: int | None,
                    verb: str) -> torch.device:
    """The device ``device`` means (auto: cuda when available; cuda: under torchrun the local
    rank's, else the current one), checked against ``precision`` (bf16/fp16 need CUDA)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PassError(f"{pass_name}: device={device} but CUDA is not available",
                            hint="use device=cpu (or auto)")
        if device == "cuda":
            device = f"cuda:{local_rank if local_rank is not None else torch.cuda.current_device()}"
    resolved = torch.device(device)
    if precision != "fp32" and resolved.type != "cuda":
        raise PassError(f"{pass_name}: precision={precision} needs a CUDA device; on {resolved} "
                        f"the pass {verb} in fp32", hint="use precision=fp32, or device=cuda")
    return resolved


def resolve_placement(pass_name: str, device: str, precision: str) -> Placement:
    """The placement of a pass that runs the model without training it (``saliency``,
    ``knowledge``, ``prune``, ``reconstruct``, ``lorashear eval``): its ``device`` and
    ``precision`` options read as the training passes read them, with the same errors. It
    joins no process group; under ``torchrun``, ``cuda`` means the local rank's GPU."""
    check_device_text(pass_name, device)
    check_precision_text(pass_name, precision)
    world, _, local_rank = _world_from_environment()
    resolved = _resolve_device(pass_name, device, precision, local_rank if world > 1 else None, "runs")
    return Placement(resolved, _AUTOCAST_DTYPES.get(precision))


def is_main_process() -> bool:
    """Whether this process is rank 0 (always true outside ``torchrun``): the one that writes."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _world_from_environment() -> tuple[int, int, int]:
    """(world size, rank, local rank) as ``torchrun`` and ``accelerate launch`` set them."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise PassError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers: {exc}") from None
    return world, rank, local


@dataclass
class TrainingRuntime:
    """Device, precision, checkpointing and the data-parallel group of one training pass.

    Gradients are reduced by hand (one all-reduce of a flat buffer after ``backward``) rather
    than by wrapping the model in ``DistributedDataParallel``: the passes' losses are token
    means whose denominators differ between ranks (stage-2 instruction labels), so each rank's
    gradient must be weighted by its token share before the sum, which DDP's plain average
    does not do; the trainable LoRA factors are a few MB, so overlapping their reduction with
    the backward pass would gain nothing; and the model stays a plain ``IRModel`` that
    activation checkpointing, the in-place projection and the checkpoint code use unchanged.
    """

    pass_name: str
    device: torch.device
    precision: Precision
    grad_checkpoint: bool
    world_size: int = 1
    rank: int = 0
    scaler: Any = None  # torch.amp.GradScaler for fp16
    shard: Shard = "none"
    mesh: Any = None  # the DeviceMesh of all ranks when sharded

    @classmethod
    def create(cls, pass_name: str, device: str, precision: str, grad_checkpoint: bool,
               shard: str = "none") -> TrainingRuntime:
        """Resolve the options and, under ``torchrun`` with WORLD_SIZE > 1, join (or start)
        the process group: gloo on the CPU, nccl on CUDA. ``shard=fsdp2`` needs that group."""
        check_device_text(pass_name, device)
        check_precision_text(pass_name, precision)
        check_shard_text(pass_name, shard)
        world, rank, local_rank = _world_from_environment()
        if shard == "fsdp2":
            if world < 2:
                raise PassError(f"{pass_name}: shard=fsdp2 shards the model over the processes of "
                                f"a torchrun launch, and this is one process (WORLD_SIZE={world})",
                                hint="torchrun --nproc-per-node N -m lorashear.cli ..., or shard=none")
            if precision == "fp16":
                raise PassError(f"{pass_name}: shard=fsdp2 does not train in fp16 (its loss "
                                "scaler is not sharded)", hint="use precision=bf16 (or fp32)")
        resolved = _resolve_device(pass_name, device, precision, local_rank if world > 1 else None,
                                   "trains")
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        if world > 1:
            import torch.distributed as dist

            if not dist.is_available():
                raise PassError(f"{pass_name}: WORLD_SIZE={world} but this torch has no "
                                "torch.distributed")
            if not dist.is_initialized():
                dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
            world, rank = dist.get_world_size(), dist.get_rank()
        scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        mesh = None
        if shard == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(resolved.type, (world,))
        return cls(pass_name, resolved, precision, grad_checkpoint, world, rank, scaler, shard, mesh)

    # --- who does what -----------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded over the ranks (``shard=fsdp2``)."""
        return self.shard == "fsdp2"

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, logs, bars and outputs."""
        return self.rank == 0

    def seed(self, seed: int) -> None:
        """Seed the global torch RNG (LoRA dropout). Rank 0 uses ``seed`` itself, so one
        process sees exactly the stream it saw before; other ranks get streams of their own
        (their slices would otherwise share dropout masks)."""
        torch.manual_seed(seed if self.rank == 0 else seed + 7_919 * self.rank)

    # --- the model ---------------------------------------------------------------------------
    def build_model(self, module: Module, *, trainable: bool = True,
                    also_train: frozenset[str] = frozenset()) -> IRModel:
        """``module`` on the device. With bf16/fp16 the frozen base weights load in that dtype
        while the LoRA factors, the ``also_train`` parameters and buffers (rotary frequencies)
        keep their IR dtype, so the optimizer updates fp32 tensors."""
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        keep = (lora_param_names(module) | also_train
                | {p.name for p in module.params.values() if p.buffer}
                if dtype is not None else frozenset())
        if self.sharded:
            return self._sharded_model(module, dtype, keep, trainable)
        model = IRModel(module, device=self.device if self.device.type != "cpu" else None,
                        dtype=dtype, keep_dtype=keep, gradient_checkpointing=self.grad_checkpoint)
        return model.train() if trainable else model.eval().requires_grad_(False)

    def _sharded_model(self, module: Module, dtype: torch.dtype | None, keep: frozenset[str],
                       trainable: bool) -> IRModel:
        """The model sharded with FSDP2 over the mesh, each decoder layer its own group and the
        rest the model's, without ever holding it whole: built on the meta device, sharded,
        then each rank's rows of every parameter read from the IR's storage one tensor at a
        time (the device holds only shards; the host one whole tensor at a time). Every group
        frees its gathered parameters after its forward (the model's too: a pass reads and
        writes shards between steps, never a stale gathered copy)."""
        from torch.distributed.fsdp import fully_shard

        model = IRModel(module, device="meta", dtype=dtype, keep_dtype=keep,
                        gradient_checkpointing=self.grad_checkpoint)
        model = model.train() if trainable else model.eval().requires_grad_(False)
        for layer in model.call_layers().values():
            fully_shard(layer, mesh=self.mesh, reshard_after_forward=True)
        fully_shard(model, mesh=self.mesh, reshard_after_forward=True)
        model.to_empty(device=self.device)
        with torch.no_grad():
            for param in module.params.values():
                local, start = local_rows_of(model.tensor(param.name))
                data = IRModel._load(param, None, None)  # the checks of an unsharded build
                local.copy_(data[start:start + local.shape[0]] if data.dim() else data)
        return model

    @property
    def placement(self) -> Placement:
        """Where analyses inside the training pass (group scoring) run: the runtime's device
        and precision."""
        return Placement(self.device, _AUTOCAST_DTYPES.get(self.precision))

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast of forward and loss for bf16/fp16 on CUDA; nothing for fp32."""
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.device.type == "cpu" else tensor.to(self.device, non_blocking=True)

    # --- data parallelism --------------------------------------------------------------------
    def check_batch(self, batch: int) -> None:
        """A global batch must split evenly over the ranks."""
        if batch % self.world_size:
            raise PassError(f"{self.pass_name}: batch={batch} does not split over {self.world_size} "
                            "data-parallel processes", hint=f"use a batch divisible by {self.world_size}")

    def local_rows(self, rows: int) -> slice:
        """This rank's contiguous share of a global batch of ``rows`` rows."""
        self.check_batch(rows)
        share = rows // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def local(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each tensor's local rows (all rows in one process), moved to the device."""
        if self.distributed:
            rows = self.local_rows(len(tensors[0]))
            tensors = tuple(t[rows] for t in tensors)
        return tuple(self.to_device(t) for t in tensors)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
             params: Sequence[torch.nn.Parameter], share: float = 1.0) -> float:
        """Backward, gradient reduction and the optimizer step; returns the global loss.

        ``loss`` is this rank's mean over its own tokens and ``share`` its tokens' fraction of
        the global batch's, so the global mean loss is ``sum_r share_r * loss_r`` and so is its
        gradient: each rank scales its gradients by its share and an all-reduce sums them. A
        rank with no tokens (``share == 0``, its loss a NaN mean over nothing) adds zeros."""
        optimizer.zero_grad(set_to_none=True)
        if self.sharded:
            return self._sharded_step(loss, optimizer, share)
        if not self.distributed:
            if self.scaler is None:
                loss.backward()
                optimizer.step()
            else:
                self.scaler.scale(loss).backward()
                self.scaler.step(optimizer)
                self.scaler.update()
            return loss.item()
        import torch.distributed as dist

        if share > 0:
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        local_loss = loss.detach().float() * share if share > 0 else torch.zeros((), device=self.device)
        flat = torch.cat([g.flatten().float() for g in grads] + [local_loss.view(1).to(self.device)])
        if share != 1.0:
            flat[:-1].mul_(share)
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset:offset + g.numel()].view_as(p).to(p.dtype)
            offset += g.numel()
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()
        return float(flat[-1])

    def _sharded_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, share: float) -> float:
        """FSDP2's step: the backward reduce-scatters each gradient as the mean over ranks, so
        each rank's loss is weighted by ``share * world_size`` before it; every rank runs the
        backward (the reduce-scatters are collectives), so a pass gives a rank without tokens a
        finite zero loss over its forward."""
        import torch.distributed as dist

        weight = share * self.world_size
        (loss if weight == 1.0 else loss * weight).backward()
        optimizer.step()
        total = (loss.detach().float() * share if share > 0
                 else torch.zeros((), device=self.device)).reshape(1).to(self.device)
        dist.all_reduce(total)
        return float(total)

    def masks_on_shards(self) -> contextlib.AbstractContextManager:
        """Sharded: let a whole plain tensor (a keep mask) act on a sharded parameter as a
        replicated one (DTensor's implicit replication: each rank applies its rows of it), as
        ``units_zeroed`` does; nothing otherwise."""
        if not self.sharded:
            return contextlib.nullcontext()
        from torch.distributed.tensor.experimental import implicit_replication

        return implicit_replication()

    def sum_over_ranks(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place (per-group partial sums of sharded weights)."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor)

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (saliency scores, probe losses): decisions that
        steer training must be the same everywhere, even where float reductions are not."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def sync_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's, in place. CUDA reductions with atomics (the
        Triton projection) may round differently per rank; a resync at period ends and
        checkpoints keeps such last-bit drift from outliving a period."""
        if not self.distributed:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in tensors:
                if self.sharded and is_sharded(tensor):  # one rank owns each shard: nothing to drift apart
                    continue
                dist.broadcast(tensor.data, src=0)

    # --- checkpoints -------------------------------------------------------------------------
    def rng_tensors(self) -> dict[str, torch.Tensor]:
        """Every rank's torch RNG state as checkpoint tensors (``rng.torch.rank<r>``), gathered
        on all ranks; rank 0's is saved as ``rng.torch`` by the checkpoint code itself."""
        if not self.distributed:
            return {}
        import torch.distributed as dist

        states: list[Any] = [None] * self.world_size
        dist.all_gather_object(states, torch.get_rng_state())
        return {f"rng.torch.rank{r}": s for r, s in enumerate(states) if r > 0}

    def restore_rng(self, tensors: dict[str, torch.Tensor], seed: int, step: int) -> None:
        """Rank r > 0 continues its own RNG stream from a checkpoint (``load_checkpoint``
        restored rank 0's on every rank); a checkpoint of another world size has none for it,
        and the rank reseeds from (seed, step, rank), deterministically."""
        if self.rank == 0:
            return
        state = tensors.get(f"rng.torch.rank{self.rank}")
        if state is not None:
            torch.set_rng_state(state)
        else:
            torch.manual_seed(seed + 7_919 * self.rank + 1_000_003 * step)

    def progress(self, wanted: bool) -> bool:
        """Whether to show a progress bar: asked for, and this is rank 0."""
        return wanted and self.is_main


def tensors_of(model: IRModel, names: Iterable[str]) -> Iterator[torch.Tensor]:
    """The live tensors of IR parameters ``names``, in sorted name order (the same on every rank)."""
    for name in sorted(names):
        yield model.tensor(name)
