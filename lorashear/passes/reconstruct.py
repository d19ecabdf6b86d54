"""`reconstruct`: fold what the removed units fed each consumer linear into its kept inputs.

A *consumer* is a linear whose input columns a pruned family slices: ``o_proj`` for removed
heads, ``down_proj`` for removed MLP channels, the next layers' projections for removed
hidden channels. With X its input on calibration text (one column per token), K its kept and
R its removed input columns, the kept weight that best reproduces the dense output in least
squares is (DESIGN.md section 10; FLAP, ZipLM and SlimGPT solve the same problem)::

    dW  = E_R X_R X_K^T (X_K X_K^T + lambda I)^-1        W_K += dW

with ``lambda = damp * mean(diag(X_K X_K^T))`` (SparseGPT's ``percdamp`` convention, so that
``damp`` does not depend on the activations' scale). One walk over the calibration batches
accumulates the float64 ``X^T X`` of every consumer's inputs (:func:`input_gram_matrices`:
the sum of ``in_features^2`` over the consumers, 8 bytes each, is the memory it takes); then
each consumer is solved on its own, one at a time, and its gram freed. One-shot, as FLAP and
ZipLM's single pass: every X is the dense model's, not SlimGPT's layer-by-layer re-calibration
on the already pruned layers.
With ``layerwise`` the walk brings one decoder layer in at a time and each consumer is solved
as soon as its layer has seen every batch, so one layer's grams are held, not the model's.

Where the dense weights and activations come from: ``prune`` has already zeroed the removed
units (their consumer columns *and* their producers), so on the pruned module ``E_R = 0`` and
``X_R = 0`` and there is nothing to fold. ``reference=PATH.ir`` names the module saved before
pruning; its removed units are alive, and both ``E_R`` and X are read from it. Without a
reference the module's own weights are used, and its removed units must still be alive (a
``prune-mask`` set but not yet applied); the pass zeroes them afterwards.

LoRA: ``E = W + s * B @ A`` is the effective dense weight, so ``E_R`` includes the LoRA
update's removed columns (what the dense model really computed). The correction ``dW`` is
added to the *base* weight ``W_K`` only: it is generally full-rank, the LoRA factors cannot
hold it without changing their rank, and the base weight is what ``compress`` slices and
``merge-lora`` adds the update to. The LoRA factors are left as they are; the effective kept
weight becomes ``W_K + dW + s * B @ A_K``, exactly the reconstructed one.

The removed columns stay zero (and the LoRA ``A`` columns that prune zeroed too), so the
masked model still equals the compressed one. A weight that is tied to another use (a tied
``lm_head`` is the token embedding) is left alone: correcting it would change the embedding.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from lorashear.analysis.coupling import DimensionCoupling
from lorashear.analysis.groups import GroupsAttr, PruneMaskAttr, check_kinds
from lorashear.analysis.layerwise import use_layerwise
from lorashear.analysis.manager import AnalysisManager
from lorashear.analysis.masking import keep_masks, validate_removal, zero_groups
from lorashear.analysis.placement import Placement, read_stored
from lorashear.analysis.saliency import (
    LoraUpdate,
    complete_input_grams,
    input_gram_matrices,
    lora_delta,
    lora_updates,
)
from lorashear.data.calibration import CalibrationOptions, calibration_batches
from lorashear.errors import LorashearError, PassError
from lorashear.ir.core import Module, Param
from lorashear.ir.storage import DataStorage
from lorashear.passes.base import ModulePass, PassResult, option
from lorashear.passes.options import (
    Layerwise,
    check_placement_text,
    device_option,
    layerwise_option,
    placement_of,
    run_precision_option,
)
from lorashear.passes.registry import register_pass
from lorashear.training.runtime import Precision

_LINEAR_KINDS = ("linear", "lora_linear")
#: The ridge ``damp`` of ``reconstruct`` and of ``lhspg{reconstruct=true}``.
DEFAULT_DAMP = 0.01
#: The group kinds ``reconstruct`` folds by default and ``lhspg{reconstruct=true}`` folds.
FOLDED_KINDS = ("attn", "mlp")


NOTHING_TO_FOLD = ("reconstruct: the removed units are zero already (prune zeroes them), so "
                   "there is nothing to fold into the kept ones")
NOTHING_TO_FOLD_HINT = "give reference=PATH.ir, the module saved before prune"


@dataclass(frozen=True)
class Consumer:
    """A linear weight ``param`` ([out, in]) whose input columns ``removed`` (R, to fold) are
    pruned; ``kept`` (K) are the columns no removed unit touches (bool masks over ``in``)."""

    param: str
    removed: torch.Tensor
    kept: torch.Tensor


def consumers(module: Module, groups: GroupsAttr, removed: dict[int, tuple[int, ...]],
              folded: dict[int, tuple[int, ...]]) -> tuple[list[Consumer], list[str]]:
    """(consumers to reconstruct, names of sliced linear weights skipped because the tensor
    has another use). A consumer is the weight of exactly one linear op with input columns (its
    last axis) in a unit of ``folded``; R is their union, K the columns outside every unit of
    ``removed`` (a column removed but not folded ends at zero, neither source nor target)."""
    uses: Counter[str] = Counter()
    linear_weights: set[str] = set()
    for op in module.graph.ops:
        for p in op.params():
            uses[p.name] += 1
        if op.kind in _LINEAR_KINDS and isinstance(op.args[1], Param):
            linear_weights.add(op.args[1].name)
    keeps = keep_masks(module, groups, removed)
    found, skipped = [], []
    for (name, axis), keep in keep_masks(module, groups, folded).items():
        if name not in linear_weights or axis != len(module.params[name].type.shape) - 1:
            continue
        if uses[name] != 1:
            skipped.append(name)
            continue
        found.append(Consumer(name, ~keep, keeps[(name, axis)]))
    return sorted(found, key=lambda c: c.param), sorted(skipped)


def effective_weight(load: Callable[[str], torch.Tensor], updates: dict[str, LoraUpdate],
                     name: str) -> torch.Tensor:
    """float64 ``W + s * B @ A`` of a linear weight (``W`` without LoRA) on the CPU, from the
    tensors ``load(param name)`` gives."""
    weight = load(name)
    update = updates.get(name)
    if update is not None:
        weight = weight.float() + lora_delta(load(update.lora_A), load(update.lora_B), update.scaling,
                                             torch.float32)
    return weight.detach().to(device="cpu", dtype=torch.float64)


@dataclass(frozen=True)
class Correction:
    """``dW`` for the kept columns of one consumer, and the output error (a sum of squares over
    the calibration tokens) of dropping R before and after adding it."""

    delta: torch.Tensor  # float64 [out, |K|]
    error_before: float
    error_after: float


def solve_correction(dense: torch.Tensor, gram: torch.Tensor, removed: torch.Tensor,
                     keep: torch.Tensor, damp: float) -> Correction:
    """``dW = E_R H_RK (H_KK + lambda I)^-1`` with ``H = X^T X`` (float64, [in, in]) and
    ``lambda = damp * mean(diag H_KK)``; a Cholesky solve, least squares if H_KK is singular.
    ``removed`` and ``keep`` are boolean masks of the input columns R and K."""
    e_r = dense[:, removed]
    h_kk, h_kr, h_rr = gram[keep][:, keep], gram[keep][:, removed], gram[removed][:, removed]
    before = float(torch.einsum("ij,jk,ik->", e_r, h_rr, e_r))
    scale = float(h_kk.diagonal().mean()) if h_kk.numel() else 0.0
    if scale <= 0 or before == 0:  # the kept inputs are all zero, or R fed nothing
        return Correction(torch.zeros(dense.shape[0], int(keep.sum()), dtype=torch.float64), before, before)
    system = h_kk + damp * scale * torch.eye(len(h_kk), dtype=torch.float64)
    rhs = h_kr @ e_r.T  # [|K|, out]: (dW)^T = system^-1 H_KR E_R^T
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs, factor)
    else:
        solution = torch.linalg.lstsq(system, rhs, driver="gelsd").solution
    delta = solution.T
    # ||E_R X_R - dW X_K||^2 expanded in the second moments
    after = before - 2 * float(torch.einsum("ij,jk,ik->", delta, h_kr, e_r)) \
        + float(torch.einsum("ij,jk,ik->", delta, h_kk, delta))
    return Correction(delta, before, max(after, 0.0))


def corrections(module: Module, found: list[Consumer], weights: dict[str, torch.Tensor],
                batches: Iterable[torch.Tensor], damp: float, *,
                tensor_of: Callable[[Param], torch.Tensor] | None = None,
                placement: Placement | None = None) -> Iterator[tuple[Consumer, Correction]]:
    """Each consumer's correction, solved one at a time, from its dense effective weight in
    ``weights`` (consumed) and the inputs of ``module``'s graph on ``batches`` (parameters
    from ``tensor_of``, default their stored data on the ``placement``)."""
    grams = input_gram_matrices(module, batches, [c.param for c in found], tensor_of=tensor_of,
                                placement=placement)
    for c in found:
        gram = grams.pop(c.param).cpu()
        yield c, solve_correction(weights.pop(c.param), gram, c.removed, c.kept, damp)


def fold_live(model: Any, module: Module, groups: GroupsAttr, removed: dict[int, tuple[int, ...]],
              folded: dict[int, tuple[int, ...]], batches: Iterable[torch.Tensor],
              damp: float = DEFAULT_DAMP) -> tuple[int, float]:
    """Fold the ``folded`` units' consumer columns into the kept ones in the live tensors of an
    executor ``model`` (``model.tensor(name)``), in place, with the model's own weights and
    activations on ``batches`` (on the model's device): what ``lhspg{reconstruct=true}`` does
    before a period's forced zeroing. The folded columns are left as they are (the caller
    zeroes them). Returns (consumers corrected, output error left: after / before)."""
    found, _ = consumers(module, groups, removed, folded)

    def load(name: str) -> torch.Tensor:
        return model.tensor(name).detach()

    updates = lora_updates(module)
    weights = {c.param: effective_weight(load, updates, c.param) for c in found}
    before = after = 0.0
    with torch.no_grad():
        for c, correction in corrections(module, found, weights, batches, damp,
                                         tensor_of=lambda p: load(p.name)):
            tensor = model.tensor(c.param)
            kept = torch.nonzero(c.kept).flatten().to(tensor.device)
            tensor.index_add_(1, kept, correction.delta.to(device=tensor.device, dtype=tensor.dtype))
            before += correction.error_before
            after += correction.error_after
    return len(found), after / before if before > 0 else 0.0


@register_pass
@dataclass(frozen=True)
class Reconstruct(ModulePass):
    """Fold the removed inputs of every consumer linear into its kept ones (least squares)."""

    name: ClassVar[str] = "reconstruct"
    requires_attributes: ClassVar[dict[str, str]] = {"groups": "discover", "prune-mask": "prune"}
    data: str = option("", "calibration text: a text/JSON/Parquet file (the source model's tokenizer), "
                       "a .ids file of token ids, a cached source name, or a YAML data spec")
    batches: int = option(8, "calibration batches")
    batch: int = option(4, "windows per calibration batch")
    seq_len: int = option(128, "tokens per calibration window")
    seed: int = option(0, "seed of the choice of calibration windows")
    damp: float = option(DEFAULT_DAMP, "ridge added to X_K X_K^T, as a share of its mean diagonal (>= 0)")
    reference: str = option("", "IR file of the module before pruning (its removed units alive): "
                            "the weights and activations folded; without it the module's own, "
                            "whose removed units must not be zero yet (they are zeroed after)")
    kinds: tuple[str, ...] = option(FOLDED_KINDS, "group kinds whose removed units are folded (attn, "
                                    "mlp, hidden, other); hidden measured worse (bench/RESULTS.md)")
    device: str = device_option("run the model (the calibration forward; grams accumulate there)")
    precision: Precision = run_precision_option()
    layerwise: Layerwise = layerwise_option()

    def __post_init__(self) -> None:
        check_kinds(self.name, self.kinds)
        check_placement_text(self)
        if not self.damp >= 0 or self.damp == float("inf"):
            raise PassError(f"reconstruct damp must be a finite number >= 0, got {self.damp}")
        for what, value in (("batches", self.batches), ("batch", self.batch), ("seq-len", self.seq_len)):
            if value < 1:
                raise PassError(f"reconstruct {what} must be at least 1, got {value}")

    def solve_layerwise(self, dense: Module, found: list[Consumer], updates: dict[str, LoraUpdate],
                        placement: Placement, options: CalibrationOptions, module: Module
                        ) -> Iterator[tuple[Consumer, Correction]]:
        """The corrections with one decoder layer on the device at a time: each consumer is
        solved as soon as the layer that reads it has seen every batch, its dense weight read
        from its file then (consumers are read by one op each, so a correction written back
        cannot change a later layer's inputs)."""
        def dense_weight(name: str) -> torch.Tensor:
            return effective_weight(lambda n: read_stored(dense.params[n]), updates, name)

        if all(not dense_weight(c.param)[:, c.removed].any() for c in found):
            raise PassError(NOTHING_TO_FOLD, hint=NOTHING_TO_FOLD_HINT)
        batches = calibration_batches(module, options, "reconstruct")
        by_name = {c.param: c for c in found}
        for name, gram in complete_input_grams(dense, batches, by_name, placement):
            c = by_name[name]
            yield c, solve_correction(dense_weight(name), gram.cpu(), c.removed, c.kept, self.damp)

    def dense_module(self, module: Module, found: list[Consumer]) -> Module:
        """The module the removed units are read from (the reference, or ``module``), checked."""
        if not self.reference:
            return module
        from lorashear.ir.fileformat import load_ir

        path = Path(self.reference).expanduser()
        if not path.is_file():
            raise PassError(f"reconstruct: reference model {path} does not exist")
        try:
            dense = load_ir(path)
        except LorashearError as exc:
            raise PassError(f"reconstruct: reference model {path}: {exc}") from None
        for c in found:
            theirs = dense.params.get(c.param)
            if theirs is None or theirs.type.shape != module.params[c.param].type.shape:
                raise PassError(f"reconstruct: reference model {path} has no weight {c.param!r} "
                                f"of shape {module.params[c.param].type.shape}",
                                hint="the reference is the module before prune, lowered from the same model")
        return dense

    def run(self, module: Module, am: AnalysisManager) -> PassResult:
        groups, mask = module.attributes["groups"], module.attributes["prune-mask"]
        if not isinstance(groups, GroupsAttr):
            raise PassError("the 'groups' attribute is not a groups attribute", hint="run discover")
        if not isinstance(mask, PruneMaskAttr):
            raise PassError("the 'prune-mask' attribute is not a prune mask", hint="run prune")
        removed = mask.as_dict()
        validate_removal(groups, removed)
        folded = {f: units for f, units in removed.items() if groups.families[f].kind in self.kinds}
        found, skipped = consumers(module, groups, removed, folded)
        if not found:
            return PassResult.unchanged(**{"consumers reconstructed": 0, "consumers skipped (shared weight)": len(skipped)})
        dense = self.dense_module(module, found)
        updates = lora_updates(dense)
        placement = placement_of(self)
        options = CalibrationOptions(self.data, self.batches, self.batch, self.seq_len, self.seed)
        if use_layerwise(self.name, self.layerwise, dense, placement):
            solved = self.solve_layerwise(dense, found, updates, placement, options, module)
        else:
            dense_weights = {c.param: effective_weight(lambda n: dense.params[n].storage.load(), updates,
                                                       c.param) for c in found}
            if all(not dense_weights[c.param][:, c.removed].any() for c in found):
                raise PassError(NOTHING_TO_FOLD, hint=NOTHING_TO_FOLD_HINT)
            batches = calibration_batches(module, options, "reconstruct")
            # one consumer at a time: its gram, solve and update, then the next
            solved = corrections(dense, found, dense_weights, batches, self.damp, placement=placement)
        before = after = 0.0
        columns = 0
        for c, correction in solved:
            param = module.params[c.param]
            weight = param.storage.load()
            updated = weight.double()
            updated[:, c.kept] += correction.delta
            updated[:, ~c.kept] = 0
            param.storage = DataStorage(updated.to(weight.dtype))
            before += correction.error_before
            after += correction.error_after
            columns += int(c.removed.sum())
        if dense is module:  # the removed units were alive: now they are the masked model's zeros
            zero_groups(module, groups, removed)
        statistics: dict[str, Any] = {
            "consumers reconstructed": len(found), "columns folded": columns,
            "output error left": round(after / before, 6) if before > 0 else 0.0}
        if skipped:
            statistics["consumers skipped (shared weight)"] = len(skipped)
        return PassResult(True, frozenset({DimensionCoupling}), statistics)
