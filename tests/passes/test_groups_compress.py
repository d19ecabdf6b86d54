"""discover + compress: group counts per architecture, and the pruning invariant

    for any set of groups: logits(zeroed model) == logits(compressed model)  (|diff| <= 1e-4)

as a property over random tiny configs and random group subsets of every kind."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorashear.analysis.groups import PruneMaskAttr
from lorashear.analysis.masking import keep_masks, zero_groups
from lorashear.errors import PassError
from lorashear.ir.core import clone_module
from lorashear.ir.lora import merge_lora
from lorashear.ir.parser import parse_module
from lorashear.ir.printer import print_module
from lorashear.ir.verifier import verify
from lorashear.passes import PassManager
from lorashear.passes.compress import compress_module
from lorashear.runtime.executor import emit_torch
from tests.conftest import FAMILIES, build_tiny, random_batch


def _discovered(module):
    module = clone_module(module)
    PassManager.parse("discover").run(module)
    return module


@pytest.fixture(scope="module")
def pool(lowered, tiny_models, tmp_path_factory):
    """Discovered modules: the three families with and without LoRA, plus seeded random configs."""
    from lorashear.frontend.pretrained import lower_pretrained

    modules = {f"{f}{'+lora' if lora else ''}": _discovered(lowered(f, lora))
               for f in FAMILIES for lora in (False, True)}
    rng = random.Random(1234)
    root = tmp_path_factory.mktemp("random-configs")
    for i in range(2):  # random shapes: heads, KV groups, widths, depth, tying
        kv = rng.choice([1, 2, 3])
        heads = kv * rng.choice([1, 2])
        head_dim = rng.choice([8, 16])
        overrides = dict(num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                         hidden_size=rng.choice([32, 48, 64]), intermediate_size=rng.choice([40, 72]),
                         num_hidden_layers=rng.choice([2, 3]), tie_word_embeddings=rng.random() < 0.5)
        tm = build_tiny("llama", root / f"r{i}", seed=i, config_overrides=overrides,
                        lora_targets=["q_proj", "o_proj", "up_proj"])
        modules[f"random{i}"] = _discovered(lower_pretrained(tm.model_dir, adapter=tm.adapter_dir))
    return modules


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("with_lora", [False, True])
def test_group_counts_match_architecture(lowered, family, with_lora):
    module = _discovered(lowered(family, with_lora))
    cfg = module.attributes["config"].config
    groups = module.attributes["groups"]
    count = {kind: sum(f.size for f in groups.families if f.kind == kind) for kind in ("attn", "mlp", "hidden")}
    layers = cfg["num_hidden_layers"]
    assert count == {"attn": layers * cfg["num_key_value_heads"],
                     "mlp": layers * cfg["intermediate_size"], "hidden": cfg["hidden_size"]}
    assert all(f.kind != "other" for f in groups.families)
    reasons = {r for _, _, r in groups.unprunable}
    assert "the vocabulary" in reasons and (not with_lora or "the LoRA rank" in reasons)
    # a KV group holds its k/v rows, the q rows of its query heads and the o_proj columns
    attn = next(f for f in groups.families if f.kind == "attn" and f.layer == 0)
    touched = {(m.param.rsplit(".", 2)[-2], m.axis) for m in attn.members if "lora" not in m.param}
    assert touched == {("q_proj", 0), ("k_proj", 0), ("v_proj", 0), ("o_proj", 1)} | (
        {("q_proj", 0), ("k_proj", 0), ("v_proj", 0)} if cfg.get("attention_bias") else set())
    # groups print and parse back
    text = print_module(module)
    assert print_module(parse_module(text)) == text


def _random_removal(groups, rng: random.Random, kinds):
    removed = {}
    for f in groups.families:
        if f.kind in kinds and rng.random() < 0.7:
            removed[f.id] = tuple(sorted(rng.sample(range(f.size), rng.randint(1, f.size - 1))))
    return removed


def _check_invariant(module, removed):
    groups = module.attributes["groups"]
    masked = clone_module(module)
    zero_groups(masked, groups, removed)
    compressed = clone_module(module)
    compress_module(compressed, groups, removed)
    verify(compressed)
    vocab = module.attributes["config"].config["vocab_size"]
    ids, mask = random_batch(vocab, batch=2, seq=7, seed=len(removed))
    with torch.no_grad():
        a = emit_torch(masked)(ids, attention_mask=mask).logits
        b = emit_torch(compressed)(ids, attention_mask=mask).logits
    assert (a - b).abs()[mask.bool()].max().item() <= 1e-4
    # exact parameter accounting: each parameter keeps the product of its kept axis lengths
    expected = 0
    per_param: dict[str, list] = {}
    for (name, axis), keep in keep_masks(module, groups, removed).items():
        per_param.setdefault(name, []).append((axis, keep))
    for name, p in module.params.items():
        if p.buffer:
            continue
        kept = 1
        for axis, dim in enumerate(p.type.shape):
            masks = [k for a, k in per_param.get(name, []) if a == axis]
            kept *= int(masks[0].sum()) if masks else dim
        expected += kept
    assert compressed.num_parameters() == expected
    return compressed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), kinds=st.sets(st.sampled_from(["attn", "mlp", "hidden"]), min_size=1),
       which=st.integers(0, 100))
def test_masked_equals_compressed(pool, seed, kinds, which):
    name = sorted(pool)[which % len(pool)]
    module = pool[name]
    removed = _random_removal(module.attributes["groups"], random.Random(seed), kinds)
    _check_invariant(module, removed)


def test_merge_lora_commutes_with_compress(pool):
    module = pool["qwen2+lora"]
    groups = module.attributes["groups"]
    removed = _random_removal(groups, random.Random(5), {"attn", "mlp", "hidden"})
    a = clone_module(module)
    compress_module(a, groups, removed)
    merge_lora(a)
    b = clone_module(module)
    merge_lora(b)
    PassManager.parse("discover").run(b)  # LoRA params are gone: groups are recomputed
    compress_module(b, b.attributes["groups"], removed)
    ids, mask = random_batch(module.attributes["config"].config["vocab_size"])
    with torch.no_grad():
        diff = (emit_torch(a)(ids, attention_mask=mask).logits - emit_torch(b)(ids, attention_mask=mask).logits)
    assert diff.abs()[mask.bool()].max() <= 1e-4


def test_uniform_compress_loads_in_stock_transformers(pool, tmp_path):
    """Uniform attention/MLP pruning plus hidden channels keeps a stock config: RMSNorm is
    compensated in its weight and epsilon, so stock transformers computes the same thing."""
    from transformers import AutoModelForCausalLM

    from lorashear.runtime.hf import save_model_dir

    module = pool["mistral+lora"]
    groups = module.attributes["groups"]
    removed = {f.id: (0,) if f.kind == "attn" else tuple(range(0, f.size, 3))
               for f in groups.families}
    compressed = _check_invariant(module, removed)
    cfg = compressed.attributes["config"].config
    assert cfg["num_key_value_heads"] == 1 and "lorashear_per_layer" not in cfg
    assert cfg["hidden_size"] < module.attributes["config"].config["hidden_size"]
    assert cfg["rms_norm_eps"] > module.attributes["config"].config["rms_norm_eps"]
    save_model_dir(compressed, tmp_path / "hf", merge=True)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids, mask = random_batch(cfg["vocab_size"])
    with torch.no_grad():
        want = emit_torch(compressed)(ids, attention_mask=mask).logits
        got = stock(input_ids=ids, attention_mask=mask).logits
    assert (got - want).abs()[mask.bool()].max() <= 1e-4


def test_compress_before_discover_is_a_clear_error(lowered):
    module = clone_module(lowered("llama", False))
    with pytest.raises(PassError, match="run 'discover' before 'compress'"):
        PassManager.parse("compress").run(module)


def test_bad_prune_masks(pool):
    module = clone_module(pool["llama"])
    groups = module.attributes["groups"]
    family = groups.families[0]
    with pytest.raises(PassError, match="cannot remove all"):
        compress_module(module, groups, {0: tuple(range(family.size))})
    with pytest.raises(PassError, match="which has"):
        compress_module(module, groups, {0: (family.size + 3,)})
    module.attributes["prune-mask"] = PruneMaskAttr.from_dict({0: (0,)})
    changed = clone_module(module)
    changed.params.popitem()  # the module no longer matches its groups
    with pytest.raises(PassError):
        PassManager.parse("compress").run(changed)


def test_non_uniform_model_dir_round_trip(pool, tmp_path):
    """A non-uniformly pruned model records per-layer sizes and reloads exactly, no pickle."""
    from lorashear.runtime.hf import load_pretrained, save_model_dir

    module = pool["llama+lora"]
    groups = module.attributes["groups"]
    removed = {f.id: tuple(range(f.layer + 1)) for f in groups.families if f.kind == "mlp"}
    compressed = _check_invariant(module, removed)
    assert "lorashear_per_layer" in compressed.attributes["config"].config
    save_model_dir(compressed, tmp_path / "hf", merge=True)
    ids, mask = random_batch(module.attributes["config"].config["vocab_size"])
    with torch.no_grad():
        want = emit_torch(compressed)(ids, attention_mask=mask).logits
        got = load_pretrained(tmp_path / "hf")(ids, attention_mask=mask).logits
    assert (got - want).abs()[mask.bool()].max() <= 1e-4


def test_compressed_non_uniform_model_runs_in_onnx_runtime(pool, tmp_path):
    import onnxruntime as ort

    from lorashear.runtime.onnx_emit import emit_onnx

    module = pool["qwen2+lora"]
    groups = module.attributes["groups"]
    removed = _random_removal(groups, random.Random(11), {"attn", "mlp", "hidden"})
    compressed = _check_invariant(module, removed)
    path = emit_onnx(compressed, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, mask = random_batch(module.attributes["config"].config["vocab_size"], seq=9)
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        want = emit_torch(compressed)(ids, attention_mask=mask).logits
    assert (torch.from_numpy(got) - want).abs()[mask.bool()].max() <= 1e-4
