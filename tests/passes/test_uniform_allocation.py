"""``uniform=true`` on ``prune`` and ``lhspg`` (every layer keeps the same widths, units chosen
by score within each layer, the ratio met as closely as that allows) and ``align`` (``auto``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorashear.analysis.allocation import (
    AUTO_ALIGN,
    FamilyBudget,
    choose_units,
    family_align,
)
from lorashear.analysis.groups import FamilyMember, GroupFamily, param_units_numel
from lorashear.analysis.knowledge import KnowledgeAttr
from lorashear.analysis.saliency import score_groups
from lorashear.errors import PassError
from lorashear.ir.core import clone_module
from lorashear.passes import PassManager
from lorashear.runtime.executor import emit_torch
from tests.conftest import FAMILIES, markov_tokens, random_batch


@pytest.fixture(scope="module")
def discovered(lowered):
    cache = {}

    def get(family: str):
        if family not in cache:
            module = clone_module(lowered(family, True))
            PassManager.parse("discover").run(module)
            cache[family] = module
        return clone_module(cache[family])

    return get


def _kept(module, kind: str) -> dict[int, int]:
    """Kept units per layer of the families of ``kind``, from the prune-mask."""
    removed = module.attributes["prune-mask"].as_dict()
    return {f.layer: f.size - len(removed.get(f.id, ())) for f in module.attributes["groups"].families
            if f.kind == kind}


def _share(module, kinds=("attn", "mlp")) -> float:
    families = [f for f in module.attributes["groups"].families if f.kind in kinds]
    removed = module.attributes["prune-mask"].as_dict()
    total = sum(param_units_numel(module, f) * f.size for f in families)
    return sum(param_units_numel(module, f) * len(removed.get(f.id, ())) for f in families) / total


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_prune_keeps_every_layer_the_same(discovered, family):
    module = discovered(family)
    scores = score_groups(module, module.attributes["groups"], "magnitude")
    PassManager.parse("prune{ratio=0.3,metric=magnitude,uniform=true}").run(module)
    for kind in ("attn", "mlp"):
        assert len(set(_kept(module, kind).values())) == 1, kind
    # within each layer the lowest-scoring units go
    removed = module.attributes["prune-mask"].as_dict()
    for f_id, units in removed.items():
        kept = [u for u in range(len(scores[f_id])) if u not in units]
        assert max(scores[f_id][list(units)]) <= min(scores[f_id][kept])
    # the ratio, within one uniform MLP step (a channel in every layer) of the target
    groups = module.attributes["groups"]
    mlp = [f for f in groups.families if f.kind == "mlp"]
    prunable = sum(param_units_numel(module, f) * f.size for f in groups.families if f.kind in ("attn", "mlp"))
    step = sum(param_units_numel(module, f) for f in mlp) / prunable
    assert abs(_share(module) - 0.3) <= step
    # compress writes the stock keys; the model computes what the masked one did
    ids, mask = random_batch(module.attributes["config"].config["vocab_size"])
    with torch.no_grad():
        want = emit_torch(module)(ids, attention_mask=mask).logits
    PassManager.parse("compress").run(module)
    config = module.attributes["config"].config
    assert "lorashear_per_layer" not in config
    assert config["intermediate_size"] == next(iter(_kept_sizes(module, "mlp.up_proj.weight", 0)))
    with torch.no_grad():
        got = emit_torch(module)(ids, attention_mask=mask).logits
    assert (got - want).abs()[mask.bool()].max() <= 1e-4


def _kept_sizes(module, suffix: str, axis: int) -> set[int]:
    return {p.type.shape[axis] for n, p in module.params.items() if n.endswith(suffix)}


def test_uniform_gives_protected_layers_their_share(discovered):
    """A knowledge analysis does not widen the layers it protects under uniform=true: they
    give the uniform count like the others, chosen by their own scores."""
    module = discovered("mistral")
    groups = module.attributes["groups"]
    layer0 = tuple(f.id for f in groups.families if f.layer == 0 and f.kind in ("attn", "mlp"))
    module.attributes["knowledge"] = KnowledgeAttr(3.0, tuple((f.id, 0.1) for f in groups.families
                                                               if f.kind in ("attn", "mlp")), layer0)
    free = clone_module(module)
    PassManager.parse("prune{ratio=0.25,metric=magnitude}").run(free)
    assert _kept(free, "mlp")[0] == next(f.size for f in groups.families if f.id in layer0 and f.kind == "mlp")
    uniform = clone_module(module)
    manager = PassManager.parse("prune{ratio=0.25,metric=magnitude,uniform=true}")
    manager.run(uniform)
    assert len(set(_kept(uniform, "mlp").values())) == 1
    assert "families protected" not in manager.records[0].statistics
    assert abs(_share(uniform) - _share(free)) <= 0.05


def test_uniform_align_and_errors(discovered):
    module = discovered("llama")  # MLP of 96 channels
    PassManager.parse("prune{ratio=0.3,metric=magnitude,uniform=true,align=16,kinds=mlp}").run(module)
    kept = set(_kept(module, "mlp").values())
    assert len(kept) == 1 and kept.pop() % 16 == 0
    # auto: a 96-channel family is too narrow for 64, so auto is align=1 there
    a, b = discovered("llama"), discovered("llama")
    PassManager.parse("prune{ratio=0.3,metric=magnitude,align=auto}").run(a)
    PassManager.parse("prune{ratio=0.3,metric=magnitude}").run(b)
    assert a.attributes["prune-mask"] == b.attributes["prune-mask"]
    with pytest.raises(PassError, match="uniform=true keeps every layer"):
        PassManager.parse("prune{uniform=true,scope=global}")
    with pytest.raises(PassError, match="uniform=true keeps every layer"):
        PassManager.parse("lhspg{uniform=true,scope=global,data=x.txt}")
    with pytest.raises(PassError, match="align must be at least 1 or auto"):
        PassManager.parse("prune{align=0}")
    assert PassManager.parse("prune{align=auto,uniform=true}").passes[0].align == "auto"


def _budgets(layers: int, channels: int, seed: int, already: int = 0) -> list[FamilyBudget]:
    generator = torch.Generator().manual_seed(seed)
    budgets = []
    for layer in range(layers):
        for kind, size, numel in (("attn", 3, 40 * channels // 8), ("mlp", channels, 3)):
            family = GroupFamily(len(budgets), kind, layer, size, (FamilyMember("w", 0, 1),))
            scores = torch.rand(size, generator=generator, dtype=torch.float64)
            done = tuple(range(already)) if kind == "mlp" else ()
            budgets.append(FamilyBudget(family, scores, numel, done))
    return budgets


@settings(max_examples=60, deadline=None)
@given(layers=st.integers(2, 5), channels=st.sampled_from([24, 96, 600, 1536]), ratio=st.floats(0.0, 0.6),
       align=st.sampled_from([1, 8, "auto"]), seed=st.integers(0, 2 ** 16))
def test_choose_units_uniform(layers, channels, ratio, align, seed):
    budgets = _budgets(layers, channels, seed)
    removed = choose_units(budgets, ratio, "per-layer", align, uniform=True)
    counts = {b.family.id: len(removed[b.family.id]) for b in budgets}
    for kind in ("attn", "mlp"):
        assert len({counts[b.family.id] for b in budgets if b.family.kind == kind}) == 1
    mlp = [b for b in budgets if b.family.kind == "mlp"]
    multiple = family_align(align, mlp[0].family)
    kept = channels - counts[mlp[0].family.id]
    assert kept >= 1 and kept % multiple == 0
    assert multiple == (AUTO_ALIGN if align == "auto" and channels >= 512 else 1 if align == "auto" else align)
    for b in budgets:
        units = removed[b.family.id]
        rest = [u for u in range(b.family.size) if u not in units]
        assert not units or max(b.scores[list(units)]) <= min(b.scores[rest])
    total = sum(b.unit_numel * b.family.size for b in budgets)
    taken = sum(b.unit_numel * counts[b.family.id] for b in budgets)
    step = multiple * sum(b.unit_numel for b in mlp)
    if multiple < kept < channels - multiple:  # not at a bound: within half a uniform step
        assert abs(taken - ratio * total) <= step / 2 + 1e-6


def test_choose_units_uniform_keeps_earlier_removals():
    budgets = _budgets(3, 24, seed=1, already=5)
    removed = choose_units(budgets, 0.05, "per-layer", uniform=True)
    for b in budgets:
        assert set(b.already) <= set(removed[b.family.id])


def test_uniform_lhspg(tmp_path, lowered):
    tokens = markov_tokens(3000)
    data = tmp_path / "train.ids"
    data.write_text(" ".join(map(str, tokens.tolist())))
    module = clone_module(lowered("mistral", True))
    PassManager.parse(f"discover,lhspg{{ratio=0.3,periods=2,steps=3,seq-len=32,batch=4,data={data},"
                      "uniform=true,attn-share=proportional,progress=false}").run(module)
    for kind in ("attn", "mlp"):
        assert len(set(_kept(module, kind).values())) == 1
    assert abs(_share(module) - 0.3) <= 0.05
