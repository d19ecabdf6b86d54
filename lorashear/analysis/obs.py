"""Reconstruction-aware saliency (``obs``, ``obs-single``): a unit's cost is the output error its
removal leaves *after* the optimal least-squares fold of ``reconstruct``.

Wanda and Taylor score what a unit contributes; once ``reconstruct`` folds the removed inputs
into the kept ones, what matters is what the kept inputs cannot reproduce. For a consumer
linear (the weight ``W`` [out, in] that reads the unit's channels as input columns: ``o_proj``
for a head group, ``down_proj`` for an MLP channel, every projection reading the residual for a
hidden channel) with calibration inputs X and ``H = X^T X + lambda I``, removing the column set
R and refitting the kept columns optimally leaves (Optimal Brain Surgeon; ZipLM and SlimGPT
score structured units this way)::

    err(R) = tr(W_R [(H^-1)_RR]^-1 W_R^T)

which is ``||W_R X_R - dW X_K||^2 + lambda (||W_R||^2 + ||dW||^2)`` at the fold ``dW`` that
``reconstruct`` adds (with the same ``lambda``; at ``damp=0`` the plain output error left). ``W``
is the effective dense weight ``W + s * B @ A``; a unit that slices several consumers' inputs
costs the sum of its consumers' errors.

- ``obs-single``: ``err({u})`` of each unit alone.
- ``obs``: ZipLM's greedy, per family: remove the cheapest unit, fold it (``W_K -= W_R
  [(H^-1)_RR]^-1 (H^-1)_RK``) and downdate ``H^-1`` to the kept columns (the block Schur
  complement), rescore the rest, repeat. A unit's score is the error of the set removed up
  to and including it, so the lowest ``k`` scores of a family are exactly the greedy's first
  ``k`` units for every ``k`` (the error of a growing set never falls), and the score *is*
  that set's post-fold error: removing correlated units together is priced as such, where
  scoring each alone counts a unit as cheap because its twin could stand in for it.

Scores are divided by the family's dense output energy ``tr(W X^T X W^T)`` (summed over its
consumers): the share of the consumers' output lost after the fold. Within a family that is a
constant and changes no ranking; across families it puts the scores on one scale, so
``prune{scope=global}`` ranks them directly (:data:`COMPARABLE_METRICS`) instead of dividing
each family by its RMS: taking the lowest scores across layers removes units until every layer
has lost about the same share of its output. On SmolLM2 that allocation did much worse than
``per-layer`` (``bench/RESULTS.md``): an equal share of each layer's own output is not an equal
cost to the loss, so ``per-layer`` (the default) is the allocation to use with ``obs``.

The grams come from one layer-by-layer walk over the calibration batches
(:func:`~lorashear.analysis.saliency.complete_input_grams`), and a family is scored as soon
as the layers that read its consumers are done, so only the grams of the families in flight
are held (one layer's, for attention and MLP families).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lorashear.analysis.groups import GroupsAttr
from lorashear.analysis.placement import Placement
from lorashear.errors import PassError
from lorashear.ir.core import Module, Param
from lorashear.ir.ops import LINEAR_KINDS

#: The ridge of the scores' ``H``, as a share of its mean diagonal: SparseGPT's 0.01, the value
#: the obs figures in ``bench/RESULTS.md`` used; ``reconstruct``'s default is now 0.1, so a
#: fold at that default is scored at a slightly smaller ridge than it is solved with.
OBS_DAMP = 0.01
#: Metrics whose scores already compare across families (``scope=global`` ranks them as they are).
COMPARABLE_METRICS = frozenset({"obs", "obs-single"})


@dataclass(frozen=True)
class UnitColumns:
    """The input columns of consumer weight ``param`` that each unit of a family owns:
    ``columns[u]`` (long [units, width]; every unit owns the same number)."""

    param: str
    columns: torch.Tensor


def consumer_columns(module: Module, groups: GroupsAttr, family_ids: Iterable[int]
                     ) -> dict[int, list[UnitColumns]]:
    """Per family id, the linear weights whose input columns (last axis) it slices, with each
    unit's columns; a family with none fails (nothing to fold its units into)."""
    linear_weights = {op.args[1].name for op in module.graph.ops
                      if op.kind in LINEAR_KINDS and isinstance(op.args[1], Param)}
    found: dict[int, list[UnitColumns]] = {}
    for family_id in family_ids:
        family = groups.families[family_id]
        by_param: dict[str, list[torch.Tensor]] = {}
        for member in family.members:
            shape = module.params[member.param].type.shape
            if member.param not in linear_weights or member.axis != len(shape) - 1:
                continue
            unit = member.unit_of(shape[-1], family.size)
            counts = torch.bincount(unit, minlength=family.size)
            if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
                raise PassError(f"metric obs: family {family.id} ({family.kind}, layer {family.layer}) "
                                f"gives its units unequal column counts of @{member.param}")
            order = torch.argsort(unit, stable=True)
            by_param.setdefault(member.param, []).append(order.view(family.size, -1))
        if not by_param:
            raise PassError(f"metric obs scores a unit by the consumer linears that read it, and "
                            f"family {family.id} ({family.kind}, layer {family.layer}) feeds no "
                            "linear's input columns", hint="use metric=wanda or taylor for this kind")
        found[family_id] = [UnitColumns(p, torch.cat(cs, 1)) for p, cs in sorted(by_param.items())]
    return found


def damped_inverse(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """``(gram + lambda I)^-1`` in float64 with ``lambda = damp * mean(diag gram)``; when the
    Cholesky fails (``damp`` 0 and a singular gram), the ridge grows until it succeeds."""
    gram = gram.double()
    scale = float(gram.diagonal().mean()) if gram.numel() else 0.0
    ridge = damp * scale
    eye = torch.eye(len(gram), dtype=torch.float64, device=gram.device)
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(gram + ridge * eye)
        if int(info) == 0:
            return torch.cholesky_inverse(factor)
        ridge = max(ridge * 10, 1e-8 * max(scale, 1e-30))
    raise PassError("metric obs: a consumer's input gram is not positive definite even damped",
                    hint="check the calibration data (NaN or infinite activations)")


def spd_solve(matrices: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``matrices^-1 rhs`` for symmetric positive-definite ``matrices`` (batched alike) by
    Cholesky. Not ``torch.linalg.solve``: its LU path fails inside MKL (``DLASWP`` parameter
    errors, then a hang) on a batch of three 192 x 192 float64 blocks on two threads (torch
    2.13 CPU), the shape of an attention family's heads. A block that is not positive definite
    in floating point falls back to LU one matrix at a time, which works there."""
    factor, info = torch.linalg.cholesky_ex(matrices)
    if not bool((info != 0).any()):
        return torch.cholesky_solve(rhs, factor)
    if matrices.dim() == 2:
        return torch.linalg.solve(matrices, rhs)
    return torch.stack([torch.linalg.solve(m, r) for m, r in zip(matrices, rhs, strict=True)])


class Surgeon:
    """The greedy's state over one family's consumers: each consumer's current weight
    (float64 [out, in]; kept columns folded) and ``H^-1`` of its remaining columns. Removed
    columns are zeroed, then dropped from the matrices once an eighth of them is gone, so a
    step costs the square of what is left, not of the start (a full greedy over ``n``
    single-column units costs about ``n^3 / 3`` multiply-adds per consumer)."""

    def __init__(self, weights: list[torch.Tensor], inverses: list[torch.Tensor],
                 columns: list[torch.Tensor]) -> None:
        self.weights = [w.clone() for w in weights]
        self.inverses = [h.clone() for h in inverses]
        self.columns = [c.to(h.device) for c, h in zip(columns, inverses, strict=True)]
        self.size = len(columns[0])
        self.alive = torch.ones(self.size, dtype=torch.bool)
        self.dropped = [torch.zeros(len(h), dtype=torch.bool, device=h.device) for h in inverses]

    def costs(self) -> torch.Tensor:
        """float64 [units]: each unit's error if it were removed next (inf for removed units)."""
        total = torch.zeros(self.size, dtype=torch.float64)
        for weight, inverse, columns in zip(self.weights, self.inverses, self.columns, strict=True):
            if columns.shape[1] == 1:
                index = columns[:, 0]
                diagonal = inverse.diagonal()[index]
                squares = torch.linalg.vector_norm(weight, dim=0).pow(2)[index]
                total += (squares / diagonal.clamp_min(1e-300)).cpu()
                continue
            blocks = inverse[columns[:, :, None], columns[:, None, :]]  # [units, b, b]
            slices = weight[:, columns].permute(1, 2, 0)  # [units, b, out]
            live = self.alive.to(blocks.device)
            solved = spd_solve(blocks[live], slices[live])
            total[self.alive] += (slices[live] * solved).sum((1, 2)).cpu()
        return total.masked_fill(~self.alive, float("inf"))

    def remove(self, unit: int) -> None:
        """Fold ``unit`` out of every consumer: ``W -= W_R B^-1 (H^-1)_R:`` and
        ``H^-1 -= (H^-1)_:R B^-1 (H^-1)_R:`` with ``B = (H^-1)_RR``, then zero R."""
        self.alive[unit] = False
        for c, (weight, inverse) in enumerate(zip(self.weights, self.inverses, strict=True)):
            r = self.columns[c][unit]
            if len(r) == 1:
                row = inverse[int(r)].clone()
                pivot = float(row[int(r)])
                weight.addr_(weight[:, int(r)].clone(), row, alpha=-1 / pivot)
                inverse.addr_(row, row, alpha=-1 / pivot)
            else:
                rows = spd_solve(inverse[r][:, r], inverse[r])  # B^-1 (H^-1)_R:  [b, in]
                weight -= weight[:, r] @ rows
                inverse -= inverse[:, r] @ rows
            weight[:, r] = 0
            inverse[r] = 0
            inverse[:, r] = 0
            self.dropped[c][r] = True
            if int(self.dropped[c].sum()) * 8 >= len(inverse) and self.alive.any():
                self._compact(c)

    def _compact(self, c: int) -> None:
        """Drop consumer ``c``'s removed columns from its matrices and renumber the units'."""
        kept = ~self.dropped[c]
        position = torch.cumsum(kept, 0) - 1
        self.weights[c] = self.weights[c][:, kept].contiguous()
        self.inverses[c] = self.inverses[c][kept][:, kept].contiguous()
        # removed units point at a column that is gone: any valid index, their cost is masked
        self.columns[c] = torch.where(kept[self.columns[c]], position[self.columns[c]], 0)
        self.dropped[c] = torch.zeros(int(kept.sum()), dtype=torch.bool, device=kept.device)


def greedy_errors(weights: list[torch.Tensor], inverses: list[torch.Tensor],
                  columns: list[torch.Tensor]) -> torch.Tensor:
    """float64 [units]: the post-fold error of the set the greedy has removed when it takes
    each unit (the last unit: the error of removing every unit). Ties go to the lower unit."""
    surgeon = Surgeon(weights, inverses, columns)
    scores = torch.zeros(surgeon.size, dtype=torch.float64)
    total = 0.0
    for _ in range(surgeon.size):
        costs = surgeon.costs()
        unit = int(torch.argmin(costs))
        total += float(costs[unit])
        scores[unit] = total
        if int(surgeon.alive.sum()) > 1:
            surgeon.remove(unit)
    return scores


def family_errors(weights: list[torch.Tensor], grams: list[torch.Tensor], columns: list[torch.Tensor],
                  damp: float, *, greedy: bool) -> torch.Tensor:
    """A family's absolute obs errors (float64 [units]) from its consumers' effective weights
    ([out, in]), input grams ``X^T X`` ([in, in]) and unit columns: each unit alone, or the
    greedy's (:func:`greedy_errors`)."""
    inverses = [damped_inverse(g, damp) for g in grams]
    weights = [w.to(device=h.device, dtype=torch.float64) for w, h in zip(weights, inverses, strict=True)]
    if greedy:
        return greedy_errors(weights, inverses, columns)
    return Surgeon(weights, inverses, columns).costs()


def obs_scores(module: Module, groups: GroupsAttr, family_ids: Iterable[int], batches: torch.Tensor, *,
               placement: Placement | None = None, greedy: bool = True, damp: float = OBS_DAMP,
               progress: bool = False) -> dict[int, torch.Tensor]:
    """float64 scores per unit of each family: its obs error (greedy or alone) over the
    family's dense output energy on ``batches``. One layer-by-layer walk gives the grams; a
    family is scored when all of its consumers' grams are complete (``progress``: a bar
    over the families)."""
    from lorashear.analysis.saliency import complete_input_grams, lora_delta, lora_updates

    family_ids = list(family_ids)
    placement = placement or Placement()
    found = consumer_columns(module, groups, family_ids)
    waiting = {f: {c.param for c in cs} for f, cs in found.items()}
    readers: dict[str, set[int]] = {}
    for f, names in waiting.items():
        for name in names:
            readers.setdefault(name, set()).add(f)
    updates = lora_updates(module)
    load = placement.param_loader(module, by_reference=True)
    grams: dict[str, torch.Tensor] = {}
    scores: dict[int, torch.Tensor] = {}
    bar = tqdm(total=len(found), desc="obs scores", unit="family", disable=not progress, leave=False)
    for name, gram in complete_input_grams(module, batches, readers, placement):
        grams[name] = gram
        for f in sorted(readers[name]):
            waiting[f].discard(name)
            if waiting[f]:
                continue
            consumers = found[f]
            weights = []
            for c in consumers:
                weight, update = load(module.params[c.param]).double(), updates.get(c.param)
                if update is not None:
                    weight = weight + lora_delta(load(module.params[update.lora_A]),
                                                 load(module.params[update.lora_B]), update.scaling,
                                                 torch.float64)
                weights.append(weight)
            family_grams = [grams[c.param] for c in consumers]
            errors = family_errors(weights, family_grams, [c.columns for c in consumers], damp, greedy=greedy)
            energy = sum(float(torch.einsum("ij,jk,ik->", w.to(g.device), g, w.to(g.device)))
                         for w, g in zip(weights, family_grams, strict=True))
            scores[f] = errors / energy if energy > 0 else errors
            bar.update()
            for c in consumers:
                readers[c.param].discard(f)
                if not readers[c.param]:
                    grams.pop(c.param)
    bar.close()
    missing = [f for f, names in waiting.items() if names]
    if missing:
        raise PassError(f"metric obs: the calibration walk never reached the consumers of families "
                        f"{missing[:5]} ({sorted(waiting[missing[0]])[:3]})")
    return scores
