"""`reconstruct{inputs=pruned}` and `{inputs=pruned-to-dense}`: the fold solved layer by layer
on the pruned model's own inputs.

One-shot ``reconstruct`` (``inputs=dense``) fits each consumer on the dense model's inputs:
``min ||X_d W'^T - X_d E^T||``. But in the pruned model every consumer after the first reads
inputs that the earlier removals (and folds) have already changed. SparseGPT and SlimGPT
calibrate each layer on the output of the layers already pruned instead. Both variants walk
the pruned model (removed units zeroed, each consumer folded as the walk reaches it) and fit
a consumer's kept weight on its inputs there, ``X_p``:

- ``pruned`` (SparseGPT's objective): reproduce the dense weight's output *on those inputs*,
  ``min ||X_pK W'_K^T - X_p E^T||``: the one-shot fold, with second moments from the model
  as it will run. For this the producers of the consumer's own removed heads / MLP channels
  (q/k/v rows, gate/up rows) are left alive in the walk until the consumer, whose removed
  columns then zero what they feed (so the outputs after it are the pruned model's).
- ``pruned-to-dense``: reproduce the *dense model's* output, ``min ||X_pK W'_K^T - X_d E^T||``,
  so a consumer also corrects what the earlier layers' removals changed in its inputs, as far
  as its kept inputs can; the dense model runs beside the pruned one.

The solution is ``W'_K = (E T^T X_pK + lambda E_K)(X_pK^T X_pK + lambda I)^-1`` with T the
target inputs (``X_p`` or ``X_d``) and ``lambda`` as in ``inputs=dense``: the ridge pulls
``W'_K`` towards the unfolded kept weight ``E_K``, not towards zero, so with ``X_p = X_d``
both are exactly the one-shot fold ``E_K + E_R H_RK (H_KK + lambda I)^-1``. ``bias=true``
appends a column of ones to ``X_pK`` (undamped). A removed hidden channel has no producer of
its own to keep alive: its inputs are zero in the pruned model, so under ``pruned`` nothing of
it is folded, and under ``pruned-to-dense`` the dense output is the target as for any unit.

One walk, op by op, one decoder layer's weights loaded at a time
(:class:`~lorashear.analysis.layerwise.LayerWalk`'s segments), every calibration batch at
once: at a consumer the walk accumulates the float64 second moments ``T^T T``, ``T^T X_pK``
and ``X_pK^T X_pK`` over the batches, solves, writes the folded weight into the pruned
model's loaded tensor and only then runs the op on the pruned side, so every later op sees
the corrected output.
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
from lorashear.ir.ops import LINEAR_KINDS

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


#: Kinds whose units' producers feed only their consumers (a head's q/k/v rows, an MLP channel's
#: gate/up rows): kept alive in the pruned walk up to the consumer, which zeroes them anyway.
_LOCAL_KINDS = frozenset({"attn", "mlp"})


def sequential_corrections(dense: Module, module: Module, groups: GroupsAttr,
                           removed: dict[int, tuple[int, ...]], folded: dict[int, tuple[int, ...]],
                           found: list[Consumer], batches: torch.Tensor, placement: Placement,
                           damp: float, *, to_dense: bool = False, bias: bool = False
                           ) -> Iterator[tuple[Consumer, Correction]]:
    """Each consumer's correction (``delta`` on the module's kept base columns) in graph order,
    solved on the pruned model's inputs as the walk reaches it (see the module docstring);
    ``to_dense``: fitted to the dense model's output, else to the dense weight's output on
    the pruned model's inputs. ``dense`` holds the removed units alive (the reference, or
    ``module`` itself before they are zeroed); ``module``'s tensors with the ``removed`` units
    masked are the pruned model, except that the producers of ``folded`` head and MLP units
    stay alive (taken from ``dense``) so that their consumer sees what they would feed it.
    A consumer's correction is yielded before the walk goes on; the caller writes it."""
    from lorashear.passes.reconstruct import Correction

    walks = LayerWalk.of(dense, placement), LayerWalk.of(module, placement)
    if [op.kind for op in dense.graph.ops] != [op.kind for op in module.graph.ops]:
        raise PassError("reconstruct inputs=pruned: the reference's graph is not the module's",
                        hint="the reference is the module before prune, lowered from the same model")
    by_param = {c.param: c for c in found}
    consumer_params = {p.name for op in module.graph.ops if op.kind in LINEAR_KINDS
                       and isinstance(op.args[1], Param) and op.args[1].name in by_param for p in op.params()}
    local = {f: units for f, units in folded.items() if groups.families[f].kind in _LOCAL_KINDS}
    rest = {f: units for f, units in removed.items() if f not in local}
    edits: dict[str, list] = {}
    for (name, axis), keep in keep_masks(module, groups, removed).items():
        edits.setdefault(name, []).append(keep_edit(keep, axis))
    alive = {}  # param -> [(axis, keep)] of the local units' slices to take from dense
    for (name, axis), keep in keep_masks(module, groups, local).items():
        if name not in consumer_params:
            alive.setdefault(name, []).append((axis, keep))
    rest_edits: dict[str, list] = {}
    for (name, axis), keep in keep_masks(module, groups, rest).items():
        rest_edits.setdefault(name, []).append(keep_edit(keep, axis))
    updates = lora_updates(dense), lora_updates(module)
    batches = [placement.to_device(b) for b in batches]
    envs = [input_env(dense, b) for b in batches] if to_dense else [], [input_env(module, b) for b in batches]
    device = placement.device

    def pruned_tensor(name: str, tensor: torch.Tensor, dense_tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        for edit in edits.get(name, ()):
            edit(tensor)
        if name in alive:
            for axis, keep in alive[name]:
                shape = [1] * tensor.dim()
                shape[axis] = -1
                tensor = torch.where(keep.view(shape).to(tensor.device), tensor, dense_tensor)
            for edit in rest_edits.get(name, ()):
                edit(tensor)
        return tensor

    with torch.no_grad(), placement.autocast():
        for k in range(len(walks[1].segments)):
            tensors = walks[0].load(k), walks[1].load(k)
            pruned = {name: pruned_tensor(name, t, tensors[0][name]) for name, t in tensors[1].items()}
            loaded = tensors[0], pruned
            for (index, op_d), (_, op_p) in zip(walks[0].indexed[k], walks[1].indexed[k], strict=True):
                added = None
                weight = op_p.args[1] if len(op_p.args) > 1 else None
                if isinstance(weight, Param) and weight.name in by_param and op_p.kind in LINEAR_KINDS:
                    c = by_param[weight.name]
                    correction, added = _solve(op_d, op_p, c, envs, loaded, updates, damp, bias, Correction)
                    tensor = pruned[c.param]
                    kept = torch.nonzero(c.kept).flatten().to(tensor.device)
                    tensor.index_add_(1, kept, correction.delta.to(device=tensor.device, dtype=tensor.dtype))
                    for edit in edits.get(c.param, ()):
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
    """One consumer's correction from every batch's inputs to it (on both sides when the
    dense side runs: ``envs[0]`` not empty)."""
    keep = c.kept.to(next(iter(loaded[1].values())).device)
    dense_gram = cross = gram = None
    for i, env_p in enumerate(envs[1]):
        x_p = _rows(env_p[id(op_p.args[0])])
        # the target: the dense model's output, or the dense weight's on the pruned inputs
        x_d = _rows(envs[0][i][id(op_d.args[0])]) if envs[0] else x_p
        x_p = x_p[:, keep]
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
