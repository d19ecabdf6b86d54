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
ZipLM's single pass: every X is the dense model's. ``inputs=pruned`` is SparseGPT's and
SlimGPT's layer-by-layer variant instead: each consumer is fitted on the inputs of the model
pruned and folded so far; ``inputs=pruned-to-dense`` fits them to the dense model's output,
so later layers also correct earlier errors (:mod:`lorashear.passes.reconstruct_sequential`).
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

``bias=true`` solves for a bias with the kept columns (FLAP's compensation of the removed
units' mean contribution, here jointly with the least squares): X gets a row of ones, solved
undamped, so ``dW`` and ``b`` minimise ``||E_R X_R - dW X_K - b||^2``. A consumer without a
bias gets a new ``<name>.bias`` parameter (in the families that slice the weight's output
rows, so ``compress`` slices it too); ``lorashear-emit --format hf`` then sets the family's
``attention_bias`` / ``mlp_bias`` where its config has them (the other projections' biases
zero), else the directory loads with lorashear only.

The removed columns stay zero (and the LoRA ``A`` columns that prune zeroed too), and so do
the rows of removed units in the consumer's output axis (a removed hidden channel is a row of
``o_proj``), so the masked model still equals the compressed one. A weight that is tied to another use (a tied
``lm_head`` is the token embedding) is left alone: correcting it would change the embedding.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

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
from lorashear.ir.core import Module, Op, Param
from lorashear.ir.ops import LINEAR_KINDS
from lorashear.ir.storage import DataStorage
from lorashear.ir.types import TensorType, torch_dtype
from lorashear.passes.base import ModulePass, PassResult, option
from lorashear.passes.options import (
    Layerwise,
    check_placement_text,
    device_option,
    layerwise_option,
    placement_of,
    run_precision_option,
)
from lorashear.passes.reconstruct_sequential import sequential_corrections
from lorashear.passes.registry import register_pass
from lorashear.training.runtime import Precision

#: The ridge ``damp`` of ``reconstruct``: 0.1 did better than SparseGPT's 0.01 in every pair
#: measured on SmolLM2 (metrics wanda and obs, 20% and 50%, inputs dense and pruned;
#: ``bench/RESULTS.md``, "Reconstruction-aware selection and sequential reconstruction").
DEFAULT_DAMP = 0.1
#: Calibration batches (of 4 x 128 tokens) of ``reconstruct``: 16 (8,192 tokens) against 8 took
#: one-shot obs + ``reconstruct`` on the LoRA-adapted SmolLM2 at 20% from 59.5 to 58.0
#: held-out (``bench/RESULTS.md``, the ``full`` budget with more calibration).
DEFAULT_BATCHES = 16
#: The group kinds ``reconstruct`` folds by default and ``lhspg{reconstruct=true}`` folds.
FOLDED_KINDS = ("attn", "mlp")


NOTHING_TO_FOLD = ("reconstruct: the removed units are zero already (prune zeroes them), so "
                   "there is nothing to fold into the kept ones")
NOTHING_TO_FOLD_HINT = "give reference=PATH.ir, the module saved before prune"


def refuse_nothing_to_fold(dense_weight: Callable[[str], torch.Tensor], found: list[Consumer]) -> None:
    """A :class:`PassError` when every consumer's removed columns are zero in its dense weight
    (``dense_weight`` by parameter name): nothing would be folded."""
    if all(not dense_weight(c.param)[:, c.removed].any() for c in found):
        raise PassError(NOTHING_TO_FOLD, hint=NOTHING_TO_FOLD_HINT)


def stored_weights(dense: Module, updates: dict[str, LoraUpdate]) -> Callable[[str], torch.Tensor]:
    """A consumer's effective dense weight (its LoRA folded in) by name, read from its file."""
    return lambda name: effective_weight(lambda n: read_stored(dense.params[n]), updates, name)


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
        if op.kind in LINEAR_KINDS and isinstance(op.args[1], Param):
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
    bias: torch.Tensor | None = None  # float64 [out], with ``bias=true``


def solve_correction(dense: torch.Tensor, gram: torch.Tensor, removed: torch.Tensor,
                     keep: torch.Tensor, damp: float, *, bias: bool = False) -> Correction:
    """``dW = E_R H_RK (H_KK + lambda I)^-1`` with ``H = X^T X`` (float64, [in, in]) and
    ``lambda = damp * mean(diag H_KK)``; a Cholesky solve, least squares if H_KK is singular.
    ``removed`` and ``keep`` are boolean masks of the input columns R and K. With ``bias``,
    ``gram`` is ``[in + 1, in + 1]``, X with a last column of ones
    (``input_gram_matrices(ones=True)``), solved as one more kept input and not damped; its
    solution is the bias."""
    if bias:
        removed = torch.cat([removed, removed.new_zeros(1)])
        keep = torch.cat([keep, keep.new_ones(1)])
        e_r = dense[:, removed[:-1]]
    else:
        e_r = dense[:, removed]
    h_kk, h_kr, h_rr = gram[keep][:, keep], gram[keep][:, removed], gram[removed][:, removed]
    before = float(torch.einsum("ij,jk,ik->", e_r, h_rr, e_r))
    system = damped_system(h_kk, damp, free_last=bias)  # the bias is not shrunk
    if system is None or before == 0:  # the kept inputs are all zero, or R fed nothing
        kept = int(keep.sum()) - bias
        return Correction(torch.zeros(dense.shape[0], kept, dtype=torch.float64), before, before,
                          torch.zeros(dense.shape[0], dtype=torch.float64) if bias else None)
    delta = solve_damped(system, h_kr @ e_r.T).T  # (dW)^T = system^-1 H_KR E_R^T: [|K|, out]
    after = error_left(before, e_r, delta, h_kr, h_kk)
    if bias:
        return Correction(delta[:, :-1], before, after, delta[:, -1])
    return Correction(delta, before, after)


def damped_system(h_kk: torch.Tensor, damp: float, *, free_last: bool = False) -> torch.Tensor | None:
    """``H_KK + lambda I`` with ``lambda = damp * mean(diag H_KK)``; with ``free_last`` the last
    input (a bias's column of ones) is left out of the mean and not damped. None where the kept
    inputs are all zero."""
    diagonal = h_kk.diagonal()[:-1] if free_last else h_kk.diagonal()
    scale = float(diagonal.mean()) if diagonal.numel() else 0.0
    if scale <= 0:
        return None
    ridge = torch.full((len(h_kk),), damp * scale, dtype=torch.float64)
    if free_last:
        ridge[-1] = 0
    return h_kk + torch.diag(ridge)


def error_left(before: float, e_r: torch.Tensor, delta: torch.Tensor, h_kr: torch.Tensor,
               h_kk: torch.Tensor) -> float:
    """``||E_R X_R - dW X_K||^2`` expanded in the second moments, from ``before``
    ``= ||E_R X_R||^2``: the calibration output error a fold ``dW`` leaves."""
    after = before - 2 * float(torch.einsum("ij,jk,ik->", delta, h_kr, e_r)) \
        + float(torch.einsum("ij,jk,ik->", delta, h_kk, delta))
    return max(after, 0.0)


def solve_damped(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``system^-1 rhs`` for a damped gram ``system``: a Cholesky solve, least squares where
    the system is singular in floating point."""
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.lstsq(system, rhs, driver="gelsd").solution


def fold_operator(gram: torch.Tensor, removed: torch.Tensor, keep: torch.Tensor,
                  damp: float) -> torch.Tensor:
    """``T = H_RK (H_KK + lambda I)^-1`` ([|R|, |K|], float64), so that any removed columns'
    weights ``E_R`` fold as ``dW = E_R @ T``: :func:`solve_correction`'s algebra with the
    weight left out, for a caller that folds a weight that is still changing
    (:class:`lorashear.passes.progressive_fold.ProgressiveFold`). Zero where the kept inputs
    are all zero."""
    system = damped_system(gram[keep][:, keep], damp)
    if system is None:
        return torch.zeros(int(removed.sum()), int(keep.sum()), dtype=torch.float64)
    return solve_damped(system, gram[keep][:, removed]).T


def corrections(module: Module, found: list[Consumer], weights: dict[str, torch.Tensor],
                batches: Iterable[torch.Tensor], damp: float, *,
                tensor_of: Callable[[Param], torch.Tensor] | None = None,
                placement: Placement | None = None, bias: bool = False
                ) -> Iterator[tuple[Consumer, Correction]]:
    """Each consumer's correction, solved one at a time, from its dense effective weight in
    ``weights`` (consumed) and the inputs of ``module``'s graph on ``batches`` (parameters
    from ``tensor_of``, default their stored data on the ``placement``)."""
    grams = input_gram_matrices(module, batches, [c.param for c in found], tensor_of=tensor_of,
                                placement=placement, ones=bias)
    for c in found:
        gram = grams.pop(c.param).cpu()
        yield c, solve_correction(weights.pop(c.param), gram, c.removed, c.kept, damp, bias=bias)


@register_pass
@dataclass(frozen=True)
class Reconstruct(ModulePass):
    """Fold the removed inputs of every consumer linear into its kept ones (least squares)."""

    name: ClassVar[str] = "reconstruct"
    requires_attributes: ClassVar[dict[str, str]] = {"groups": "discover", "prune-mask": "prune"}
    data: str = option("", "calibration text: a text/JSON/Parquet file (the source model's tokenizer), "
                       "a .ids file of token ids, a cached source name, or a YAML data spec")
    batches: int = option(DEFAULT_BATCHES, "calibration batches")
    batch: int = option(4, "windows per calibration batch")
    seq_len: int = option(128, "tokens per calibration window")
    seed: int = option(0, "seed of the choice of calibration windows")
    damp: float = option(DEFAULT_DAMP, "ridge added to X_K X_K^T, as a share of its mean diagonal (>= 0)")
    reference: str = option("", "IR file of the module before pruning (its removed units alive): "
                            "the weights and activations folded; without it the module's own, "
                            "whose removed units must not be zero yet (they are zeroed after)")
    bias: bool = option(False, "also solve for a bias (the removed inputs' mean contribution): "
                        "added to each consumer, a new parameter where it has none")
    kinds: tuple[str, ...] = option(FOLDED_KINDS, "group kinds whose removed units are folded (attn, "
                                    "mlp, hidden, other); hidden measured worse (bench/RESULTS.md)")
    inputs: Literal["dense", "pruned", "pruned-to-dense"] = option(
        "dense", "what each consumer is fitted on: dense: the dense model's inputs (one-shot); "
        "pruned: the inputs of the model pruned and folded so far, layer by layer (SparseGPT), "
        "to the dense weight's output on them; pruned-to-dense: the same inputs, to the dense "
        "model's output (later layers also correct the earlier layers' error)")
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
        dense_weight = stored_weights(dense, updates)
        refuse_nothing_to_fold(dense_weight, found)
        batches = calibration_batches(module, options, "reconstruct")
        by_name = {c.param: c for c in found}
        for name, gram in complete_input_grams(dense, batches, by_name, placement, ones=self.bias):
            c = by_name[name]
            yield c, solve_correction(dense_weight(name), gram.cpu(), c.removed, c.kept, self.damp,
                                      bias=self.bias)

    def solve_sequential(self, dense: Module, found: list[Consumer], updates: dict[str, LoraUpdate],
                         placement: Placement, options: CalibrationOptions, module: Module,
                         groups: GroupsAttr, removed: dict[int, tuple[int, ...]],
                         folded: dict[int, tuple[int, ...]]) -> Iterator[tuple[Consumer, Correction]]:
        """``inputs=pruned`` / ``pruned-to-dense``: the corrections solved on the pruned
        model's inputs, in graph order (:mod:`lorashear.passes.reconstruct_sequential`)."""
        refuse_nothing_to_fold(stored_weights(dense, updates), found)
        batches = calibration_batches(module, options, "reconstruct")
        return sequential_corrections(dense, module, groups, removed, folded, found, batches, placement,
                                      self.damp, to_dense=self.inputs == "pruned-to-dense", bias=self.bias)

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
        if self.inputs != "dense":
            solved = self.solve_sequential(dense, found, updates, placement, options, module, groups,
                                           removed, folded)
        elif use_layerwise(self.name, self.layerwise, dense, placement):
            solved = self.solve_layerwise(dense, found, updates, placement, options, module)
        else:
            dense_weights = {c.param: effective_weight(lambda n: dense.params[n].storage.load(), updates,
                                                       c.param) for c in found}
            refuse_nothing_to_fold(dense_weights.__getitem__, found)
            batches = calibration_batches(module, options, "reconstruct")
            # one consumer at a time: its gram, solve and update, then the next
            solved = corrections(dense, found, dense_weights, batches, self.damp, placement=placement,
                                 bias=self.bias)
        before = after = 0.0
        columns = biases_added = 0
        new_biases = []  # added after the walk: a new bias parameter changes the graph it walks
        for c, correction in solved:
            param = module.params[c.param]
            weight = param.storage.load()
            updated = weight.double()
            updated[:, c.kept] += correction.delta
            updated[:, ~c.kept] = 0
            param.storage = DataStorage(updated.to(weight.dtype))
            if correction.bias is not None:
                new_biases.append((c.param, correction.bias))
            before += correction.error_before
            after += correction.error_after
            columns += int(c.removed.sum())
        for name, values in new_biases:
            groups, added = add_bias(module, groups, name, values)
            biases_added += added
        if dense is module:  # the removed units were alive: now they are the masked model's zeros
            zero_groups(module, groups, removed)
        else:  # the corrections wrote output rows of removed units (hidden channels) too
            zero_params(module, groups, removed, {c.param for c in found}
                        | {bias_of(module, c.param).name for c in found if bias_of(module, c.param)})
        statistics: dict[str, Any] = {
            "consumers reconstructed": len(found), "columns folded": columns,
            "output error left": round(after / before, 6) if before > 0 else 0.0}
        if self.bias:
            statistics["biases added"] = biases_added
        if skipped:
            statistics["consumers skipped (shared weight)"] = len(skipped)
        # a new bias is a new parameter of the graph: its coupling is not the one computed
        return PassResult(True, frozenset() if biases_added else frozenset({DimensionCoupling}), statistics)


def consumer_op(module: Module, weight: str) -> Op:
    """The one linear op that reads ``weight`` (a consumer's)."""
    for op in module.graph.ops:
        if op.kind in LINEAR_KINDS and isinstance(op.args[1], Param) and op.args[1].name == weight:
            return op
    raise PassError(f"reconstruct: no linear op reads @{weight}")


def bias_of(module: Module, weight: str) -> Param | None:
    """The bias parameter of the linear op that reads ``weight`` (None: it has none)."""
    bias = consumer_op(module, weight).bound_args().get("bias")
    return bias if isinstance(bias, Param) else None


def add_bias(module: Module, groups: GroupsAttr, weight: str, values: torch.Tensor) -> tuple[GroupsAttr, int]:
    """Add ``values`` (float64 [out]) to the bias of the linear op that reads ``weight``: its
    own, or a new parameter ``<weight less .weight>.bias`` that joins every family slicing the
    weight's output rows (and its unprunable axes). Returns the groups (updated when a
    parameter was added) and 1 if one was."""
    current = bias_of(module, weight)
    if current is not None:
        tensor = current.storage.load()
        current.storage = DataStorage((tensor.double() + values).to(tensor.dtype))
        return groups, 0
    op, param = consumer_op(module, weight), module.params[weight]
    stem = weight[: -len(".weight")] if weight.endswith(".weight") else weight
    name = f"{stem}.bias"
    if name in module.params:
        raise PassError(f"reconstruct: @{weight}'s op has no bias but a parameter @{name} exists")
    bias = module.add_param(Param(name, TensorType(param.type.dtype, (param.type.shape[0],)),
                                  DataStorage(values.to(torch_dtype(param.type.dtype)))))
    if "bias" in op.kwargs:
        op.kwargs["bias"] = bias
    else:
        op.args = [*op.args, *([None] * (3 - len(op.args)))]
        op.args[2] = bias
    families = tuple(replace(f, members=f.members + tuple(
        replace(m, param=name) for m in f.members if m.param == weight and m.axis == 0))
        for f in groups.families)
    unprunable = groups.unprunable + tuple((name, 0, why) for p, axis, why in groups.unprunable
                                           if p == weight and axis == 0)
    groups = replace(groups, families=families, unprunable=unprunable)
    module.attributes["groups"] = groups
    return groups, 1


def zero_params(module: Module, groups: GroupsAttr, removed: dict[int, tuple[int, ...]],
                names: set[str]) -> None:
    """Zero the removed units' slices of the parameters ``names`` only (a masked entry is
    multiplied by 0, a kept one by 1: kept values keep their bits)."""
    for (name, axis), keep in keep_masks(module, groups, removed).items():
        if name in names:
            param = module.params[name]
            tensor = param.storage.load()
            shape = [1] * tensor.dim()
            shape[axis] = -1
            param.storage = DataStorage(tensor * keep.view(shape).to(tensor.dtype))
