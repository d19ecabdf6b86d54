"""`reconstruct{inputs=pruned}`: the fold solved layer by layer on the pruned model's own inputs.

One-shot ``reconstruct`` (``inputs=dense``) fits each consumer on the dense model's inputs:
``min ||X_d W' - X_d E||``. But in the pruned model every consumer after the first reads
inputs that the earlier removals (and folds) have already changed, and those errors add up
through the layers. SparseGPT and SlimGPT instead calibrate each layer on the output of the
layers already pruned; here each consumer's kept weight is fitted so that, *on the pruned
model's inputs* ``X_p``, it reproduces the *dense* model's output::

    W'_K = E X_d^T X_pK (X_pK^T X_pK)^-1

the least squares of ``||X_pK W'_K^T - X_d E^T||`` (``E`` the dense effective weight). The ridge
``lambda`` (as in ``inputs=dense``) pulls ``W'_K`` towards the unfolded kept weight ``E_K``, not
towards zero: ``W'_K = (E X_d^T X_pK + lambda E_K)(X_pK^T X_pK + lambda I)^-1``, which with
``X_p = X_d`` is exactly the one-shot fold ``E_K + E_R H_RK (H_KK + lambda I)^-1``; where the
inputs differ it also corrects the earlier layers' error, as far as the kept inputs can.
``bias=true`` appends a column of ones to ``X_pK`` (undamped).

One walk, op by op: the dense and the pruned model (the removed units zeroed; their
consumers folded as the walk reaches them) run side by side on every calibration batch, one
decoder layer's weights loaded at a time (:class:`~lorashear.analysis.layerwise.LayerWalk`'s
segments). At a consumer the walk holds every batch's input to it in both models, accumulates
the three float64 second moments ``X_d^T X_d``, ``X_d^T X_pK`` and ``X_pK^T X_pK``, solves,
writes the folded weight into the pruned model's loaded tensor and only then runs the op on
the pruned side, so every later op sees the corrected output.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from lorashear.analysis.groups import GroupsAttr
from lorashear.analysis.layerwise import LayerWalk, input_env, keep_edit
from lorashear.analysis.masking import keep_masks
from lorashear.analysis.placement import Placement
from lorashear.analysis.saliency import lora_delta, lora_updates
from lorashear.errors import PassError
from lorashear.ir.core import Module, Op, Param
from lorashear.ir.interpret import run_op

if TYPE_CHECKING:
    from lorashear.passes.reconstruct import Consumer, Correction


def solve_cross(dense: torch.Tensor, current: torch.Tensor, dense_gram: torch.Tensor,
                cross: torch.Tensor, gram: torch.Tensor, damp: float, *, bias: bool = False
                ) -> tuple[torch.Tensor, float, float, torch.Tensor | None]:
    """(``W'_K``, error before, error after, bias) of one consumer, all float64.

    ``dense`` is the dense effective weight E [out, in], ``current`` the pruned model's kept
    effective weight [out, k] (the error before is with it, unfolded), ``dense_gram`` =
    ``X_d^T X_d`` [in, in], ``cross`` = ``X_d^T P`` [in, k'] and ``gram`` = ``P^T P`` [k', k']
    with ``P`` the pruned model's kept inputs (and, with ``bias``, a last column of ones, so
    ``k' = k + 1``). The errors are ``||X_d E^T - P W^T||^2`` over the calibration tokens."""
    kept = gram.shape[0] - bias
    diagonal = gram.diagonal()[:kept]
    scale = float(diagonal.mean()) if kept else 0.0
    target = float(torch.einsum("ij,jk,ik->", dense, dense_gram, dense))
    projected = dense @ cross  # E X_d^T P  [out, k']

    def error(weight: torch.Tensor) -> float:
        return max(target - 2 * float((weight * projected).sum())
                   + float(torch.einsum("ij,jk,ik->", weight, gram, weight)), 0.0)

    unfolded = torch.cat([current, current.new_zeros(current.shape[0], 1)], 1) if bias else current
    before = error(unfolded)
    if scale <= 0 or target == 0:  # nothing reaches the kept inputs, or nothing to reproduce
        return current.clone(), before, before, current.new_zeros(current.shape[0]) if bias else None
    ridge = torch.full((gram.shape[0],), damp * scale, dtype=torch.float64, device=gram.device)
    if bias:
        ridge[-1] = 0
    system = gram + torch.diag(ridge)
    rhs = (projected + unfolded * ridge).T  # the ridge pulls towards the unfolded weight
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs, factor).T
    else:
        solution = torch.linalg.lstsq(system, rhs, driver="gelsd").solution.T
    after = error(solution)
    if bias:
        return solution[:, :-1], before, after, solution[:, -1]
    return solution, before, after, None


def _effective(tensors: dict[str, torch.Tensor], updates: dict, name: str) -> torch.Tensor:
    """float64 ``W + s * B @ A`` of a loaded linear weight."""
    weight = tensors[name].double()
    update = updates.get(name)
    if update is not None:
        weight = weight + lora_delta(tensors[update.lora_A], tensors[update.lora_B], update.scaling,
                                     torch.float64)
    return weight


def _rows(value: torch.Tensor) -> torch.Tensor:
    return value.reshape(-1, value.shape[-1]).double()


def sequential_corrections(dense: Module, module: Module, groups: GroupsAttr,
                           removed: dict[int, tuple[int, ...]], found: list[Consumer],
                           batches: torch.Tensor, placement: Placement, damp: float, *,
                           bias: bool = False) -> Iterator[tuple[Consumer, Correction]]:
    """Each consumer's correction (``delta`` on the module's kept base columns) in graph order,
    solved on the pruned model's inputs as the walk reaches it (see the module docstring).
    ``dense`` holds the removed units alive (the reference, or ``module`` itself before they
    are zeroed); ``module``'s tensors, with the ``removed`` units masked, are the pruned model.
    A consumer's correction is yielded before the walk goes on; the caller writes it."""
    from lorashear.passes.reconstruct import Correction

    walks = LayerWalk.of(dense, placement), LayerWalk.of(module, placement)
    if [op.kind for op in dense.graph.ops] != [op.kind for op in module.graph.ops]:
        raise PassError("reconstruct inputs=pruned: the reference's graph is not the module's",
                        hint="the reference is the module before prune, lowered from the same model")
    by_param = {c.param: c for c in found}
    masks: dict[str, list] = {}
    for (name, axis), keep in keep_masks(module, groups, removed).items():
        masks.setdefault(name, []).append(keep_edit(keep, axis))
    updates = lora_updates(dense), lora_updates(module)
    batches = [placement.to_device(b) for b in batches]
    envs = [input_env(dense, b) for b in batches], [input_env(module, b) for b in batches]
    device = placement.device

    def masked(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        tensor = tensors[name].clone()
        for edit in masks.get(name, ()):
            edit(tensor)
        return tensor

    with torch.no_grad(), placement.autocast():
        for k in range(len(walks[1].segments)):
            tensors = walks[0].load(k), walks[1].load(k)
            pruned = {name: masked(tensors[1], name) for name in tensors[1]}
            loaded = tensors[0], pruned
            for (index, op_d), (_, op_p) in zip(walks[0].indexed[k], walks[1].indexed[k], strict=True):
                added = None
                weight = op_p.args[1] if len(op_p.args) > 1 else None
                if isinstance(weight, Param) and weight.name in by_param and op_p.kind in ("linear", "lora_linear"):
                    c = by_param[weight.name]
                    correction, added = _solve(op_d, op_p, c, envs, loaded, updates, damp, bias, Correction)
                    tensor = pruned[c.param]
                    kept = torch.nonzero(c.kept).flatten().to(tensor.device)
                    tensor.index_add_(1, kept, correction.delta.to(device=tensor.device, dtype=tensor.dtype))
                    for edit in masks.get(c.param, ()):
                        edit(tensor)
                    yield c, correction
                for side, op in enumerate((op_d, op_p)):
                    source = loaded[side]
                    for env in envs[side]:
                        run_op(op, env, lambda p, source=source: source[p.name], device=device)
                        if side and added is not None:
                            result = env[id(op.results[0])]
                            env[id(op.results[0])] = result + added.to(device=result.device, dtype=result.dtype)
                        _free(walks[side], op, index, env)
            del tensors, pruned, loaded


def _solve(op_d: Op, op_p: Op, c: Consumer, envs: tuple[list[dict[int, Any]], list[dict[int, Any]]],
           loaded: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]], updates: tuple[dict, dict],
           damp: float, bias: bool, correction_type: type) -> tuple[Correction, torch.Tensor | None]:
    """One consumer's correction from every batch's inputs to it on both sides."""
    keep = c.kept.to(next(iter(loaded[1].values())).device)
    dense_gram = cross = gram = None
    for env_d, env_p in zip(*envs, strict=True):
        x_d, x_p = _rows(env_d[id(op_d.args[0])]), _rows(env_p[id(op_p.args[0])])[:, keep]
        if bias:
            x_p = torch.cat([x_p, x_p.new_ones(x_p.shape[0], 1)], 1)
        parts = x_d.T @ x_d, x_d.T @ x_p, x_p.T @ x_p
        if gram is None:
            dense_gram, cross, gram = parts
        else:
            dense_gram, cross, gram = dense_gram + parts[0], cross + parts[1], gram + parts[2]
    dense = _effective(loaded[0], updates[0], c.param).to(gram.device)
    current = _effective(loaded[1], updates[1], c.param).to(gram.device)[:, keep]
    folded, before, after, added = solve_cross(dense, current, dense_gram, cross, gram, damp, bias=bias)
    delta = (folded - current).cpu()
    return correction_type(delta, before, after, None if added is None else added.cpu()), added


def _free(walk: LayerWalk, op: Op, index: int, env: dict[int, Any]) -> None:
    for v in op.operands():
        if walk.last_use.get(id(v)) == index and id(v) not in walk.keep:
            env.pop(id(v), None)
