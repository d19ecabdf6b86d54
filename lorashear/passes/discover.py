"""`discover`: find the minimally removable groups and record them as a typed attribute."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

from lorashear.analysis.coupling import CouplingResult, DimensionCoupling
from lorashear.analysis.groups import FamilyMember, GroupFamily, GroupsAttr
from lorashear.analysis.manager import AnalysisManager
from lorashear.ir.core import Module
from lorashear.passes.base import ModulePass, PassResult
from lorashear.passes.registry import register_pass


def groups_from_coupling(coupling: CouplingResult) -> GroupsAttr:
    """The coupling's families as the typed ``groups`` attribute (family ids in order)."""
    families = tuple(
        GroupFamily(i, f.kind, f.layer, f.size,
                    tuple(FamilyMember(m.param, m.axis, m.stride, m.start, m.stop) for m in f.members))
        for i, f in enumerate(coupling.families))
    return GroupsAttr(families, tuple(coupling.unprunable))


def summarize_groups(module: Module, groups: GroupsAttr) -> str:
    """A table of the groups by kind and layer, with the parameters one group holds."""
    from lorashear.analysis.groups import param_units_numel

    rows: dict[tuple[str, object], list[int]] = {}
    for f in groups.families:
        entry = rows.setdefault((f.kind, f.layer), [0, 0, 0])
        entry[0] += 1
        entry[1] += f.size
        entry[2] += param_units_numel(module, f) * f.size
    lines = ["kind    layer  families  groups  params/group  params",
             "------  -----  --------  ------  ------------  ------"]
    for (kind, layer), (nf, ng, params) in sorted(rows.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])):
        lines.append(f"{kind:<6}  {'all' if layer is None else layer:>5}  {nf:>8}  {ng:>6}  "
                     f"{params // max(ng, 1):>12,}  {params:>,}")
    reasons = Counter(reason.split(" at ")[0] for _, _, reason in groups.unprunable)
    lines.append(f"unprunable parameter axes: {len(groups.unprunable)}")
    for reason, count in reasons.most_common():
        lines.append(f"  {count:>4} x {reason}")
    return "\n".join(lines)


@register_pass
@dataclass(frozen=True)
class Discover(ModulePass):
    """Find minimally removable groups (KV heads, MLP channels, hidden channels) incl. LoRA."""

    name: ClassVar[str] = "discover"

    def run(self, module: Module, am: AnalysisManager) -> PassResult:
        groups = groups_from_coupling(am.get(DimensionCoupling))
        if module.attributes.get("groups") == groups:
            return PassResult.unchanged()
        module.attributes["groups"] = groups
        counts = Counter(f.kind for f in groups.families for _ in range(f.size))
        return PassResult(True, frozenset({DimensionCoupling}),
                          {f"{k} groups": n for k, n in sorted(counts.items())})
