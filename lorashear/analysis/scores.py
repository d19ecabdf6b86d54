"""The ``saliency`` attribute: one score per removable group, by family, and how it was made.

Kept apart from the scoring code so that the parser, the printer and later passes (``prune``,
``lhspg``) can read scores without importing any of the torch work that produced them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from lorashear.ir.attributes import Attribute, register_attribute


@register_attribute
@dataclass(frozen=True)
class SaliencyAttr(Attribute):
    """Scores of every unit of every group family (higher = more important), by family id.

    Printed as ``{"metric": "taylor", "scores": {"0": [...], "1": [...]}}``. ``scores`` holds
    one float per unit of the family, in unit order; families are those of the ``groups``
    attribute the scores were computed from.
    """

    kind: ClassVar[str] = "saliency"
    metric: str
    scores: tuple[tuple[int, tuple[float, ...]], ...]

    def as_dict(self) -> dict[int, tuple[float, ...]]:
        return dict(self.scores)

    @classmethod
    def from_dict(cls, metric: str, scores: dict[int, Any]) -> SaliencyAttr:
        """Build from ``{family_id: sequence of floats}`` (a tensor or a list per family)."""
        return cls(metric, tuple(sorted((int(family), tuple(float(s) for s in values))
                                        for family, values in scores.items())))

    def matches(self, family_sizes: dict[int, int]) -> str | None:
        """Why these scores do not fit groups of the given sizes, or None when they do."""
        mine = self.as_dict()
        if set(mine) != set(family_sizes):
            return (f"the scores cover {len(mine)} families, the groups have {len(family_sizes)}")
        for family, size in sorted(family_sizes.items()):
            if len(mine[family]) != size:
                return f"family {family} has {len(mine[family])} scores for {size} groups"
        return None

    def to_json(self) -> Any:
        return {"metric": self.metric, "scores": {str(f): list(values) for f, values in self.scores}}

    @classmethod
    def from_json(cls, data: Any) -> SaliencyAttr:
        if not isinstance(data, dict) or not isinstance(data.get("metric"), str) \
                or not isinstance(data.get("scores"), dict):
            raise ValueError("saliency must be a JSON object {metric: str, scores: {family: [floats]}}")
        scores: dict[int, list[float]] = {}
        for key, values in data["scores"].items():
            if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
                raise ValueError(f"saliency scores of family {key} must be a list of numbers")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"saliency scores of family {key} must be finite")
            scores[int(key)] = values
        return cls.from_dict(data["metric"], scores)
