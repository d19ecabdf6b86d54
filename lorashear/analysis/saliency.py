"""`saliency`: score every removable group, so that pruning removes the least important ones.

A unit ``g`` of a group family owns slices of several parameters (DESIGN.md section 3). ``W_g``
is the unit's slices of the *base* weights (LoRA factors are not part of it) and
``D_g = (s * B @ A)_g`` the LoRA update restricted to the same slices, the gradient proxy of
DESIGN.md section 4. Metrics (higher = more important):

- ``magnitude`` ``||W_g||``; ``avg-magnitude`` ``||W_g|| / sqrt(numel W_g)``;
- ``cosine`` ``<W_g, D_g> / (||W_g|| ||D_g||) + 1``; ``taylor1`` ``|<W_g, D_g>|``;
  ``taylor2`` ``0.5 <W_g, D_g>^2`` -- these three need LoRA adapters and fail without any
  (a unit whose slices carry no LoRA gets ``D_g = 0``: cosine 1, Taylor 0);
- ``combined``: the five above, each divided by its L2 norm over all units, summed with
  ``weights`` (a LoRA-proxy term with a non-zero weight needs LoRA adapters);
- ``taylor``: ``|<E_g, grad_g>|`` summed over calibration batches (LLM-Pruner's group Taylor),
  with ``E = W + s*B@A`` the effective weight: pruning a unit zeroes its base slices and its
  LoRA rows/columns, so ``E_g`` is exactly what is taken away;
- ``wanda``: ``sum |E_ij| * ||X_j||`` over the input columns j of linear weights that belong to
  the unit, ``X_j`` that column's activations on calibration text (Wanda-sp: a head is scored
  on its o_proj columns, an MLP channel on its down_proj column);
- ``obs``, ``obs-single``: the output error a unit's removal leaves after ``reconstruct``'s
  least-squares fold (ZipLM's greedy, or each unit alone), as a share of its consumers' output:
  :mod:`lorashear.analysis.obs`;
- ``random``: uniform, seeded per family -- the floor every method must beat.

Scoring is vectorised: for each parameter, one elementwise product, then per member one
reduction to the member axis and an ``index_add`` over ``(r // stride) % size``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from lorashear.analysis.groups import FamilyMember, GroupFamily, GroupsAttr
from lorashear.analysis.layerwise import LayerWalk, input_env, lm_loss
from lorashear.analysis.placement import Placement, read_stored
from lorashear.data.calibration import CalibrationOptions, calibration_batches
from lorashear.errors import PassError
from lorashear.ir.core import Module, Op, Param
from lorashear.ir.interpret import run_op
from lorashear.ir.lora import adapters
from lorashear.ir.ops import LINEAR_KINDS

MetricName = Literal["magnitude", "avg-magnitude", "cosine", "taylor1", "taylor2", "combined",
                     "taylor", "wanda", "obs", "obs-single", "random"]
METRICS: tuple[str, ...] = get_args(MetricName)
#: The terms of ``combined``, in the order of its ``weights``.
COMBINED_TERMS = ("magnitude", "avg-magnitude", "cosine", "taylor1", "taylor2")
#: Metrics that use the LoRA update as a gradient proxy.
LORA_PROXY_METRICS = frozenset({"cosine", "taylor1", "taylor2"})
#: Metrics that run the model on calibration data.
DATA_METRICS = frozenset({"taylor", "wanda", "obs", "obs-single"})


@dataclass(frozen=True)
class LoraUpdate:
    """The LoRA factors attached to one base weight: ``D = scaling * B @ A``."""

    lora_A: str
    lora_B: str
    scaling: float


def lora_updates(module: Module) -> dict[str, LoraUpdate]:
    """Base weight name -> its LoRA factors, from the ``lora_linear`` ops."""
    return {parts.weight.name: LoraUpdate(parts.lora_a.name, parts.lora_b.name, parts.scaling)
            for _, parts in adapters(module)}


def check_metric(metric: str, weights: tuple[float, ...] = (1.0,) * 5) -> None:
    """One clear error for an unknown metric or a ``weights`` tuple of the wrong length."""
    if metric not in METRICS:
        raise PassError(f"unknown saliency metric {metric!r}", hint=f"one of {', '.join(METRICS)}")
    if metric == "combined" and len(weights) != len(COMBINED_TERMS):
        raise PassError(f"metric 'combined' takes {len(COMBINED_TERMS)} weights "
                        f"({', '.join(COMBINED_TERMS)}), got {len(weights)}")


def unit_sums(values: torch.Tensor, member: FamilyMember, size: int) -> torch.Tensor:
    """float64 per-unit sums of ``values`` (shaped like the member's parameter)."""
    length = values.shape[member.axis]
    per_index = values.movedim(member.axis, 0).reshape(length, -1).sum(1, dtype=torch.float64).cpu()
    units = member.unit_of(length, size)
    inside = units >= 0  # a member over a range of its axis (one piece of a fused projection)
    return torch.zeros(size, dtype=torch.float64).index_add_(0, units[inside], per_index[inside])


def _base_members(module: Module, groups: GroupsAttr, family_ids: Iterable[int]
                  ) -> dict[str, list[tuple[GroupFamily, FamilyMember]]]:
    """Base parameter name -> the (family, member) pairs that slice it; LoRA factors left out."""
    factors = {name for u in lora_updates(module).values() for name in (u.lora_A, u.lora_B)}
    by_param: dict[str, list[tuple[GroupFamily, FamilyMember]]] = {}
    for family_id in family_ids:
        family = groups.families[family_id]
        for member in family.members:
            if member.param not in factors:
                by_param.setdefault(member.param, []).append((family, member))
    return by_param


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """``s * B @ A``, computed in float32 and returned in ``dtype`` (the base weight's)."""
    return ((lora_b.float() @ lora_a.float()) * scaling).to(dtype)


def _lora_delta(module: Module, update: LoraUpdate | None, like: torch.Tensor) -> torch.Tensor | None:
    """The stored factors' ``s * B @ A`` in the dtype and on the device of ``like``, or None
    without LoRA."""
    if update is None:
        return None
    factors = [module.params[name].storage.load() for name in (update.lora_A, update.lora_B)]
    if like.device.type != "cpu":
        factors = [f.to(like.device) for f in factors]
    return lora_delta(*factors, update.scaling, like.dtype)


def _weight_loader(placement: Placement | None, by_reference: bool) -> Callable[[Param], torch.Tensor]:
    """``load(param)``: a stored weight as float32 on the placement's device (scoring math runs
    in float32 whatever the run precision); ``by_reference`` reads a file-backed one without
    leaving its pages mapped (:func:`~lorashear.analysis.placement.read_stored`)."""
    placement = placement or Placement()

    def load(param: Param) -> torch.Tensor:
        tensor = read_stored(param) if by_reference else param.storage.load()
        return placement.to_device(tensor).float()
    return load


@dataclass
class UnitStatistics:
    """float64 per-unit sums over one family: ``sum W^2``, ``sum D^2``, ``sum W*D``, numel."""

    w2: torch.Tensor
    d2: torch.Tensor
    wd: torch.Tensor
    numel: torch.Tensor

    @classmethod
    def zeros(cls, size: int) -> UnitStatistics:
        return cls(*(torch.zeros(size, dtype=torch.float64) for _ in range(4)))


def weight_statistics(module: Module, groups: GroupsAttr, family_ids: Iterable[int], *,
                      placement: Placement | None = None, by_reference: bool = False
                      ) -> dict[int, UnitStatistics]:
    """The per-unit sums every weight-only metric derives from (one pass over the weights, one
    weight at a time, on the placement's device)."""
    family_ids = list(family_ids)
    stats = {f: UnitStatistics.zeros(groups.families[f].size) for f in family_ids}
    updates = lora_updates(module)
    load = _weight_loader(placement, by_reference)
    for name, members in _base_members(module, groups, family_ids).items():
        weight = load(module.params[name])
        delta = _lora_delta(module, updates.get(name), weight)
        squares = weight * weight
        products = None if delta is None else (weight * delta, delta * delta)
        for family, member in members:
            s = stats[family.id]
            s.w2 += unit_sums(squares, member, family.size)
            length = weight.shape[member.axis]
            units = member.unit_of(length, family.size)
            s.numel += torch.bincount(units[units >= 0], minlength=family.size) \
                .double() * (weight.numel() // max(length, 1))
            if products is not None:
                s.wd += unit_sums(products[0], member, family.size)
                s.d2 += unit_sums(products[1], member, family.size)
    return stats


def proxy_score(stats: UnitStatistics, metric: str) -> torch.Tensor:
    """One weight-only metric (magnitude, avg-magnitude, cosine, taylor1, taylor2) of a family."""
    if metric == "magnitude":
        return stats.w2.sqrt()
    if metric == "avg-magnitude":
        return (stats.w2 / stats.numel.clamp_min(1)).sqrt()
    if metric == "cosine":
        norms = (stats.w2 * stats.d2).sqrt()
        return torch.where(norms > 0, stats.wd / norms.clamp_min(1e-300), torch.zeros_like(norms)) + 1
    if metric == "taylor1":
        return stats.wd.abs()
    if metric == "taylor2":
        return 0.5 * stats.wd * stats.wd
    raise PassError(f"internal: {metric!r} is not a weight-only metric")


def combined_scores(stats: dict[int, UnitStatistics], weights: tuple[float, ...]) -> dict[int, torch.Tensor]:
    """Sum of the five weight-only metrics, each normalised by its L2 norm over all units."""
    total = {f: torch.zeros_like(s.w2) for f, s in stats.items()}
    for term, weight in zip(COMBINED_TERMS, weights, strict=True):
        if weight == 0:
            continue
        scores = {f: proxy_score(s, term) for f, s in stats.items()}
        norm = torch.cat(list(scores.values())).norm() if scores else torch.tensor(0.0)
        if norm > 0:
            for f in total:
                total[f] += weight * scores[f] / norm
    return total


def gradient_scores(module: Module, groups: GroupsAttr, family_ids: Iterable[int],
                    batches: torch.Tensor, *, placement: Placement | None = None) -> dict[int, torch.Tensor]:
    """LLM-Pruner group Taylor: ``sum over batches of |<E_g, dLoss/dW_g>|`` (E = W + s*B@A),
    with the whole model on the placement's device."""
    placement = placement or Placement()
    return model_gradient_scores(placement.model(module), module, groups, family_ids,
                                 (placement.to_device(b) for b in batches), autocast=placement.autocast)


def model_gradient_scores(model: torch.nn.Module, module: Module, groups: GroupsAttr,
                          family_ids: Iterable[int], batches: Iterable[torch.Tensor], *,
                          autocast: Any = None) -> dict[int, torch.Tensor]:
    """:func:`gradient_scores` of a runnable ``model`` of ``module`` as it is now (a training
    pass scores its live model: trained LoRA, groups already at zero).

    Each base weight's gradient is consumed by a hook as soon as it is complete and freed, so
    scoring needs one weight's gradient at a time, not a model's worth. ``requires_grad`` and
    ``.grad`` of every parameter are as before when it returns. ``batches`` are on the
    model's device; ``autocast`` is a context manager factory wrapped around the forward.
    """
    family_ids = list(family_ids)
    by_param = _base_members(module, groups, family_ids)
    updates = lora_updates(module)
    scores = {f: torch.zeros(groups.families[f].size, dtype=torch.float64) for f in family_ids}
    dots = {f: torch.zeros_like(s) for f, s in scores.items()}

    def consume(names: list[str], weight: torch.Tensor) -> None:
        with torch.no_grad():
            for name in names:  # tied weights: one tensor, one gradient, several names
                update = updates.get(name)
                effective = weight.detach()
                if update is not None:
                    effective = effective + lora_delta(model.tensor(update.lora_A).detach(),
                                                       model.tensor(update.lora_B).detach(),
                                                       update.scaling, weight.dtype)
                product = effective.float() * weight.grad.float()
                for family, member in by_param[name]:
                    dots[family.id] += unit_sums(product, member, family.size).cpu()
        weight.grad = None

    names_of: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name in by_param:
        weight = model.tensor(name)
        names_of.setdefault(id(weight), (weight, []))[1].append(name)
    tensors = {id(p): p for p in model.parameters()} | {i: w for i, (w, _) in names_of.items()}
    saved = {i: (t.requires_grad, t.grad) for i, t in tensors.items()}
    handles = []
    try:
        for t in tensors.values():
            t.requires_grad_(False)
            t.grad = None
        for weight, names in names_of.values():
            weight.requires_grad_(True)
            handles.append(weight.register_post_accumulate_grad_hook(
                lambda w, names=names: consume(names, w)))
        for ids in batches:
            for d in dots.values():
                d.zero_()
            with (autocast or contextlib.nullcontext)():
                loss = model(ids, labels=ids).loss
            loss.backward()
            for f in scores:
                scores[f] += dots[f].abs()
    finally:
        for handle in handles:
            handle.remove()
        for i, t in tensors.items():
            t.requires_grad_(saved[i][0])
            t.grad = saved[i][1]
    return scores


def layerwise_gradient_scores(module: Module, groups: GroupsAttr, family_ids: Iterable[int],
                              batches: Iterable[torch.Tensor], placement: Placement
                              ) -> dict[int, torch.Tensor]:
    """:func:`gradient_scores` with one decoder layer on the device at a time: a layer-by-layer
    forward keeps every batch's values at each layer boundary, then a layer-by-layer backward,
    last layer first, reruns each layer from its boundary with gradients and carries the
    gradients of its boundary inputs to the layer before. Each layer's weights are read twice
    (forward, backward); a weight's gradient is complete at the first layer that reads it, and
    is consumed there as the whole-model hook consumes it."""
    family_ids = list(family_ids)
    by_param = _base_members(module, groups, family_ids)
    updates = lora_updates(module)
    walk = LayerWalk.of(module, placement)
    live, first = walk.live_sets(), walk.first_reader()
    batches = [placement.to_device(b) for b in batches]
    count, output = len(walk.segments), id(module.graph.outputs[0])
    boundaries: list[list[dict[int, Any]]] = [[] for _ in batches]
    envs = [input_env(module, b) for b in batches]
    with torch.no_grad(), placement.autocast():
        for k in range(count):
            tensors = walk.load(k)
            for i, env in enumerate(envs):
                boundaries[i].append({v: env[v] for v in live[k] if v in env})
                walk.run(k, env, tensors)
            del tensors
    del envs
    dots = [{f: torch.zeros(groups.families[f].size, dtype=torch.float64) for f in family_ids}
            for _ in batches]
    carried: list[dict[int, torch.Tensor]] = [{} for _ in batches]  # d loss / d boundary value
    pending: list[dict[str, torch.Tensor]] = [{} for _ in batches]  # weight grads of later layers
    for k in reversed(range(count)):
        tensors = walk.load(k)
        scored = [name for name in tensors if name in by_param]
        for name in scored:
            tensors[name] = tensors[name].detach().requires_grad_(True)
        for i, batch in enumerate(batches):
            leaves = {v: t.detach().requires_grad_(True) for v, t in boundaries[i][k].items()
                      if isinstance(t, torch.Tensor) and t.is_floating_point()}
            env = {**boundaries[i][k], **leaves}
            with torch.enable_grad(), placement.autocast():
                walk.run(k, env, tensors)
                if k == count - 1:
                    roots, root_grads = [lm_loss(env[output], batch)], None
                else:
                    wanted = [v for v in carried[i] if v in env and isinstance(env[v], torch.Tensor)
                              and env[v].requires_grad]
                    roots, root_grads = [env[v] for v in wanted], [carried[i][v] for v in wanted]
            sources = [tensors[n] for n in scored] + list(leaves.values())
            grads = torch.autograd.grad(roots, sources, root_grads, allow_unused=True) if roots else \
                [None] * len(sources)
            carried[i] = {v: g for v, g in zip(leaves, grads[len(scored):], strict=True) if g is not None}
            for name, grad in zip(scored, grads[:len(scored)], strict=True):
                if grad is not None:
                    pending[i][name] = pending[i][name] + grad if name in pending[i] else grad
            with torch.no_grad():
                for name in scored:
                    if first[name] != k or name not in pending[i]:
                        continue
                    grad = pending[i].pop(name)
                    effective = tensors[name].detach()
                    update = updates.get(name)
                    if update is not None:
                        effective = effective + lora_delta(tensors[update.lora_A], tensors[update.lora_B],
                                                           update.scaling, effective.dtype)
                    product = effective.float() * grad.float()
                    for family, member in by_param[name]:
                        dots[i][family.id] += unit_sums(product, member, family.size)
            boundaries[i][k] = {}
        del tensors
    scores = {f: torch.zeros(groups.families[f].size, dtype=torch.float64) for f in family_ids}
    for batch_dots in dots:
        for f in scores:
            scores[f] += batch_dots[f].abs()
    return scores


def for_each_linear_input(module: Module, batches: Iterable[torch.Tensor],
                          visit: Callable[[str, torch.Tensor], None], *,
                          tensor_of: Callable[[Param], torch.Tensor] | None = None,
                          placement: Placement | None = None, layerwise: bool = False) -> None:
    """Run the graph on each batch of token ids and call ``visit(weight name, x)`` with the
    float32 input ``x`` of every ``linear``/``lora_linear`` op whose weight is a parameter.

    Runs op by op (the executor's own ``run_op``); a value is freed after its last use to
    bound memory. The activation statistics (:func:`input_square_sums`,
    :func:`input_gram_matrices`) are visitors of this one walk. ``tensor_of`` gives each
    parameter's tensor (a training pass's live ones); by default its stored data, on the
    ``placement``'s device in its dtype. ``layerwise``: one segment (decoder layer) at a time
    for every batch, its parameters read when it starts and freed when it ends
    (:mod:`lorashear.analysis.layerwise`); each weight's visits come in the same batch order.
    """
    placement = placement or Placement()
    load = tensor_of or placement.param_loader(module, by_reference=layerwise)

    def see(op: Op, env: dict[int, Any]) -> None:
        if op.kind in LINEAR_KINDS and isinstance(op.args[1], Param):
            visit(op.args[1].name, env[id(op.args[0])].float())

    if layerwise:
        for _ in _segment_by_segment(module, batches, see, load, placement):
            pass
        return
    ops = module.graph.ops
    last_use: dict[int, int] = {}
    for index, op in enumerate(ops):
        for v in op.operands():
            last_use[id(v)] = index
    keep = {id(v) for v in module.graph.outputs}
    tensors: dict[str, torch.Tensor] = {}

    def param_tensor(p: Param) -> torch.Tensor:
        if p.name not in tensors:
            tensors[p.name] = load(p)
        return tensors[p.name]

    with torch.no_grad(), placement.autocast():
        for ids in batches:
            ids = placement.to_device(ids)
            env = input_env(module, ids)
            for index, op in enumerate(ops):
                run_op(op, env, param_tensor, device=ids.device)
                see(op, env)
                for v in op.operands():
                    if last_use.get(id(v)) == index and id(v) not in keep:
                        env.pop(id(v), None)


def _segment_by_segment(module: Module, batches: Iterable[torch.Tensor],
                        see: Callable[[Op, dict[int, Any]], None], load: Callable[[Param], torch.Tensor],
                        placement: Placement) -> Iterator[list[str]]:
    """The layer-wise walk of :func:`for_each_linear_input`: after each segment has seen every
    batch, yield the names of the parameters it read (their visits are complete when no later
    segment reads them)."""
    walk = LayerWalk.of(module, placement)
    envs = [input_env(module, placement.to_device(ids)) for ids in batches]
    with torch.no_grad(), placement.autocast():
        for k in range(len(walk.segments)):
            params = {p.name: p for op in walk.segments[k].ops for p in op.params()}
            tensors = {name: load(p) for name, p in params.items()}
            for env in envs:
                walk.run(k, env, tensors, see)
            del tensors
            yield list(params)


def _gram(rows: torch.Tensor, ones: bool) -> torch.Tensor:
    """``X^T X`` of float64 ``rows`` (tokens x features); with ``ones`` X has a last column
    of ones, so the last row and column hold the feature sums and the token count."""
    if ones:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows.T @ rows


def complete_input_grams(module: Module, batches: Iterable[torch.Tensor], names: Iterable[str],
                         placement: Placement, *, ones: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`input_gram_matrices` layer-wise, each ``(name, X^T X)`` given as soon as the
    segment that reads the weight is done (so only one layer's grams are held at a time). A
    weight in ``names`` must be read by one segment only (a consumer of ``reconstruct``)."""
    wanted = set(names)
    grams: dict[str, torch.Tensor] = {}
    load = placement.param_loader(module, by_reference=True)

    def see(op: Op, env: dict[int, Any]) -> None:
        if op.kind in LINEAR_KINDS and isinstance(op.args[1], Param) and op.args[1].name in wanted:
            rows = env[id(op.args[0])].float().reshape(-1, env[id(op.args[0])].shape[-1]).double()
            name = op.args[1].name
            gram = _gram(rows, ones)
            grams[name] = grams[name] + gram if name in grams else gram

    for read in _segment_by_segment(module, batches, see, load, placement):
        for name in read:
            if name in grams:
                yield name, grams.pop(name)


def input_square_sums(module: Module, batches: torch.Tensor, *, placement: Placement | None = None,
                      layerwise: bool = False) -> dict[str, torch.Tensor]:
    """Per linear weight name, ``sum over tokens of x_j^2`` for each input column j (float64,
    on the placement's device)."""
    sums: dict[str, torch.Tensor] = {}

    def visit(name: str, x: torch.Tensor) -> None:
        square = x.pow(2).reshape(-1, x.shape[-1]).sum(0, dtype=torch.float64)
        sums[name] = sums[name] + square if name in sums else square

    for_each_linear_input(module, batches, visit, placement=placement, layerwise=layerwise)
    return sums


def input_gram_matrices(module: Module, batches: Iterable[torch.Tensor], names: Iterable[str], *,
                        tensor_of: Callable[[Param], torch.Tensor] | None = None,
                        placement: Placement | None = None, layerwise: bool = False,
                        ones: bool = False) -> dict[str, torch.Tensor]:
    """Per linear weight name in ``names``, the float64 ``X^T X`` of its inputs over all
    calibration tokens (``[in_features, in_features]``, on the batches' device; X is tokens x
    in_features): the second moments a least-squares reconstruction solves with. With
    ``ones``, X has a column of ones appended (``[in + 1, in + 1]``): a bias's moments."""
    wanted = set(names)
    grams: dict[str, torch.Tensor] = {}

    def visit(name: str, x: torch.Tensor) -> None:
        if name in wanted:
            gram = _gram(x.reshape(-1, x.shape[-1]).double(), ones)
            grams[name] = grams[name] + gram if name in grams else gram

    for_each_linear_input(module, batches, visit, tensor_of=tensor_of, placement=placement,
                          layerwise=layerwise)
    return grams


def activation_scores(module: Module, groups: GroupsAttr, family_ids: Iterable[int],
                      batches: torch.Tensor, *, placement: Placement | None = None,
                      layerwise: bool = False) -> dict[int, torch.Tensor]:
    """Wanda-sp: per unit, ``sum |E_ij| * ||X_j||`` over the linear weights' input columns j
    that belong to the unit (o_proj columns of a head, down_proj columns of an MLP channel).

    Only there is ``||X_j||`` the activation of the unit's own channel; on output rows it is
    the norm of unrelated input features (in a Llama, dominated by one outlier channel). A
    family that never feeds a linear's input falls back to its output rows. The activations
    come from a forward on the ``placement`` (``layerwise``: one decoder layer at a time); the
    products are taken one weight at a time on its device, in float32/float64.
    """
    family_ids = list(family_ids)
    scores = {f: torch.zeros(groups.families[f].size, dtype=torch.float64) for f in family_ids}
    square_sums = input_square_sums(module, batches, placement=placement, layerwise=layerwise)
    updates = lora_updates(module)
    load = _weight_loader(placement, layerwise)
    by_param = {name: members for name, members in _base_members(module, groups, family_ids).items()
                if name in square_sums}  # norm scales and embedding lookups see no inputs
    feeds_input = {family.id for name, members in by_param.items() for family, member in members
                   if member.axis == len(module.params[name].type.shape) - 1}
    for name, members in by_param.items():
        input_axis = len(module.params[name].type.shape) - 1
        members = [(f, m) for f, m in members if m.axis == input_axis or f.id not in feeds_input]
        if not members:
            continue
        weight = load(module.params[name])
        delta = _lora_delta(module, updates.get(name), weight)
        effective = weight if delta is None else weight + delta
        importance = effective.abs().double().mul_(square_sums[name].sqrt())  # one float64 copy
        del weight, delta, effective
        for family, member in members:
            scores[family.id] += unit_sums(importance, member, family.size)
        del importance
    return scores


def random_scores(groups: GroupsAttr, family_ids: Iterable[int], seed: int) -> dict[int, torch.Tensor]:
    """Uniform scores; family f's depend only on (seed, f), not on which families are scored."""
    scores = {}
    for f in family_ids:
        generator = torch.Generator().manual_seed((seed * 1_000_003 + f) % (2 ** 63))
        scores[f] = torch.rand(groups.families[f].size, generator=generator, dtype=torch.float64)
    return scores


def score_groups(module: Module, groups: GroupsAttr, metric: str, *,
                 weights: tuple[float, ...] = (1.0,) * 5, calibration: CalibrationOptions | None = None,
                 seed: int = 0, family_ids: Iterable[int] | None = None,
                 batches: torch.Tensor | None = None, placement: Placement | None = None,
                 layerwise: bool = False, progress: bool = False) -> dict[int, torch.Tensor]:
    """float64 scores per unit for each family (all of them unless ``family_ids`` is given).

    The data-driven metrics run on ``batches`` (``[batches, batch, seq_len]`` token ids) when a
    caller has read them already, else on windows read from ``calibration``. The model runs on
    the ``placement`` (default: the CPU in the IR's dtypes); ``layerwise`` runs it one decoder
    layer at a time and reads each weight when it is needed (models larger than the device).
    ``progress`` shows a bar over the families as obs scores them (the slow metric).

    Raises :class:`PassError` for an unknown metric, a LoRA-proxy metric on a module without
    LoRA, and a data-driven metric without a calibration file.
    """
    check_metric(metric, weights)
    if not groups.families:
        raise PassError("the groups attribute has no families: nothing to score")
    family_ids = list(range(len(groups.families)) if family_ids is None else family_ids)
    uses_proxy = metric in LORA_PROXY_METRICS or metric == "combined" and any(
        w for t, w in zip(COMBINED_TERMS, weights, strict=True) if t in LORA_PROXY_METRICS)
    if uses_proxy and not lora_updates(module):
        raise PassError(f"metric {metric!r} uses the LoRA update as its gradient proxy, and the "
                        "module has no LoRA adapters",
                        hint="lower with --adapter, or use magnitude, taylor, wanda or random")
    if metric == "random":
        return random_scores(groups, family_ids, seed)
    if metric in DATA_METRICS:
        if batches is None:
            if calibration is None:
                raise PassError(f"metric {metric!r} needs calibration text: data=PATH")
            batches = calibration_batches(module, calibration, f"metric {metric!r}")
        experts = [f for f in family_ids if groups.families[f].kind == "expert"]
        if experts:  # MoE: with any data metric, whole experts are scored by their routed output
            others = [f for f in family_ids if f not in experts]
            scores = expert_scores(module, groups, experts, batches, placement=placement)
            if others:
                scores.update(score_groups(module, groups, metric, weights=weights, seed=seed,
                                           family_ids=others, batches=batches, placement=placement,
                                           layerwise=layerwise, progress=progress))
            return {f: scores[f] for f in family_ids}
        if metric in ("obs", "obs-single"):  # always layer by layer: one layer's grams held
            from lorashear.analysis.obs import obs_scores

            return obs_scores(module, groups, family_ids, batches, placement=placement,
                              greedy=metric == "obs", progress=progress)
        if metric == "taylor" and layerwise:
            return layerwise_gradient_scores(module, groups, family_ids, batches, placement or Placement())
        if metric == "taylor":
            return gradient_scores(module, groups, family_ids, batches, placement=placement)
        return activation_scores(module, groups, family_ids, batches, placement=placement,
                                 layerwise=layerwise)
    stats = weight_statistics(module, groups, family_ids, placement=placement, by_reference=layerwise)
    if metric == "combined":
        return combined_scores(stats, weights)
    return {f: proxy_score(s, metric) for f, s in stats.items()}


# --- Mixture of Experts: whole experts ------------------------------------------------------------
def expert_scores(module: Module, groups: GroupsAttr, family_ids: Iterable[int], batches: torch.Tensor, *,
                  placement: Placement | None = None) -> dict[int, torch.Tensor]:
    """Per expert of each ``expert`` family: ``sum_t ||w_e(t) * y_e(t)||`` over the calibration
    tokens t, where ``w_e(t)`` is the routing weight the token gives the expert (zero unless
    the router chose it) and ``y_e(t)`` the expert's output: routing frequency times output
    norm in one statistic, the expert's contribution to the layer's sum. It is read at the
    ``mul`` of each expert's output by its column of the routing matrix (a ``select`` of that
    column, at the experts module, as :mod:`lorashear.frontend.moe` lowers it)."""
    family_ids = list(family_ids)
    scores = {f: torch.zeros(groups.families[f].size, dtype=torch.float64) for f in family_ids}
    experts_at: dict[str, int] = {}  # experts module path -> family id
    for f in family_ids:
        for member in groups.families[f].members:
            if member.param.endswith(".expert_mask"):
                experts_at[member.param.rsplit(".", 2)[0] + ".experts"] = f
    column: dict[int, tuple[int, int]] = {}  # id(value) -> (family, expert) of a routing column
    weighted: dict[int, tuple[int, int]] = {}  # id(op) -> the expert whose weighted output it makes
    for op in module.graph.ops:
        if op.loc not in experts_at or not op.results:
            continue
        if op.kind == "select" and len(op.args) == 3 and not isinstance(op.args[0], Param) and op.args[1] == 1:
            column[id(op.results[0])] = (experts_at[op.loc], op.args[2])
        elif op.kind in ("unsqueeze", "reshape", "slice", "cast") and id(op.args[0]) in column:
            column[id(op.results[0])] = column[id(op.args[0])]
        elif op.kind == "mul":
            hit = [column[id(a)] for a in op.args if id(a) in column]
            if hit:
                weighted[id(op)] = hit[0]
    if not weighted:
        raise PassError("no routed expert outputs found to score the expert groups",
                        hint="expert groups come from lowering a fused-experts MoE model")

    def see(op: Op, env: dict[int, Any]) -> None:
        hit = weighted.get(id(op))
        if hit is not None:
            f, e = hit
            size = groups.families[f].size
            scores[f][e % size] += env[id(op.results[0])].double().norm(dim=-1).sum().cpu()

    placement = placement or Placement()
    load = placement.param_loader(module, by_reference=False)
    ops = module.graph.ops
    last_use = {id(v): index for index, op in enumerate(ops) for v in op.operands()}
    with torch.no_grad(), placement.autocast():
        for ids in batches:
            ids = placement.to_device(ids)
            env = input_env(module, ids)
            for index, op in enumerate(ops):
                run_op(op, env, load, device=ids.device)
                see(op, env)
                for v in op.operands():
                    if last_use.get(id(v)) == index:
                        env.pop(id(v), None)
    return scores
