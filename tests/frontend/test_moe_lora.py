"""peft LoRA on fused MoE expert weights (``target_parameters``): lowered as one ``lora_linear``
per expert (peft's ``ParamWrapper`` factors sliced per expert), so each expert's LoRA joins its
expert's channel family, compress and merge-lora stay exact, and an adapter saved by peft
binds by its own keys (the two nested wrappers' factors keep distinct names). A router's LoRA
(``all-linear`` adapts its weight too) is an ordinary ``lora_linear`` whose ``B`` rows join the
layer's expert family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorashear.analysis.groups import PruneMaskAttr
from lorashear.analysis.masking import zero_groups
from lorashear.errors import LoweringError
from lorashear.frontend.lower import canonical_param_name, lower
from lorashear.ir.core import clone_module
from lorashear.ir.lora import lora_parts
from lorashear.passes import PassManager
from tests.conftest import with_lora
from tests.frontend.moe_models import EXPERTS, LAYERS, LoweredMoE, routed_base

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]


def _base(family: str):
    base, config, width_key = routed_base(family)
    return base, getattr(config, width_key)


class Tiny(LoweredMoE):
    def __init__(self, family: str, targets: str, root: Path) -> None:
        from peft import LoraConfig

        base, self.width = _base(family)
        self.model_dir, self.adapter_dir = root / "model", root / "adapter"
        self.all_linear = targets == "all-linear"  # peft adds the routers' weights (and a rank of 8 on gate_up)
        base.save_pretrained(self.model_dir)
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if self.all_linear else \
            LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, target_parameters=EXPERT_PARAMS)
        super().__init__(with_lora(base, config, self.adapter_dir))


@pytest.fixture(scope="module", params=[("mixtral", "experts"), ("qwen3_moe", "experts"),
                                        ("mixtral", "all-linear"), ("qwen3_moe", "all-linear")],
                ids=lambda p: "-".join(p))
def tiny(request, tmp_path_factory) -> Tiny:
    return Tiny(*request.param, tmp_path_factory.mktemp(request.param[0]))


def _expert(layer: int, e: int, leaf: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{e}.{leaf}"


def test_nested_param_wrappers_keep_distinct_names():
    outer, inner = "m.experts.lora_A.default.weight", "m.experts.base_layer.lora_A.default.weight"
    assert canonical_param_name(outer) == "m.experts.lora_A.weight"
    assert canonical_param_name(inner) == "m.experts.base_layer.lora_A.weight"  # peft's adapter key
    assert canonical_param_name("m.experts.base_layer.base_layer.down_proj") == "m.experts.down_proj"
    assert canonical_param_name("m.q_proj.base_layer.weight") == "m.q_proj.weight"


def test_expert_lora_lowers_per_expert_and_equals_peft(tiny):
    module = clone_module(tiny.lowered)
    assert (tiny.logits(module) - tiny.want).abs().max().item() <= 1e-4
    for layer in range(LAYERS):
        outer = tiny.peft_model.base_model.model.model.layers[layer].mlp.experts
        for leaf, wrapper in (("down_proj", outer), ("gate_up_proj", outer.base_layer)):
            assert wrapper.parameter_name == leaf
            a = wrapper.lora_A["default"].weight.detach()
            r = a.shape[0] // EXPERTS
            for e in range(EXPERTS):
                (op,) = [op for op in module.graph.ops if op.kind == "lora_linear"
                         and op.args[1].name == _expert(layer, e, leaf)]
                parts = lora_parts(op)
                assert parts.lora_a.name == _expert(layer, e, leaf) + "_lora_A"
                assert parts.lora_b.name == _expert(layer, e, leaf) + "_lora_B"
                assert parts.scaling == 2.0
                assert torch.equal(parts.lora_a.storage.load(), a[r * e:r * e + r])
    assert not any(".lora_A.weight" in n and ".experts." in n for n in module.params)


def test_expert_lora_joins_each_experts_channel_family(tiny):
    module = clone_module(tiny.lowered)
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    for layer in range(LAYERS):
        for e in range(EXPERTS):
            gate_up, down = _expert(layer, e, "gate_up_proj"), _expert(layer, e, "down_proj")
            (family,) = [f for f in groups.families if f.kind == "mlp" and any(m.param == down for m in f.members)]
            assert family.size == tiny.width
            assert {(m.param, m.axis) for m in family.members} == {
                (gate_up, 0), (gate_up + "_lora_B", 0), (down, 1), (down + "_lora_A", 1)}
        (experts,) = [f for f in groups.families if f.kind == "expert" and f.layer == layer]
        router = f"model.layers.{layer}.mlp.gate."
        want = {router + "weight", router + "expert_mask"} | ({router + "lora_B.weight"} if tiny.all_linear else set())
        assert {m.param for m in experts.members} == want and all(m.axis == 0 for m in experts.members)


def _prune(module, experts_by_layer: dict[int, tuple[int, ...]]) -> None:
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    removed = {}
    for f in groups.families:
        if f.kind == "expert":
            removed[f.id] = experts_by_layer[f.layer]
        elif f.kind == "mlp" and all(".experts." in m.param for m in f.members):
            removed[f.id] = tuple(range(f.id % 3, f.size, 3))
    zero_groups(module, groups, removed)
    module.attributes["prune-mask"] = PruneMaskAttr.from_dict(removed)


def test_prune_and_compress_with_expert_lora_are_exact(tiny):
    module = clone_module(tiny.lowered)
    _prune(module, {0: (1,), 1: (0, 3)})
    masked = tiny.logits(module)
    assert (masked - tiny.want).abs().max().item() > 1e-3  # the removed experts and channels were in use
    small = clone_module(module)
    PassManager.parse("compress").run(small)
    assert (tiny.logits(small) - masked).abs().max().item() <= 1e-5
    for layer, kept in ((0, 3), (1, 2)):
        names = {n for n in small.params if n.startswith(f"model.layers.{layer}.mlp.experts.")}
        assert names == {_expert(layer, e, leaf + suffix) for e in range(kept)
                         for leaf in ("gate_up_proj", "down_proj") for suffix in ("", "_lora_A", "_lora_B")}
        for e in range(kept):
            width = small.params[_expert(layer, e, "down_proj")].type.shape[1]
            assert width < tiny.width
            assert tuple(small.params[_expert(layer, e, "down_proj_lora_A")].type.shape) == (4, width)
            assert small.params[_expert(layer, e, "gate_up_proj_lora_B")].type.shape[0] == 2 * width
        if tiny.all_linear:
            assert tuple(small.params[f"model.layers.{layer}.mlp.gate.lora_B.weight"].type.shape) == (kept, 4)


def test_merge_lora_on_expert_lora_is_exact(tiny):
    module = clone_module(tiny.lowered)
    PassManager.parse("merge-lora").run(module)
    assert not any(op.kind == "lora_linear" for op in module.graph.ops)
    assert not any("lora" in n for n in module.params)
    assert (tiny.logits(module) - tiny.want).abs().max().item() <= 1e-4


def test_expert_lora_names_are_the_saved_adapters_keys(tiny):
    """lower_pretrained binds adapter factors by these names (the base checkpoint's per-expert
    keys, which transformers fuses on load, are another matter: frontend/pretrained.py)."""
    from safetensors import safe_open

    with safe_open(str(tiny.adapter_dir / "adapter_model.safetensors"), "pt") as f:
        saved = {k.removeprefix("base_model.model.") for k in f.keys()}
    names = {canonical_param_name(n.removeprefix("base_model.model."))
             for n, _ in tiny.peft_model.named_parameters() if "lora_" in n}
    assert names == saved
    assert len(saved) == 2 * LAYERS * (len(ATTENTION) + len(EXPERT_PARAMS) + tiny.all_linear)


def test_param_lora_outside_moe_is_refused():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    base = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                        num_hidden_layers=1, num_attention_heads=2))
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=[], target_parameters=["q_proj.weight"]))
    with pytest.raises(LoweringError, match=r"module model\.layers\.0\.self_attn\.q_proj adapts the parameter weight"):
        lower(peft_model)
