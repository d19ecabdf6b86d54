"""Where and in what precision an analysis runs the model: one :class:`Placement` that every
pass which runs the model without training it (``saliency``, ``knowledge``, ``prune``'s split
search, ``reconstruct``, ``lhspg``'s group scoring) builds its executor, moves its batches and
reads its weights through.

A pass resolves its ``device``/``precision`` options into a placement
(:func:`lorashear.training.runtime.resolve_placement`, the same rules as the training passes)
and hands it down; this layer only sees a ``torch.device`` and a dtype. The default placement
(CPU, fp32) makes exactly the calls the passes made before placements existed, so CPU results
are bitwise what they were.

``dtype`` (bf16/fp16, CUDA only) is what ``lhspg``/``recover`` do with the same precision: the
frozen base weights load in that dtype, LoRA factors and buffers (rotary frequencies) keep
their IR dtype, and forwards run under autocast.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorashear.errors import ModelLoadError, first_line
from lorashear.ir.core import Module, Param
from lorashear.ir.fingerprint import ensure_unchanged
from lorashear.ir.storage import _SAFETENSORS_DTYPES, FileStorage
from lorashear.ir.types import torch_dtype
from lorashear.runtime.executor import IRModel, lora_param_names


@dataclass(frozen=True)
class Placement:
    """A resolved device and run dtype (None: the IR's own, fp32)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype | None = None

    @property
    def is_default(self) -> bool:
        """CPU in the IR's dtypes: what every analysis did before it had a placement."""
        return self.device.type == "cpu" and self.dtype is None

    def keep_dtype(self, module: Module) -> frozenset[str]:
        """Parameters that keep their IR dtype under a low precision: LoRA factors and buffers."""
        if self.dtype is None:
            return frozenset()
        return frozenset(lora_param_names(module) | {p.name for p in module.params.values() if p.buffer})

    def model(self, module: Module) -> IRModel:
        """``module`` as an executor on the device in eval mode (on the default placement, the
        very call of ``emit_torch(module)``)."""
        device = None if self.device.type == "cpu" else self.device
        return IRModel(module, device=device, dtype=self.dtype,
                       keep_dtype=self.keep_dtype(module)).eval()

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast of the forward in the low precision; nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the device (the same tensor on the CPU)."""
        return tensor if self.device.type == "cpu" else tensor.to(self.device)

    def param_loader(self, module: Module, *, by_reference: bool = False
                     ) -> Callable[[Param], torch.Tensor]:
        """``load(param)``: the parameter's data on the device in the run dtype. With
        ``by_reference`` a safetensors-backed parameter is read with plain file reads (no
        memory map stays behind, :func:`read_stored`), for walks that hold one layer at a time."""
        keep = self.keep_dtype(module)

        def load(param: Param) -> torch.Tensor:
            tensor = read_stored(param) if by_reference else param.storage.load()
            if self.dtype is not None and param.name not in keep and tensor.is_floating_point():
                return tensor.to(device=self.device, dtype=self.dtype)
            return self.to_device(tensor)
        return load

    def param_bytes(self, module: Module) -> int:
        """Bytes of the module's parameters in the run dtype (what a whole model occupies)."""
        keep = self.keep_dtype(module)
        total = 0
        for param in module.params.values():
            dtype = torch_dtype(param.type.dtype)
            if self.dtype is not None and param.name not in keep and dtype.is_floating_point:
                dtype = self.dtype
            numel = 1
            for size in param.type.shape:
                numel *= int(size)
            total += numel * dtype.itemsize
        return total

    def free_bytes(self) -> int:
        """Memory free on the device now: CUDA's free memory, or the CPU's available RAM."""
        if self.device.type == "cuda":
            return int(torch.cuda.mem_get_info(self.device)[0])
        return available_ram()


def available_ram() -> int:
    """``MemAvailable`` of /proc/meminfo (bytes); elsewhere the physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def read_stored(param: Param) -> torch.Tensor:
    """The parameter's stored tensor on the CPU. One held in a safetensors file is read with
    ``pread`` into fresh memory: no memory map of the file stays resident in the process, so a
    walk that frees each layer after use holds one layer, not the file's pages it has touched."""
    storage = param.storage
    if not isinstance(storage, FileStorage):
        return storage.load()
    if not os.path.exists(storage.path):
        raise ModelLoadError(f"weights file {storage.path} (for tensor {storage.key!r}) does not exist")
    if storage.fingerprint is not None:
        ensure_unchanged(storage.path, storage.fingerprint)
    try:
        with open(storage.path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            entry = json.loads(file.read(length))[storage.key]
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            start, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=dtype)
            raw = tensor.reshape(-1).view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)
            if raw.numel() != end - start:
                raise ValueError(f"{end - start} bytes stored for {raw.numel()}")
            file.seek(8 + length + start)
            if file.readinto(memoryview(raw.numpy())) != end - start:
                raise ValueError("the file ends early")
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise ModelLoadError(f"cannot read tensor {storage.key!r} from {storage.path}: "
                             f"{first_line(exc)}") from None
    return tensor
