"""The ``knowledge`` attribute: the knowledge-distribution analysis's result (per-family loss
increases, the protected families, the spread) and how allocation reads it.
"""


from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from lorashear.analysis.groups import GroupFamily
from lorashear.ir.attributes import Attribute, register_attribute
from lorashear.ir.core import Module


@register_attribute
@dataclass(frozen=True)
class KnowledgeAttr(Attribute):
    """Loss increase when each family is removed whole, and the families kept unprunable."""

    kind: ClassVar[str] = "knowledge"
    base_loss: float
    loss_increase: tuple[tuple[int, float], ...]
    protected: tuple[int, ...]
    spread: float = 0.0

    def share_weights(self, families: Iterable[GroupFamily]) -> dict[int, float]:
        """Each family's multiplier of its kind's pruning share: ``1 + spread`` for the least
        sensitive unprotected family of a kind down to ``1 - spread`` for the most sensitive,
        linear in rank (ties broken by family id), so a kind of equal-size families keeps its
        total. 1.0 when ``spread`` is 0, and for families protected or not analysed."""
        families = list(families)
        weights = {f.id: 1.0 for f in families}
        if not self.spread:
            return weights
        increase, protected = dict(self.loss_increase), set(self.protected)
        by_kind: dict[str, list[int]] = {}
        for f in families:
            if f.id in increase and f.id not in protected:
                by_kind.setdefault(f.kind, []).append(f.id)
        for ids in by_kind.values():
            ranked = sorted(ids, key=lambda f: (increase[f], f))  # least sensitive first
            for rank, f in enumerate(ranked):
                position = rank / (len(ranked) - 1) if len(ranked) > 1 else 0.5
                weights[f] = 1.0 + self.spread * (1.0 - 2.0 * position)
        return weights

    def to_json(self) -> Any:
        data = {"base_loss": self.base_loss, "loss_increase": {str(f): d for f, d in self.loss_increase},
                "protected": list(self.protected)}
        if self.spread:  # analyses from before spread existed read back unchanged
            data["spread"] = self.spread
        return data

    @classmethod
    def from_json(cls, data: Any) -> KnowledgeAttr:
        if not isinstance(data, dict):
            raise ValueError("knowledge must be a JSON object")
        increase = tuple(sorted((int(k), float(v)) for k, v in data["loss_increase"].items()))
        return cls(float(data["base_loss"]), increase, tuple(int(f) for f in data["protected"]),
                   float(data.get("spread", 0.0)))


def protected_families(module: Module) -> set[int]:
    """Family ids a knowledge analysis marked unprunable (none if it did not run)."""
    attr = module.attributes.get("knowledge")
    return set(attr.protected) if isinstance(attr, KnowledgeAttr) else set()


def allocation_weights(module: Module, families: Iterable[GroupFamily]) -> dict[int, float]:
    """The module's knowledge analysis's :meth:`KnowledgeAttr.share_weights` for ``families``
    (1.0 each when no analysis ran)."""
    attr = module.attributes.get("knowledge")
    if isinstance(attr, KnowledgeAttr):
        return attr.share_weights(families)
    return {f.id: 1.0 for f in families}


