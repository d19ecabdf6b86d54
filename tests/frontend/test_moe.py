"""Mixture of Experts (Mixtral, Qwen3-MoE): fused 3-D experts lower exactly as one gated MLP
per expert, each expert's channels are a family, compress slices them exactly, and the
result runs in ONNX Runtime and reloads (lorashear and, pruned uniformly, stock transformers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorashear.analysis.groups import FamilyMember, PruneMaskAttr
from lorashear.analysis.masking import zero_groups
from lorashear.errors import PassError
from lorashear.frontend.lower import lower
from lorashear.ir.core import clone_module
from lorashear.passes import PassManager
from tests.conftest import with_lora
from tests.frontend.moe_models import EXPERTS, TOP_K, LoweredMoE, routed_base

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
SHARED = ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj", "shared_expert_gate"]


class Tiny(LoweredMoE):
    def __init__(self, family: str, root: Path) -> None:
        from peft import LoraConfig

        base, config, self.width_key = routed_base(family)
        self.width = getattr(config, self.width_key)
        self.model_dir = root / "model"
        base.save_pretrained(self.model_dir)  # for the stock reload's comparison of configs
        targets = ATTENTION + (SHARED if family == "qwen2_moe" else [])
        super().__init__(with_lora(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets)))

    def module(self):
        """A fresh copy of the lowered model (passes change it in place)."""
        return clone_module(self.lowered)


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def tiny(request, tmp_path_factory) -> Tiny:
    return Tiny(request.param, tmp_path_factory.mktemp(request.param))


def _expert_params(module, layer: int, expert: int) -> tuple[str, str]:
    prefix = f"model.layers.{layer}.mlp.experts.{expert}."
    return prefix + "gate_up_proj", prefix + "down_proj"


def test_lowered_logits_equal_peft(tiny):
    module = tiny.module()
    assert (tiny.logits(module) - tiny.want).abs().max().item() <= 1e-4
    full = lower(tiny.peft_model, trace_all_layers=True)  # every layer traced: the same numbers
    assert (tiny.logits(full) - tiny.logits(module)).abs().max().item() == 0
    for layer in range(2):
        assert f"model.layers.{layer}.mlp.experts.gate_up_proj" not in module.params
        for e in range(EXPERTS):
            gate_up, down = _expert_params(module, layer, e)
            assert tuple(module.params[gate_up].type.shape) == (2 * tiny.width, 64)
            assert tuple(module.params[down].type.shape) == (64, tiny.width)
    assert {op.kind for op in module.graph.ops} >= {"topk", "scatter_add", "lora_linear"}


def test_discover_finds_each_experts_channels(tiny):
    module = tiny.module()
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    for layer in range(2):
        for e in range(EXPERTS):
            gate_up, down = _expert_params(module, layer, e)
            (family,) = [f for f in groups.families if any(m.param == down for m in f.members)
                         and f.kind == "mlp"]
            assert family.layer == layer and family.size == tiny.width
            assert {(m.param, m.axis, m.stride) for m in family.members} == {(gate_up, 0, 1), (down, 1, 1)}
        (experts,) = [f for f in groups.families if f.kind == "expert" and f.layer == layer]
        router = f"model.layers.{layer}.mlp.gate."
        assert experts.size == EXPERTS
        assert set(experts.members) == {FamilyMember(router + "weight", 0, 1),
                                        FamilyMember(router + "expert_mask", 0, 1)}
        assert (router + "weight", 0) not in {(name, axis) for name, axis, _ in groups.unprunable}
    assert {"attn", "hidden"} <= {f.kind for f in groups.families}


def _mask(module, removed: dict[int, tuple[int, ...]]) -> None:
    """What ``prune`` does with its choice: zero the units and record the mask."""
    groups = module.attributes["groups"]
    zero_groups(module, groups, removed)
    module.attributes["prune-mask"] = PruneMaskAttr.from_dict(removed)


def _choose(module, experts_by_layer: dict[int, tuple[int, ...]], channels_every: int):
    """Remove the given experts per layer and every ``channels_every``-th channel of each
    expert (offset by expert, so experts keep different channels)."""
    PassManager.parse("discover").run(module)
    removed = {}
    for f in module.attributes["groups"].families:
        if f.kind == "expert":
            removed[f.id] = experts_by_layer[f.layer]
        elif f.kind == "mlp" and all(".experts." in m.param for m in f.members):
            removed[f.id] = tuple(range(f.id % channels_every, f.size, channels_every))
    _mask(module, removed)


def test_removing_whole_experts_is_exact(tiny, tmp_path):
    import onnxruntime as ort

    from lorashear.runtime.onnx_emit import emit_onnx

    module = tiny.module()
    _choose(module, {0: (1,), 1: (0, 3)}, channels_every=4)
    masked = tiny.logits(module)
    assert (masked - tiny.want).abs().max().item() > 1e-3  # the removed experts were in use
    small = clone_module(module)
    PassManager.parse("compress").run(small)
    assert (tiny.logits(small) - masked).abs().max().item() <= 1e-5
    for layer, kept in ((0, 3), (1, 2)):
        assert tuple(small.params[f"model.layers.{layer}.mlp.gate.weight"].type.shape) == (kept, 64)
        names = {n for n in small.params if n.startswith(f"model.layers.{layer}.mlp.experts.")}
        assert names == {n for e in range(kept) for n in _expert_params(small, layer, e)}
    assert not any(op.kind == "select" and op.args[2] >= 3 for op in small.graph.ops if op.loc.endswith("experts"))
    emit_onnx(small, tmp_path / "moe.onnx")
    session = ort.InferenceSession(str(tmp_path / "moe.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input_ids": tiny.ids.numpy(), "attention_mask": tiny.mask.numpy()})
    assert (torch.from_numpy(logits) - tiny.logits(small)).abs().max().item() <= 1e-4


def test_compress_refuses_to_leave_fewer_experts_than_top_k(tiny):
    module = tiny.module()
    _choose(module, {0: (0, 1, 2), 1: ()}, channels_every=8)
    with pytest.raises(PassError, match="top-k chooses 2"):
        PassManager.parse("compress").run(module)


@pytest.fixture(scope="module")
def compressed(tiny):
    module = tiny.module()
    PassManager.parse("discover").run(module)
    PassManager.parse("prune{ratio=0.3,metric=random,kinds=attn,mlp,hidden}").run(module)
    small = clone_module(module)
    PassManager.parse("compress").run(small)
    return module, small


def test_compress_is_exact_and_shrinks_every_expert(tiny, compressed):
    masked, small = compressed
    assert (tiny.logits(small) - tiny.logits(masked)).abs().max().item() <= 1e-5
    for layer in range(2):
        for e in range(EXPERTS):
            gate_up, down = _expert_params(small, layer, e)
            width = small.params[down].type.shape[1]
            assert width < tiny.width
            assert tuple(small.params[gate_up].type.shape)[0] == 2 * width
    assert sum(p.type.numel() for p in small.params.values()) < sum(p.type.numel() for p in masked.params.values())


def test_onnx_runtime_matches_torch_on_the_compressed_moe(tiny, compressed, tmp_path):
    import onnxruntime as ort

    from lorashear.runtime.onnx_emit import emit_onnx

    _, small = compressed
    emit_onnx(small, tmp_path / "moe.onnx")
    session = ort.InferenceSession(str(tmp_path / "moe.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input_ids": tiny.ids.numpy(), "attention_mask": tiny.mask.numpy()})
    assert (torch.from_numpy(logits) - tiny.logits(small)).abs().max().item() <= 1e-4


def test_pruned_moe_reloads_with_load_pretrained(tiny, compressed, tmp_path):
    from lorashear.runtime.hf import load_pretrained, save_model_dir

    _, small = compressed
    save_model_dir(small, tmp_path / "hf", merge=True)
    with torch.no_grad():
        got = load_pretrained(tmp_path / "hf")(tiny.ids, attention_mask=tiny.mask).logits
    assert (got - tiny.logits(small)).abs().max().item() <= 1e-5


def test_uniformly_pruned_moe_reloads_with_stock_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorashear.runtime.hf import save_model_dir

    module = tiny.module()
    _choose(module, {0: (2,), 1: (0,)}, channels_every=4)  # one expert and a quarter of each one's channels
    PassManager.parse("compress").run(module)
    save_model_dir(module, tmp_path / "hf", merge=True)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    kept = tiny.width - tiny.width // 4
    assert config[tiny.width_key] == kept and config["model_type"] in ("mixtral", "qwen3_moe", "qwen2_moe")
    assert config.get("num_local_experts", config.get("num_experts")) == EXPERTS - 1
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", experts_implementation="eager").eval()
    assert tuple(stock.model.layers[0].mlp.experts.down_proj.shape) == (EXPERTS - 1, 64, kept)
    with torch.no_grad():
        got = stock(input_ids=tiny.ids, attention_mask=tiny.mask).logits
    assert (got - tiny.logits(module)).abs().max().item() <= 1e-4


def test_experts_are_scored_by_their_routed_output(tiny):
    from lorashear.analysis.saliency import score_groups

    module = tiny.module()
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    experts = {f.layer: f.id for f in groups.families if f.kind == "expert"}
    _mask(module, {experts[0]: (2,)})  # expert 2 of layer 0 is never chosen now
    batches = torch.randint(0, 128, (2, 2, 12), generator=torch.Generator().manual_seed(3))
    scores = score_groups(module, groups, "wanda", batches=batches)
    assert scores[experts[0]][2].item() == 0.0
    assert all(scores[experts[0]][e].item() > 0 for e in (0, 1, 3))
    assert all(scores[experts[1]][e].item() > 0 for e in range(EXPERTS))
    assert set(scores) == set(range(len(groups.families)))  # the other families keep their metric


def test_shared_expert_channels_are_a_family_and_compress_exactly(tmp_path_factory):
    tiny = Tiny("qwen2_moe", tmp_path_factory.mktemp("shared"))
    module = tiny.module()
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    removed = {}
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.shared_expert."
        (shared,) = [f for f in groups.families if f.kind == "mlp"
                     and any(m.param == prefix + "down_proj.weight" for m in f.members)]
        assert shared.layer == layer and shared.size == 40
        assert {(m.param, m.axis) for m in shared.members} == {
            (prefix + "gate_proj.weight", 0), (prefix + "gate_proj.lora_B.weight", 0),
            (prefix + "up_proj.weight", 0), (prefix + "up_proj.lora_B.weight", 0),
            (prefix + "down_proj.weight", 1), (prefix + "down_proj.lora_A.weight", 1)}
        removed[shared.id] = tuple(range(layer, 40, 3))
    _mask(module, removed)
    small = clone_module(module)
    PassManager.parse("compress").run(small)
    assert (tiny.logits(small) - tiny.logits(module)).abs().max().item() <= 1e-5
    kept = {layer: 40 - len(removed_units) for layer, removed_units in enumerate(removed.values())}
    for layer in range(2):
        assert small.params[f"model.layers.{layer}.mlp.shared_expert.down_proj.weight"].type.shape[1] == kept[layer]


def test_emission_drops_the_expert_gates_only_where_no_expert_is_masked(tiny, tmp_path):
    from safetensors import safe_open

    from lorashear.runtime.hf import load_pretrained, save_model_dir

    module = tiny.module()
    _choose(module, {0: (2,), 1: (0,)}, channels_every=4)
    masked = clone_module(module)
    PassManager.parse("compress").run(module)
    for model, name in ((module, "compressed"), (masked, "masked")):
        save_model_dir(model, tmp_path / name, merge=True)
        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:
            gates = [k for k in f.keys() if k.endswith("expert_mask")]
        config = json.loads((tmp_path / name / "config.json").read_text())
        with torch.no_grad():
            got = load_pretrained(tmp_path / name)(tiny.ids, attention_mask=tiny.mask).logits
        assert (got - tiny.logits(model)).abs().max().item() <= 1e-5
        if name == "compressed":  # every mask all ones: gone, and the directory is stock
            assert gates == [] and config["model_type"] in ("mixtral", "qwen3_moe", "qwen2_moe")
        else:  # the masked experts must stay masked: the gates stay, and no stock loader is claimed
            assert len(gates) == 2 and config["model_type"] == "lorashear_ir"
            assert "experts are masked" in config["lorashear_loads_with"]
            readme = (tmp_path / name / "README.md").read_text()  # the reason whole, its own brackets kept
            assert "holds zeros; compress removes them). It loads with lorashear" in readme


@pytest.mark.parametrize("uniform", ["false", "true"])
def test_prune_keeps_as_many_experts_as_the_router_chooses(tiny, uniform):
    module = tiny.module()
    PassManager.parse("discover").run(module)
    PassManager.parse(f"prune{{ratio=0.9,metric=random,kinds=expert,uniform={uniform}}}").run(module)
    removed = module.attributes["prune-mask"].as_dict()
    experts = [f for f in module.attributes["groups"].families if f.kind == "expert"]
    assert experts and all(f.size - len(removed.get(f.id, ())) == TOP_K for f in experts)
    before = tiny.logits(module)
    PassManager.parse("compress").run(module)  # refused if fewer than TOP_K were left
    assert (tiny.logits(module) - before).abs().max().item() <= 1e-5
