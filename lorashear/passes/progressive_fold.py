"""The least-squares fold of ``reconstruct``, spread over LHSPG's shrink (``lhspg{reconstruct=true}``).

LHSPG removes a group's consumer columns ``E_R`` (``o_proj`` inputs of a head, ``down_proj``
inputs of an MLP channel) a little at every step of its period's shrink and forces the rest to
zero at the shrink's last step. Folding only at that forced zeroing folds what is left then,
which the shrink has already taken down to about one step's share: nothing to speak of. Here
every step's removal is folded as it happens: with ``T = H_RK (H_KK + lambda I)^-1`` solved
once per period from the consumer's input gram ``H = X^T X`` on the calibration windows (the
live model at the period's start: trained LoRA, earlier groups at zero), a step that takes
the removed columns from ``E_R`` to ``E_R'`` adds ``(E_R - E_R') @ T`` to the kept columns.
Summed over the shrink, the kept columns receive exactly the least-squares fold of everything
the shrink removed, LoRA's merged updates included; the model's output on the calibration
text moves only by what the least squares leaves, and LoRA trains on a model that keeps what
the shrink takes away.

``E = W + s * B @ A`` is the effective weight, as in ``reconstruct``; the correction goes
into the base weight ``W_K``. Rows of units removed in earlier periods (a removed hidden
channel is a row of ``o_proj``) get no correction, so they stay zero and the masked model
still equals the compressed one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lorashear.analysis.groups import GroupsAttr
from lorashear.analysis.masking import keep_masks
from lorashear.analysis.saliency import input_gram_matrices, lora_updates
from lorashear.ir.core import Module
from lorashear.passes.reconstruct import consumers, error_left, fold_operator


@dataclass
class FoldTarget:
    """One consumer's live base weight ``[out, in]``, its removed columns R and kept columns K
    (index tensors on the weight's device), the operator ``T`` ([|R|, |K|]), the rows that may
    change, and its LoRA factors ``(A, B, scaling)`` if it has them."""

    weight: torch.Tensor
    removed: torch.Tensor
    kept: torch.Tensor
    operator: torch.Tensor
    rows: torch.Tensor  # bool [out]: False on rows of units removed already
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None

    def removed_part(self) -> torch.Tensor:
        """``E_R = W_R + s * B @ A_R`` ``[out, |R|]``, in the operator's dtype."""
        dtype = self.operator.dtype
        part = self.weight[:, self.removed].to(dtype)
        if self.lora is not None:
            a, b, scaling = self.lora
            part = part + scaling * (b.to(dtype) @ a[:, self.removed].to(dtype))
        return part

    def fold(self, before: torch.Tensor) -> None:
        """Add what left ``E_R`` since ``before`` (its :meth:`removed_part` then), times ``T``,
        to the kept columns."""
        delta = ((before - self.removed_part()) @ self.operator) * self.rows[:, None]
        self.weight.index_add_(1, self.kept, delta.to(self.weight.dtype))


@dataclass
class ProgressiveFold:
    """The fold targets of one LHSPG period and the share of the calibration output error the
    whole fold leaves, measured on ``E_R`` at the period's start (after / before)."""

    targets: list[FoldTarget]
    error_left: float

    @classmethod
    def prepare(cls, model: Any, module: Module, groups: GroupsAttr,
                removed: dict[int, tuple[int, ...]], folded: dict[int, tuple[int, ...]],
                batches: list[torch.Tensor], damp: float) -> ProgressiveFold:
        """The targets for the ``folded`` units (this period's attn/mlp units) of an executor
        ``model``'s live tensors (``model.tensor(name)``); ``removed`` is every unit chosen so
        far, whose columns are never kept; ``batches`` on the model's device."""
        found, _ = consumers(module, groups, removed, folded)
        updates = lora_updates(module)
        rows = keep_masks(module, groups, removed)
        with torch.no_grad():
            grams = input_gram_matrices(module, batches, [c.param for c in found],
                                        tensor_of=lambda p: model.tensor(p.name).detach())
        targets, before, after = [], 0.0, 0.0
        for c in found:
            weight = model.tensor(c.param).data
            device = weight.device
            gram = grams.pop(c.param).cpu()
            operator = fold_operator(gram, c.removed, c.kept, damp)
            update = updates.get(c.param)
            lora = None if update is None else (model.tensor(update.lora_A).data,
                                                 model.tensor(update.lora_B).data, update.scaling)
            keep_rows = rows.get((c.param, 0), torch.ones(weight.shape[0], dtype=torch.bool))
            target = FoldTarget(weight, torch.nonzero(c.removed).flatten().to(device),
                                torch.nonzero(c.kept).flatten().to(device),
                                operator.to(device=device, dtype=torch.float32),
                                keep_rows.to(device), lora)
            with torch.no_grad():
                e_r = target.removed_part().double().cpu() * keep_rows[:, None]
            error = float(torch.einsum("ij,jk,ik->", e_r, gram[c.removed][:, c.removed], e_r))
            before += error
            after += error_left(error, e_r, e_r @ operator, gram[c.kept][:, c.removed],
                                gram[c.kept][:, c.kept])
            targets.append(target)
        return cls(targets, after / before if before > 0 else 0.0)

    def removed_parts(self) -> list[torch.Tensor]:
        """Every target's ``E_R`` now: what a step's :meth:`fold` compares against."""
        with torch.no_grad():
            return [t.removed_part() for t in self.targets]

    def fold(self, before: list[torch.Tensor]) -> None:
        """Fold what the step removed since ``before`` (:meth:`removed_parts`) into the kept columns."""
        with torch.no_grad():
            for target, part in zip(self.targets, before, strict=True):
                target.fold(part)
