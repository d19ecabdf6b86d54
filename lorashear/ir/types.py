"""Value types of the IR: element types and (possibly symbolic) tensor shapes.

A dimension is either a concrete ``int`` or a symbolic size written as a name (``B``, ``S``)
or a small arithmetic expression over names (``S+1``). Symbolic sizes come from the dynamic
batch and sequence axes of the lowered model; channel axes, the ones pruning changes, are
always concrete.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lorashear.ir.dims import evaluate, parse_dim

Dim = int | str

#: IR element type names and their torch dtypes. The names are what the text form prints.
DTYPES: dict[str, torch.dtype] = {
    "f64": torch.float64,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "i64": torch.int64,
    "i32": torch.int32,
    "i16": torch.int16,
    "i8": torch.int8,
    "u8": torch.uint8,
    "bool": torch.bool,
    "c64": torch.complex64,
}
_TORCH_TO_NAME = {v: k for k, v in DTYPES.items()}

_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def dtype_name(dtype: torch.dtype) -> str:
    """The IR name of a torch dtype (``torch.float32`` -> ``"f32"``)."""
    try:
        return _TORCH_TO_NAME[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no IR name") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of an IR element type name (``"bf16"`` -> ``torch.bfloat16``)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown element type {name!r}; known: {', '.join(DTYPES)}") from None


def is_symbol_name(text: str) -> bool:
    return _SYMBOL.fullmatch(text) is not None


def evaluate_dim(dim: Dim, bindings: dict[str, int]) -> int:
    """Evaluate a dimension under concrete values of its symbols (``"S+1"``, {S: 7} -> 8).

    Symbolic sizes are parsed by :mod:`lorashear.ir.dims` (integers, names, ``+ - * //``,
    parentheses; bounded), never handed to ``eval``. Raises ``ValueError`` when malformed."""
    if isinstance(dim, int):
        return dim
    node = parse_dim(dim)
    missing = node.symbols() - bindings.keys()
    if missing:
        raise ValueError(f"symbolic dimension {dim!r} uses unbound size(s) {sorted(missing)}")
    return evaluate(node, bindings)


@dataclass(frozen=True)
class TensorType:
    """A tensor's element type and shape; symbolic dimensions are strings."""

    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown element type {self.dtype!r}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> int:
        if not self.is_static:
            raise ValueError(f"tensor type {self} has symbolic dimensions")
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    def with_shape(self, shape: tuple[Dim, ...]) -> TensorType:
        return TensorType(self.dtype, tuple(shape))

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(format_dim(d) for d in self.shape)}]"


@dataclass(frozen=True)
class SymIntType:
    """A scalar integer known only at run time (a symbolic size such as the sequence length)."""

    def __str__(self) -> str:
        return "sym"


ValueType = TensorType | SymIntType
SYM = SymIntType()


def format_dim(dim: Dim) -> str:
    if isinstance(dim, int):
        return str(dim)
    return dim if is_symbol_name(dim) else f'"{dim}"'
