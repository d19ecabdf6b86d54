"""Whole experts of a Mixture-of-Experts layer as removable groups.

Lowering (:mod:`lorashear.frontend.moe`) gives every router a buffer ``<router>.expert_mask``
of ones whose log is added to the router's logits, and runs every expert on every token
weighted by its column of the routing matrix (the router's top-k weights scattered into
``[tokens, experts]``). The expert axis is pinned by the coupling rules (the router's softmax
and top-k use it whole, the scatter writes at data-dependent positions), yet one expert is
still an exact unit: masking it zeroes its router row and its mask entry, so its logit is
``-inf``, its probability an exact zero and no token chooses it; removing it (``compress``)
deletes the router row, the mask entry, the expert's parameters and its term of the sum,
which leaves the softmax over the other experts and their top-k as they were.

:func:`couple_experts` identifies the routing matrix's expert axis with the router's (the
scatter's zeros are made with a literal size, not from the logits), so ``compress`` shrinks
both; :func:`expert_families` turns each router's expert axis into a family of kind
``expert``, its members every parameter axis on it (router rows, mask, a LoRA ``B``'s rows).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from lorashear.frontend.moe import EXPERT_MASK
from lorashear.ir.core import Value

if TYPE_CHECKING:
    from lorashear.analysis.coupling import CouplingBuilder, CouplingResult
    from lorashear.analysis.groups import GroupFamily
    from lorashear.ir.core import Module


def _block_of(mask_name: str) -> str:
    """``model.layers.0.mlp.gate.expert_mask`` -> ``model.layers.0.mlp``."""
    return mask_name.rsplit(".", 2)[0]


def expert_masks(builder: CouplingBuilder) -> list:
    return [p for name, p in builder.module.params.items() if name.endswith(f".{EXPERT_MASK}")
            and len(p.type.shape) == 1]


def couple_experts(builder: CouplingBuilder) -> None:
    """Unify the expert axis of each block's routing ``scatter`` (its zeros and its result)
    with the router's, the mask's axis."""
    masks = expert_masks(builder)
    if not masks:
        return
    for op in builder.module.graph.ops:
        if op.kind not in ("scatter", "scatter_add"):
            continue
        for mask in masks:
            if not op.loc.startswith(_block_of(mask.name) + "."):
                continue
            a = op.bound_args()
            target, out = a["self"], op.results[0]
            dim = a["dim"] % len(out.type.shape)
            axis = builder.desc(mask)[0]
            why = f"{builder.where(op)} routes to the experts of {mask.name}"
            builder.fs.unify(builder.desc(out)[dim], axis, why)
            if hasattr(target, "type"):
                builder.fs.unify(builder.desc(target)[dim], axis, why)


def expert_families(builder: CouplingBuilder, result: CouplingResult) -> None:
    """Append a family of kind ``expert`` per router (see the module docstring), and drop its
    members from the unprunable axes the softmax and top-k pinned."""
    from lorashear.analysis.coupling import CouplingFamily, CouplingMember, _layer_of

    fs = builder.fs
    for mask in expert_masks(builder):
        if id(mask) not in builder.axes:
            continue
        leaves = [fs.find(x) for f in builder.axes[id(mask)][0] for x in fs.leaves(f)]
        if len(leaves) != 1 or leaves[0] in result.family_of_leaf:
            continue
        leaf = leaves[0]
        members = []
        for p in builder.module.params.values():
            for axis, desc in enumerate(builder.axes.get(id(p), [])):
                if [fs.find(x) for f in desc for x in fs.leaves(f)] == [leaf]:
                    members.append(CouplingMember(p.name, axis, 1))
        on_leaf = {(m.param, m.axis) for m in members}
        result.unprunable = [u for u in result.unprunable if (u[0], u[1]) not in on_leaf]
        result.family_of_leaf[leaf] = len(result.families)
        result.families.append(CouplingFamily(leaf, "expert", _layer_of(mask.name), fs.size[leaf], members))


def experts_chosen(module: Module, families: Iterable[GroupFamily]) -> dict[int, int]:
    """How many experts of each ``expert`` family in ``families`` a token is routed to, by
    family id: the largest ``k`` of the top-k ops in the block of its router's mask that rank
    that many entries along their last axis (0 where none does). Pruning must keep at least
    that many, or the top-k has too few to choose from (``compress`` refuses such a removal).
    One walk over the graph serves every family."""
    blocks = {f.id: {_block_of(m.param) for m in f.members if m.param.endswith(f".{EXPERT_MASK}")}
              for f in families if f.kind == "expert"}
    sizes = {f.id: f.size for f in families if f.kind == "expert"}
    chosen = dict.fromkeys(blocks, 0)
    if not blocks:
        return chosen
    for op in module.graph.ops:
        if op.kind != "topk":
            continue
        a = op.bound_args()
        scores = a["self"]
        if not isinstance(scores, Value) or not scores.type.shape or not isinstance(a["k"], int):
            continue
        ranked = scores.type.shape[a["dim"] % len(scores.type.shape)]
        for family_id, family_blocks in blocks.items():
            if ranked == sizes[family_id] and any(op.loc == b or op.loc.startswith(b + ".") for b in family_blocks):
                chosen[family_id] = max(chosen[family_id], a["k"])
    return chosen
