"""Typed attributes for removable groups and what has been removed.

A *family* is one channel space found by the dimension-coupling analysis (the KV heads of
layer 3, the MLP channels of layer 3, the hidden channels): ``size`` units, each a minimally
removable group. Every member is a parameter axis on which the family is one factor of a
mixed-radix index: index ``r`` of that axis belongs to unit ``(r // stride) % size``. That
form prints compactly (a hidden family touches every layer) and slices exactly. A member may
cover only a range ``[start, stop)`` of its axis: a fused projection whose output is cut into
pieces of unequal widths (Phi-3's ``qkv_proj`` into q | k | v) has each piece's units on its
own rows; the indices outside the range belong to no unit of that family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lorashear.ir.attributes import Attribute, register_attribute

KINDS = ("attn", "mlp", "hidden", "other", "expert")


def check_kinds(pass_name: str, kinds: tuple[str, ...]) -> None:
    """A pass's ``kinds=`` option: non-empty, every entry a known group kind."""
    from lorashear.errors import PassError

    if not kinds or any(k not in KINDS for k in kinds):
        raise PassError(f"{pass_name} kinds must be among {', '.join(KINDS)}, "
                        f"got {','.join(kinds) or 'none'}")


@dataclass(frozen=True)
class FamilyMember:
    """Parameter axis ``axis`` of ``param``: index r in ``[start, stop)`` is in unit
    ``((r - start) // stride) % family.size`` (``stop`` None: the axis' end)."""

    param: str
    axis: int
    stride: int
    start: int = 0
    stop: int | None = None

    def in_range(self, length: int) -> torch.Tensor:
        """Which indices along the axis (``length`` long) this member covers."""
        index = torch.arange(length)
        return (index >= self.start) & (index < (length if self.stop is None else self.stop))

    def unit_of(self, length: int, size: int) -> torch.Tensor:
        """Unit id of every index along this axis (``length`` = the axis length); -1 outside
        the member's range."""
        units = ((torch.arange(length) - self.start) // self.stride) % size
        return torch.where(self.in_range(length), units, -1)

    def covered(self, length: int) -> int:
        """How many indices of the axis the member covers."""
        return (length if self.stop is None else min(self.stop, length)) - self.start

    def to_json(self) -> list[Any]:
        whole = self.start == 0 and self.stop is None
        return [self.param, self.axis, self.stride] + ([] if whole else [self.start, self.stop])

    @classmethod
    def from_json(cls, data: Any) -> FamilyMember:
        param, axis, stride, *bounds = data
        start, stop = bounds if bounds else (0, None)
        return cls(str(param), int(axis), int(stride), int(start), None if stop is None else int(stop))

    def indices(self, length: int, size: int, units) -> torch.Tensor:
        """Indices along the axis that belong to any of ``units``."""
        units = torch.as_tensor(sorted(units), dtype=torch.long)
        return torch.nonzero(torch.isin(self.unit_of(length, size), units)).flatten()


@dataclass(frozen=True)
class GroupFamily:
    """A set of ``size`` removable groups sharing one channel space."""

    id: int
    kind: str
    layer: int | None
    size: int
    members: tuple[FamilyMember, ...]

    def to_json(self) -> Any:
        return {"id": self.id, "kind": self.kind, "layer": self.layer, "size": self.size,
                "members": [m.to_json() for m in self.members]}

    @classmethod
    def from_json(cls, data: Any) -> GroupFamily:
        kind = data["kind"]
        if kind not in KINDS:
            raise ValueError(f"unknown group kind {kind!r}")
        members = tuple(FamilyMember.from_json(m) for m in data["members"])
        return cls(int(data["id"]), kind, None if data["layer"] is None else int(data["layer"]),
                   int(data["size"]), members)


@register_attribute
@dataclass(frozen=True)
class GroupsAttr(Attribute):
    """The removable groups of a module (made by ``discover``), and what cannot be pruned."""

    kind: ClassVar[str] = "groups"
    families: tuple[GroupFamily, ...]
    #: parameter axes that no family may touch, with the reason: (param, axis, reason)
    unprunable: tuple[tuple[str, int, str], ...] = ()

    def family(self, family_id: int) -> GroupFamily:
        return self.families[family_id]

    def to_json(self) -> Any:
        return {"families": [f.to_json() for f in self.families],
                "unprunable": [list(u) for u in self.unprunable]}

    @classmethod
    def from_json(cls, data: Any) -> GroupsAttr:
        families = tuple(GroupFamily.from_json(f) for f in data["families"])
        for i, f in enumerate(families):
            if f.id != i:
                raise ValueError(f"family ids must be 0..n-1 in order, found {f.id} at {i}")
        return cls(families, tuple((str(p), int(a), str(r)) for p, a, r in data.get("unprunable", [])))


@register_attribute
@dataclass(frozen=True)
class PruneMaskAttr(Attribute):
    """The units chosen for removal, per family id (zeroed in the masked model)."""

    kind: ClassVar[str] = "prune-mask"
    removed: tuple[tuple[int, tuple[int, ...]], ...]

    def as_dict(self) -> dict[int, tuple[int, ...]]:
        return dict(self.removed)

    @classmethod
    def from_dict(cls, removed: dict[int, Any]) -> PruneMaskAttr:
        return cls(tuple(sorted((int(f), tuple(sorted(int(u) for u in units)))
                                for f, units in removed.items() if len(units))))

    def to_json(self) -> Any:
        return {str(f): list(units) for f, units in self.removed}

    @classmethod
    def from_json(cls, data: Any) -> PruneMaskAttr:
        if not isinstance(data, dict):
            raise ValueError("prune-mask must be a JSON object {family: [units]}")
        return cls.from_dict({int(k): v for k, v in data.items()})


def param_units_numel(module, family: GroupFamily) -> int:
    """Parameters one unit of ``family`` holds (each member axis' share of its param)."""
    total = 0
    for m in family.members:
        shape = module.params[m.param].type.shape
        if shape:
            numel = int(torch.tensor(shape).prod().item())
            total += numel // shape[m.axis] * m.covered(shape[m.axis]) // family.size
    return total
