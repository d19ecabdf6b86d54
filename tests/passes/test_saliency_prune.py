"""`saliency` and `prune`: every metric on tiny models, hand-checked scores, the pruning ratio,
exact zeros, and the masked == compressed invariant after one-shot pruning."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorashear.analysis.allocation import (
    AUTO_SHARES,
    FamilyBudget,
    align_count,
    choose_units,
    search_attn_share,
)
from lorashear.analysis.groups import FamilyMember, GroupFamily, GroupsAttr, param_units_numel
from lorashear.analysis.saliency import METRICS, score_groups
from lorashear.analysis.scores import SaliencyAttr
from lorashear.data.calibration import CalibrationOptions, calibration_batches
from lorashear.errors import PassError
from lorashear.ir.attributes import dump_json
from lorashear.ir.core import Graph, Module, Op, Param, Value, clone_module
from lorashear.ir.storage import DataStorage
from lorashear.ir.types import TensorType
from lorashear.passes import PassManager, parse_pipeline
from lorashear.passes.saliency import Saliency
from lorashear.runtime.executor import emit_torch
from tests.conftest import random_batch

PROXY_METRICS = {"cosine", "taylor1", "taylor2", "combined"}


@pytest.fixture(scope="module")
def discovered(lowered):
    """(family, with_lora) -> a fresh copy of the lowered module with its groups discovered."""
    cache = {}

    def get(family: str, with_lora: bool) -> Module:
        key = (family, with_lora)
        if key not in cache:
            module = clone_module(lowered(family, with_lora))
            module.attributes.pop("groups", None)
            PassManager.parse("discover").run(module)
            cache[key] = module
        return clone_module(cache[key])  # new Params: pruning one copy leaves the others alone

    return get


@pytest.fixture(scope="module")
def calibration_ids(tmp_path_factory):
    """A .ids file of random token ids below the tiny vocabulary (128)."""
    path = tmp_path_factory.mktemp("calibration") / "tokens.ids"
    ids = torch.randint(0, 128, (600,), generator=torch.Generator().manual_seed(5))
    path.write_text(" ".join(map(str, ids.tolist())))
    return path


def saliency_text(metric: str, data) -> str:
    return f'saliency{{metric={metric},data="{data}",batches=2,batch=2,seq-len=16}}'


# --- every metric ---------------------------------------------------------------------------
@pytest.mark.parametrize("with_lora", [True, False])
@pytest.mark.parametrize("metric", METRICS)
def test_every_metric_scores_every_group(discovered, calibration_ids, metric, with_lora):
    module = discovered("llama", with_lora)
    manager = PassManager.parse(saliency_text(metric, calibration_ids))
    if metric in PROXY_METRICS and not with_lora:
        with pytest.raises(PassError, match="no LoRA adapters"):
            manager.run(module)
        return
    manager.run(module)
    attr = module.attributes["saliency"]
    assert attr.metric == metric
    groups = module.attributes["groups"]
    assert attr.matches({f.id: f.size for f in groups.families}) is None
    values = torch.tensor([v for _, scores in attr.scores for v in scores])
    assert torch.isfinite(values).all() and (values >= 0).all()
    assert values.std() > 0, "scores must tell groups apart"
    assert SaliencyAttr.from_json(json.loads(dump_json(attr.to_json()))) == attr


@pytest.mark.parametrize("metric", ["magnitude", "taylor", "wanda", "obs"])
def test_metrics_on_qwen2_with_bias(discovered, calibration_ids, metric):
    module = discovered("qwen2", True)
    PassManager.parse(saliency_text(metric, calibration_ids)).run(module)
    assert len(module.attributes["saliency"].scores) == len(module.attributes["groups"].families)


def test_combined_without_lora_only_with_zero_proxy_weights(discovered):
    module = discovered("llama", False)
    groups = module.attributes["groups"]
    scores = score_groups(module, groups, "combined", weights=(1.0, 2.0, 0.0, 0.0, 0.0))
    magnitude = score_groups(module, groups, "magnitude")
    norm = torch.cat(list(magnitude.values())).norm()
    average = score_groups(module, groups, "avg-magnitude")
    avg_norm = torch.cat(list(average.values())).norm()
    for f in scores:
        torch.testing.assert_close(scores[f], magnitude[f] / norm + 2 * average[f] / avg_norm)


# --- hand-checked values --------------------------------------------------------------------
def hand_module() -> Module:
    """W (4x3) with LoRA A (1x3), B (4x1), scaling 0.5, and a norm N (2); one family of two
    units: W rows {0,1} and N[0] are unit 0, W rows {2,3} and N[1] unit 1 (B rows follow W)."""
    def param(name, rows):
        tensor = torch.tensor(rows, dtype=torch.float32)
        return Param(name, TensorType("f32", tuple(tensor.shape)), DataStorage(tensor))

    w = param("w", [[1, 2, 0], [0, 1, 0], [3, 0, 0], [0, 0, 4]])
    a = param("a", [[1, 0, 1]])
    b = param("b", [[1], [0], [2], [1]])
    n = param("n", [2, 1])
    x = Value("x", TensorType("f32", (1, 3)))
    y = Value("y", TensorType("f32", (1, 4)))
    graph = Graph([x], [Op("lora_linear", [x, w, None, a, b], {"scaling": 0.5}, [y])], [y], ["y"])
    family = GroupFamily(0, "mlp", 0, 2, (FamilyMember("w", 0, 2), FamilyMember("b", 0, 2),
                                          FamilyMember("n", 0, 1)))
    return Module(graph, [w, a, b, n], {"groups": GroupsAttr((family,))})


@pytest.mark.parametrize("metric, expected", [
    # W rows 0-1 hold 1,2,1 and N[0] = 2: 1+4+1+4 = 10; rows 2-3 hold 3,4 and N[1] = 1: 26
    ("magnitude", [math.sqrt(10), math.sqrt(26)]),
    ("avg-magnitude", [math.sqrt(10 / 7), math.sqrt(26 / 7)]),
    # D = 0.5 * B @ A = [[.5,0,.5],[0,0,0],[1,0,1],[.5,0,.5]]; N has no LoRA (D = 0)
    # <W,D> unit 0 = 1*.5 = .5; unit 1 = 3*1 + 4*.5 = 5
    ("taylor1", [0.5, 5.0]),
    ("taylor2", [0.125, 12.5]),
    # ||D|| unit 0 = sqrt(.5), unit 1 = sqrt(1+1+.25+.25) = sqrt(2.5)
    ("cosine", [0.5 / math.sqrt(10 * 0.5) + 1, 5 / math.sqrt(26 * 2.5) + 1]),
])
def test_hand_checked_scores(metric, expected):
    module = hand_module()
    Saliency(metric=metric).run(module, None)
    assert module.attributes["saliency"].as_dict()[0] == pytest.approx(expected, rel=1e-6)


# --- data-driven metrics against the Hugging Face model -------------------------------------
def lora_effective_weight(layer: torch.nn.Module) -> torch.Tensor:
    """W + s * B @ A of a peft LoRA linear."""
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    return layer.base_layer.weight + layer.scaling["default"] * delta


def layer0_batches(module, calibration_ids):
    """The windows score_groups draws for batches=2, batch=2, seq-len=16, seed 0."""
    return calibration_batches(module, CalibrationOptions(str(calibration_ids), 2, 2, 16, 0), "test")


def test_wanda_matches_activations_hooked_in_the_hf_model(discovered, tiny_models, calibration_ids):
    module = discovered("llama", True)
    groups = module.attributes["groups"]
    mlp, attn = groups.families[2], groups.families[1]  # layer 0: MLP channels, KV groups
    assert (mlp.kind, mlp.layer, attn.kind, attn.layer) == ("mlp", 0, "attn", 0)
    scores = score_groups(module, groups, "wanda", family_ids=[1, 2],
                          calibration=CalibrationOptions(str(calibration_ids), 2, 2, 16, 0))
    layer = tiny_models["llama"].peft.base_model.model.model.layers[0]
    squares = {}

    def record(name):
        def hook(_, args):
            x = args[0].detach().double()
            squares[name] = squares.get(name, 0) + x.pow(2).reshape(-1, x.shape[-1]).sum(0)
        return hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(record("down")),
               layer.self_attn.o_proj.register_forward_pre_hook(record("o"))]
    with torch.no_grad():
        for ids in layer0_batches(module, calibration_ids):
            tiny_models["llama"].peft(input_ids=ids)
    for h in handles:
        h.remove()
    with torch.no_grad():
        down = lora_effective_weight(layer.mlp.down_proj).double().abs() * squares["down"].sqrt()
        o = lora_effective_weight(layer.self_attn.o_proj).double().abs() * squares["o"].sqrt()
    torch.testing.assert_close(scores[2], down.sum(0), rtol=1e-4, atol=1e-6)
    head_columns = o.sum(0).view(attn.size, -1).sum(1)  # o_proj columns of KV group g, in order
    torch.testing.assert_close(scores[1], head_columns, rtol=1e-4, atol=1e-6)


def test_taylor_matches_hf_gradients(discovered, tiny_models, calibration_ids):
    module = discovered("llama", True)
    groups = module.attributes["groups"]
    scores = score_groups(module, groups, "taylor", family_ids=[2],
                          calibration=CalibrationOptions(str(calibration_ids), 2, 2, 16, 0))
    peft = tiny_models["llama"].peft
    mlp = peft.base_model.model.model.layers[0].mlp
    projections = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    expected = torch.zeros(groups.families[2].size, dtype=torch.float64)
    for p in projections:
        p.base_layer.weight.requires_grad_(True)
    try:
        for ids in layer0_batches(module, calibration_ids):
            for p in projections:
                p.base_layer.weight.grad = None
            peft(input_ids=ids, labels=ids).loss.backward()
            with torch.no_grad():
                gate, up, down = ((lora_effective_weight(p) * p.base_layer.weight.grad).double()
                                  for p in projections)
                expected += (gate.sum(1) + up.sum(1) + down.sum(0)).abs()
    finally:
        for p in projections:
            p.base_layer.weight.requires_grad_(False)
            p.base_layer.weight.grad = None
    torch.testing.assert_close(scores[2], expected, rtol=1e-3, atol=1e-7)


def test_live_model_taylor_scores_it_as_it_is_and_leaves_its_training_state(discovered, calibration_ids):
    """lhspg{rescore=true} scores its training model: the scores are those of a module holding
    the model's current values, and requires_grad and .grad of every parameter are untouched."""
    from lorashear.analysis.saliency import model_gradient_scores
    from lorashear.runtime.executor import lora_param_names

    module = discovered("llama", True)
    groups = module.attributes["groups"]
    options = CalibrationOptions(str(calibration_ids), 2, 2, 16, 0)
    model = emit_torch(module)
    generator = torch.Generator().manual_seed(0)
    markers = {}
    with torch.no_grad():
        for name in sorted(lora_param_names(module)):
            tensor = model.tensor(name)
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)  # "trained" LoRA
            markers[name] = torch.full_like(tensor, 7.0)
            tensor.grad = markers[name]
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    live = model_gradient_scores(model, module, groups, range(len(groups.families)),
                                 calibration_batches(module, options, "test"))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert any(before.values()) and not all(before.values())
    for name, marker in markers.items():
        assert model.tensor(name).grad is marker
    assert all(p.grad is None for n, p in model.named_parameters() if n not in markers)
    snapshot = clone_module(module)
    for name in lora_param_names(module):
        snapshot.params[name].storage = DataStorage(model.tensor(name).detach().clone())
    expected = score_groups(snapshot, groups, "taylor", calibration=options)
    fresh = score_groups(module, groups, "taylor", calibration=options)
    for f, values in expected.items():
        torch.testing.assert_close(live[f], values, rtol=1e-6, atol=1e-9)
    assert any(not torch.allclose(live[f], fresh[f]) for f in fresh), "the LoRA change went unseen"


# --- random ---------------------------------------------------------------------------------
def test_random_is_seeded_and_independent_of_the_family_subset(discovered):
    module = discovered("llama", True)
    groups = module.attributes["groups"]
    first = score_groups(module, groups, "random", seed=3)
    again = score_groups(module, groups, "random", seed=3)
    other = score_groups(module, groups, "random", seed=4)
    subset = score_groups(module, groups, "random", seed=3, family_ids=[2])
    for f in first:
        assert torch.equal(first[f], again[f])
        assert not torch.equal(first[f], other[f])
    assert torch.equal(subset[2], first[2])


# --- prune ----------------------------------------------------------------------------------
def prune(module: Module, text: str) -> dict:
    manager = PassManager.parse(text)
    manager.run(module)
    return manager.records[-1].statistics


def prunable_units(module: Module, kinds=("attn", "mlp")):
    groups = module.attributes["groups"]
    return [(f, param_units_numel(module, f)) for f in groups.families if f.kind in kinds]


@pytest.mark.parametrize("scope", ["per-layer", "global"])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.55])
def test_removed_share_is_within_one_unit_of_ratio(discovered, scope, ratio):
    module = discovered("llama", True)
    stats = prune(module, f"prune{{ratio={ratio},scope={scope}}}")
    units = prunable_units(module)
    prunable = sum(n * f.size for f, n in units)
    removed = module.attributes["prune-mask"].as_dict()
    taken = sum(n * len(removed.get(f.id, ())) for f, n in units)
    assert stats["parameters removed"] == taken and stats["prunable parameters"] == prunable
    assert abs(taken - ratio * prunable) <= max(n for _, n in units)
    assert all(len(removed.get(f.id, ())) < f.size for f, _ in units)
    if scope == "per-layer":  # uniform shapes: every family of a kind loses as many units
        for kind in ("attn", "mlp"):
            assert len({len(removed.get(f.id, ())) for f, _ in units if f.kind == kind}) == 1


def test_chosen_groups_are_exactly_zero_and_lowest_scored(discovered):
    module = discovered("llama", True)
    PassManager.parse("saliency{metric=magnitude},prune{ratio=0.3}").run(module)
    groups = module.attributes["groups"]
    scores = module.attributes["saliency"].as_dict()
    for family_id, units in module.attributes["prune-mask"].as_dict().items():
        family = groups.families[family_id]
        kept = sorted(set(range(family.size)) - set(units))
        assert max(scores[family_id][u] for u in units) <= min(scores[family_id][u] for u in kept)
        for member in family.members:
            tensor = module.params[member.param].storage.load()
            length = tensor.shape[member.axis]
            assert tensor.index_select(member.axis, member.indices(length, family.size, units)).eq(0).all()
            assert tensor.index_select(member.axis, member.indices(length, family.size, kept)).ne(0).any()


@pytest.mark.parametrize("family, with_lora, options", [
    ("llama", True, "ratio=0.3"),
    ("llama", False, "ratio=0.4,scope=global,kinds=attn,mlp,hidden"),
    ("qwen2", True, "ratio=0.25,kinds=mlp,hidden,scope=global"),
])
def test_prune_then_compress_matches_the_masked_model(discovered, family, with_lora, options):
    module = discovered(family, with_lora)
    prune(module, f"prune{{{options}}}")
    ids, mask = random_batch(module.params["model.embed_tokens.weight"].type.shape[0])
    with torch.no_grad():
        masked = emit_torch(module)(ids, attention_mask=mask).logits
    before = module.num_parameters()
    PassManager.parse("compress").run(module)
    assert module.num_parameters() < before
    with torch.no_grad():
        compressed = emit_torch(module)(ids, attention_mask=mask).logits
    assert (masked - compressed).abs().max() <= 1e-4


def test_align_rounds_mlp_kept_counts(discovered):
    module = discovered("llama", True)
    prune(module, "prune{ratio=0.3,kinds=mlp,align=16}")
    groups = module.attributes["groups"]
    for family_id, units in module.attributes["prune-mask"].as_dict().items():
        assert (groups.families[family_id].size - len(units)) % 16 == 0
    assert align_count(5, 96, 16, 0) == 0 and align_count(9, 96, 16, 0) == 16
    assert align_count(95, 96, 16, 0) == 80  # at least `align` kept


def test_prune_uses_stored_scores_unless_another_metric_is_asked(discovered):
    module = discovered("llama", True)
    stats = prune(module, "saliency{metric=random,seed=3},prune{ratio=0.2}")
    assert stats["metric"] == "random"
    random_mask = module.attributes["prune-mask"]
    other = discovered("llama", True)
    stats = prune(other, "saliency{metric=random,seed=3},prune{ratio=0.2,metric=magnitude}")
    assert stats["metric"] == "magnitude"
    assert other.attributes["prune-mask"] != random_mask


def test_attn_share_zero_takes_the_whole_ratio_from_the_mlp(discovered):
    module = discovered("llama", True)
    stats = prune(module, "prune{ratio=0.3,metric=magnitude,attn-share=0}")
    assert "attn groups removed" not in stats or stats["attn groups removed"] == 0
    assert stats["mlp groups removed"] > 0
    removed = module.attributes["prune-mask"].as_dict()
    groups = module.attributes["groups"]
    mlp_unit = max(param_units_numel(module, f) for f in groups.families if f.kind == "mlp")
    mlp_families = sum(f.kind == "mlp" for f in groups.families)
    assert not any(removed.get(f.id) for f in groups.families if f.kind == "attn")
    # the ratio still counts attention + MLP: the MLP takes all of it
    assert abs(stats["parameters removed"] - 0.3 * stats["prunable parameters"]) <= mlp_families * mlp_unit / 2


def test_attn_share_auto_keeps_the_split_whose_masked_model_has_the_least_loss(discovered, calibration_ids):
    """Each split it reports is the one a fixed ``attn-share`` gives, its loss is the loss of
    that masked module measured independently, and the least of them is the one kept."""
    data = f'data="{calibration_ids}",batches=2,batch=2,seq-len=16'
    module = discovered("llama", True)
    stats = prune(module, f"prune{{ratio=0.3,metric=magnitude,attn-share=auto,{data}}}")
    losses = stats["attn-share losses"]
    assert len(losses) >= 2  # the tiny Llama gives at least two distinct splits
    assert stats["attn-share chosen"] == min(losses, key=losses.get)
    batches = calibration_batches(module, CalibrationOptions(str(calibration_ids), 2, 2, 16, 0), "test")
    for label, loss in losses.items():
        fixed = discovered("llama", True)
        prune(fixed, f"prune{{ratio=0.3,metric=magnitude,attn-share={label}}}")
        with torch.no_grad():
            model = emit_torch(fixed)
            measured = sum(model(b, labels=b).loss.item() for b in batches) / len(batches)
        assert measured == pytest.approx(loss, abs=1e-4), label
        if label == stats["attn-share chosen"]:
            assert fixed.attributes["prune-mask"] == module.attributes["prune-mask"]
            for name, p in fixed.params.items():  # the search restored every weight it zeroed
                assert torch.equal(p.storage.load(), module.params[name].storage.load()), name


def test_prune_reads_calibration_once_for_scores_and_split(discovered, calibration_ids, monkeypatch):
    """wanda scores and the split search run on the same windows, read from the file once."""
    from lorashear.data import calibration

    reads = []
    real = calibration.read_token_ids
    monkeypatch.setattr(calibration, "read_token_ids", lambda path: reads.append(path) or real(path))
    module = discovered("llama", True)
    stats = prune(module, f'prune{{ratio=0.3,metric=wanda,attn-share=auto,data="{calibration_ids}",'
                          "batches=2,batch=2,seq-len=16}")
    assert len(stats["attn-share losses"]) >= 2 and len(reads) == 1


@pytest.mark.parametrize("kinds", ["attn", "mlp"])
def test_attn_share_auto_with_one_kind_is_the_proportional_split_and_needs_no_data(discovered, kinds):
    auto, proportional = discovered("llama", True), discovered("llama", True)
    stats = prune(auto, f"prune{{ratio=0.3,metric=magnitude,kinds={kinds},attn-share=auto}}")
    prune(proportional, f"prune{{ratio=0.3,metric=magnitude,kinds={kinds}}}")
    assert "attn-share chosen" not in stats
    assert auto.attributes["prune-mask"] == proportional.attributes["prune-mask"]


@settings(max_examples=60, deadline=None)
@given(layers=st.integers(1, 3), kv_groups=st.integers(2, 4), ratio=st.floats(0.05, 0.9),
       seed=st.integers(0, 2 ** 16))
def test_search_attn_share_measures_each_split_once_and_keeps_the_least(layers, kv_groups, ratio, seed):
    generator = torch.Generator().manual_seed(seed)
    budgets = []
    for layer in range(layers):
        for kind, size, numel in (("attn", kv_groups, 40), ("mlp", 24, 3)):
            family = GroupFamily(len(budgets), kind, layer, size, (FamilyMember("w", 0, 1),))
            budgets.append(FamilyBudget(family, torch.rand(size, generator=generator, dtype=torch.float64),
                                        numel, ()))
    measured = []

    def loss_of(removed):  # a made-up loss: any function of the removal will do
        key = tuple(sorted(removed.items()))
        measured.append(key)
        return float(hash(key) % 1000) / 7

    split = search_attn_share(budgets, ratio, "per-layer", 1, loss_of)
    assert len(set(measured)) == len(measured) == len(split.tried)
    candidates = {tuple(sorted(choose_units(budgets, ratio, "per-layer", 1, s).items()))
                  for s in (None, *AUTO_SHARES)}
    assert set(measured) == candidates
    best = min(loss for _, _, loss in split.tried)
    assert loss_of(split.removed) == best
    assert split.removed == choose_units(budgets, ratio, "per-layer", 1, split.share)


def test_second_prune_keeps_earlier_removals(discovered):
    module = discovered("llama", True)
    prune(module, "prune{ratio=0.2,metric=random}")
    first = module.attributes["prune-mask"].as_dict()
    prune(module, "prune{ratio=0.4,metric=magnitude}")
    second = module.attributes["prune-mask"].as_dict()
    assert all(set(units) <= set(second[f]) for f, units in first.items())


def test_choose_units_never_empties_a_family():
    family = GroupFamily(0, "mlp", 0, 4, (FamilyMember("w", 0, 1),))
    budget = FamilyBudget(family, torch.tensor([4.0, 3.0, 2.0, 1.0]), 10, ())
    for scope in ("per-layer", "global"):
        assert choose_units([budget], 0.99, scope) == {0: (1, 2, 3)}
        assert choose_units([budget], 0.5, scope) == {0: (2, 3)}


@settings(max_examples=150, deadline=None)
@given(layers=st.integers(1, 4), kv_groups=st.integers(2, 4), channels=st.integers(8, 48),
       ratio=st.floats(0.0, 0.95), scope=st.sampled_from(["per-layer", "global"]),
       seed=st.integers(0, 2 ** 16),
       attn_share=st.one_of(st.none(), st.just(0.0), st.floats(0.0, 1.0)))
def test_choose_units_properties(layers, kv_groups, channels, ratio, scope, seed, attn_share):
    """Random layouts: no family emptied, per-layer shapes uniform, the share near the ratio,
    attention's part near ``attn_share`` of it (none at all at 0)."""
    generator = torch.Generator().manual_seed(seed)
    budgets = []
    for layer in range(layers):
        for kind, size, numel in (("attn", kv_groups, 40), ("mlp", channels, 3)):
            family = GroupFamily(len(budgets), kind, layer, size, (FamilyMember("w", 0, 1),))
            budgets.append(FamilyBudget(family, torch.rand(size, generator=generator, dtype=torch.float64),
                                        numel, ()))
    removed = choose_units(budgets, ratio, scope, attn_share=attn_share)
    counts = {b.family.id: len(removed[b.family.id]) for b in budgets}
    assert all(counts[b.family.id] < b.family.size for b in budgets)
    for b in budgets:  # the lowest-scored units go
        units = removed[b.family.id]
        kept = [u for u in range(b.family.size) if u not in units]
        assert not units or max(b.scores[list(units)]) <= min(b.scores[kept])
    if scope == "per-layer":
        for kind in ("attn", "mlp"):
            assert len({counts[b.family.id] for b in budgets if b.family.kind == kind}) == 1
    prunable = sum(b.unit_numel * b.family.size for b in budgets)
    taken = sum(b.unit_numel * counts[b.family.id] for b in budgets)
    mlp_counts = [(counts[b.family.id], b.family.size) for b in budgets if b.family.kind == "mlp"]
    if scope == "global" and all(c < size - 1 for c, size in mlp_counts):
        assert abs(taken - ratio * prunable) <= 40 / 2 + 3 / 2
    if scope == "per-layer" and all(0 < c < size - 1 for c, size in mlp_counts):
        assert abs(taken - ratio * prunable) <= layers * 3 / 2  # half an MLP unit per layer
    if attn_share is not None:
        attn_taken = sum(b.unit_numel * counts[b.family.id] for b in budgets if b.family.kind == "attn")
        if attn_share == 0.0:
            assert attn_taken == 0
        if all(counts[b.family.id] < kv_groups - 1 for b in budgets if b.family.kind == "attn"):  # none at its floor
            assert abs(attn_taken - attn_share * ratio * prunable) <= layers * 40  # a KV unit per layer


@settings(max_examples=100, deadline=None)
@given(layers=st.integers(2, 4), channels=st.integers(8, 48), ratio=st.floats(0.0, 0.4),
       scope=st.sampled_from(["per-layer", "global"]), align=st.sampled_from([1, 4]),
       seed=st.integers(0, 2 ** 16), data=st.data())
def test_choose_units_takes_the_ratio_from_the_unprotected_families(layers, channels, ratio, scope, align,
                                                                    seed, data):
    """Families a knowledge analysis protects lose nothing (``align`` included), yet count in the
    ratio's base: the others make up the whole ratio of every family's parameters."""
    generator = torch.Generator().manual_seed(seed)
    protected = data.draw(st.sets(st.integers(0, 2 * layers - 1), max_size=layers - 1))
    budgets = []
    for layer in range(layers):
        for kind, size, numel in (("attn", 3, 40), ("mlp", channels, 3)):
            family = GroupFamily(len(budgets), kind, layer, size, (FamilyMember("w", 0, 1),))
            budgets.append(FamilyBudget(family, torch.rand(size, generator=generator, dtype=torch.float64),
                                        numel, (), family.id in protected))
    removed = choose_units(budgets, ratio, scope, align)
    counts = {b.family.id: len(removed[b.family.id]) for b in budgets}
    assert all(counts[f] == 0 for f in protected)
    free = [b for b in budgets if not b.protected]
    if scope == "per-layer":
        for kind in ("attn", "mlp"):
            assert len({counts[b.family.id] for b in free if b.family.kind == kind}) <= 1
    total = sum(b.unit_numel * b.family.size for b in budgets)
    taken = sum(b.unit_numel * counts[b.family.id] for b in budgets)
    mlp = [b for b in free if b.family.kind == "mlp"]
    if align == 1 and mlp and all(0 < counts[b.family.id] < b.family.size - 1 for b in mlp):
        # the MLP families absorb the rest: within half a unit each (global: one unit in all)
        assert abs(taken - ratio * total) <= (len(mlp) * 3 / 2 if scope == "per-layer" else 40 / 2 + 3 / 2)


@settings(max_examples=100, deadline=None)
@given(layers=st.integers(2, 5), channels=st.integers(8, 48), ratio=st.floats(0.05, 0.6),
       spread=st.floats(0.05, 0.9), scope=st.sampled_from(["per-layer", "global"]),
       seed=st.integers(0, 2 ** 16), data=st.data())
def test_graded_weights_keep_the_ratio_and_take_more_from_the_lighter_weighted(layers, channels, ratio, spread,
                                                                             scope, seed, data):
    """``knowledge{spread}``: the weights of a kind's families span 1 +- spread with mean 1; a
    heavier-weighted family never gives fewer units than a lighter one of its kind (per-layer),
    and the total still lands within half an MLP unit per family of the ratio."""
    from lorashear.analysis.knowledge import KnowledgeAttr

    generator = torch.Generator().manual_seed(seed)
    families = [GroupFamily(2 * layer + i, kind, layer, size, (FamilyMember("w", 0, 1),))
                for layer in range(layers) for i, (kind, size) in enumerate((("attn", 3), ("mlp", channels)))]
    increase = data.draw(st.lists(st.floats(-0.1, 5.0), min_size=len(families), max_size=len(families)))
    protected = data.draw(st.sets(st.sampled_from([f.id for f in families]), max_size=1))
    attr = KnowledgeAttr(3.0, tuple(enumerate(increase)), tuple(sorted(protected)), spread)
    weights = attr.share_weights(families)
    for kind in ("attn", "mlp"):
        graded = sorted((increase[f.id], f.id) for f in families if f.kind == kind and f.id not in protected)
        ws = [weights[f] for _, f in graded]
        assert ws == sorted(ws, reverse=True)  # the least sensitive gives the most
        assert math.isclose(sum(ws) / len(ws), 1.0) and max(ws) <= 1 + spread + 1e-12
        if len(ws) > 1:
            assert math.isclose(ws[0], 1 + spread) and math.isclose(ws[-1], 1 - spread)
    assert all(weights[f] == 1.0 for f in protected)
    assert KnowledgeAttr.from_json(attr.to_json()) == attr
    budgets = [FamilyBudget(f, torch.rand(f.size, generator=generator, dtype=torch.float64), 40 if f.kind == "attn"
                            else 3, (), f.id in protected, weights[f.id]) for f in families]
    removed = choose_units(budgets, ratio, scope, attn_share=0.0)
    counts = {b.family.id: len(removed[b.family.id]) for b in budgets}
    assert all(counts[f] == 0 for f in protected) and all(counts[b.family.id] < b.family.size for b in budgets)
    mlp = [b for b in budgets if b.family.kind == "mlp" and not b.protected]
    total = sum(b.unit_numel * b.family.size for b in budgets)
    taken = sum(b.unit_numel * counts[b.family.id] for b in budgets)
    if ratio * total <= sum(3 * (b.family.size - 1) for b in mlp):  # reachable: capped families' excess
        assert abs(taken - ratio * total) <= (len(mlp) * 3 / 2 if scope == "per-layer" else 3 / 2)
    if scope == "per-layer":
        for a in mlp:
            for b in mlp:
                if a.weight > b.weight:
                    assert counts[a.family.id] >= counts[b.family.id]
        if len(mlp) > 1 and all(counts[b.family.id] < b.family.size - 1 for b in mlp):  # none capped
            share = ratio * total / sum(3 * b.weight * b.family.size for b in mlp)
            heavy, light = max(mlp, key=lambda b: b.weight), min(mlp, key=lambda b: b.weight)
            assert counts[heavy.family.id] - counts[light.family.id] >= share * (
                heavy.weight - light.weight) * channels - 1


def test_spread_zero_and_old_analyses_leave_every_share_equal():
    from lorashear.analysis.knowledge import KnowledgeAttr

    families = [GroupFamily(i, "mlp", i, 8, (FamilyMember("w", 0, 1),)) for i in range(3)]
    old = KnowledgeAttr.from_json({"base_loss": 3.0, "loss_increase": {"0": 0.5, "1": 0.1, "2": 0.9},
                                   "protected": [2]})
    assert old.spread == 0.0 and "spread" not in old.to_json()
    assert old.share_weights(families) == {0: 1.0, 1: 1.0, 2: 1.0}
    graded = KnowledgeAttr(3.0, old.loss_increase, (2,), 0.25)
    assert graded.share_weights(families) == {0: 0.75, 1: 1.25, 2: 1.0}


# --- errors ---------------------------------------------------------------------------------
def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("text, message", [
    ("prune{ratio=1}", "ratio must be in [0, 1)"),
    ("prune{ratio=-0.1}", "ratio must be in [0, 1)"),
    ("prune{kinds=heads}", "kinds must be among"),
    ("saliency{metric=fisher}", "expected one of magnitude"),
    ("saliency{metric=combined,weights=1,2}", "takes 5 weights"),
    ("prune{attn-share=1.5}", "attn-share must be in [0, 1], proportional or auto"),
    ("prune{attn-share=half}", "expected a number or one of proportional, auto, got 'half'"),
    ("prune{attn-share=auto}", "no data is given"),
    ("prune{attn-share=0,kinds=mlp}", "needs attn among the kinds"),
    ("prune{attn-share=0.5,kinds=attn}", "kinds=attn has none"),
    ("lhspg{attn-share=-0.5,data=x.ids}", "attn-share must be in [0, 1], proportional or auto"),
])
def test_bad_options_fail_at_parse_time(text, message):
    with pytest.raises(PassError) as exc:
        parse_pipeline(text)
    assert message in one_line(exc)


def test_align_larger_than_a_family(discovered):
    module = discovered("llama", True)
    with pytest.raises(PassError) as exc:
        PassManager.parse("prune{ratio=0.2,align=200}").run(module)
    assert "align=200 is larger than family" in one_line(exc)


@pytest.mark.parametrize("text, message", [
    ("saliency{metric=taylor}", "needs calibration text: data=PATH"),
    ('saliency{metric=wanda,data="/nonexistent/calib.txt"}', "does not exist"),
    ("saliency{metric=taylor,batches=100}", "fewer than the 400 asked for"),
])
def test_calibration_errors(discovered, calibration_ids, text, message):
    module = discovered("llama", True)
    if "batches=100" in text:
        text = text.replace("}", f',data="{calibration_ids}"}}')
    with pytest.raises(PassError) as exc:
        PassManager.parse(text).run(module)
    assert message in one_line(exc)


def test_text_data_needs_a_tokenizer(discovered, tmp_path):
    module = discovered("llama", True)
    text = tmp_path / "calib.txt"
    text.write_text("It is a truth universally acknowledged. " * 50)
    with pytest.raises(PassError) as exc:
        PassManager.parse(f'saliency{{metric=wanda,data="{text}"}}').run(module)
    assert "no tokenizer next to the source model" in one_line(exc)


def test_saliency_and_prune_need_groups(lowered):
    module = clone_module(lowered("llama", True))
    module.attributes.pop("groups", None)
    for text in ("saliency", "prune"):
        with pytest.raises(PassError, match="run 'discover' before"):
            PassManager.parse(text).run(module)


# --- a whole pipeline -----------------------------------------------------------------------
def test_pipeline_discover_saliency_prune_compress(lowered):
    module = clone_module(lowered("llama", True))
    module.attributes.pop("groups", None)
    before = module.num_parameters()
    manager = PassManager.parse("discover,saliency{metric=magnitude},prune{ratio=0.3},compress")
    manager.run(module)
    assert [r.pipeline_text for r in manager.records] == [
        "discover", "saliency", "prune{ratio=0.3}", "compress"]
    assert 0.29 <= manager.records[2].statistics["parameter share removed"] <= 0.31
    assert module.num_parameters() < before
    ids, mask = random_batch(128)
    assert torch.isfinite(emit_torch(module)(ids, attention_mask=mask).logits).all()
