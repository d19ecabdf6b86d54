"""An ``hf`` emission loads with stock transformers and no lorashear: a uniform pruned model
through its stock config, a non-uniform one through the shipped per-layer modeling file
(``trust_remote_code=True``), each computing lorashear's logits and greedy tokens.

The loading runs in one subprocess in which ``import lorashear`` fails (a ``sys.meta_path``
finder refuses it, the working directory and ``PYTHONPATH`` hold nothing of the repository)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from lorashear.analysis.groups import PruneMaskAttr
from lorashear.ir.core import clone_module
from lorashear.passes import PassManager
from lorashear.runtime import hf
from lorashear.runtime.hf import load_pretrained, save_model_dir
from tests.conftest import FAMILIES, random_batch

NEW_TOKENS = 8
PROMPT = [[5, 17, 3, 99, 42, 7]]

LOADER = textwrap.dedent('''
    import importlib.abc, json, sys
    import torch

    class RefuseLorashear(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "lorashear" or name.startswith("lorashear."):
                raise ImportError("lorashear is hidden from this process")
            return None

    sys.meta_path.insert(0, RefuseLorashear())
    try:
        import lorashear  # noqa: F401
        raise SystemExit("lorashear is importable")
    except ImportError:
        pass
    from transformers import AutoModelForCausalLM

    jobs = json.loads(sys.argv[1])
    inputs = torch.load(sys.argv[2])
    results = {}
    for name, (model_dir, remote) in jobs.items():
        kwargs = {"trust_remote_code": True} if remote else {}
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
        with torch.no_grad():
            logits = model(input_ids=inputs["ids"], attention_mask=inputs["mask"]).logits
            tokens = model.generate(inputs["prompt"], attention_mask=torch.ones_like(inputs["prompt"]),
                                    max_new_tokens=NEW_TOKENS, do_sample=False)
        results[name] = {"logits": logits, "tokens": tokens, "class": type(model).__name__}
    assert not any(m == "lorashear" or m.startswith("lorashear.") for m in sys.modules)
    torch.save(results, sys.argv[3])
''').replace("NEW_TOKENS", str(NEW_TOKENS))


def _tiny_qwen3(root):
    """A tiny Qwen3 (q/k norms), lowered without an adapter."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from lorashear.frontend.pretrained import lower_pretrained

    torch.manual_seed(3)
    config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=256, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "qwen3-model")
    return lower_pretrained(root / "qwen3-model")


def _prune_non_uniform(module, seed: int):
    """Layer 0 loses a KV group; then a random-metric global prune takes MLP channels."""
    module = clone_module(module)
    PassManager.parse("discover").run(module)
    groups = module.attributes["groups"]
    attn0 = next(f for f in groups.families if f.kind == "attn" and f.layer == 0)
    module.attributes["prune-mask"] = PruneMaskAttr.from_dict({attn0.id: (attn0.size - 1,)})
    PassManager.parse(f"prune{{ratio=0.3,metric=random,scope=global,kinds=mlp,seed={seed}}},"
                      "compress").run(module)
    return module


def _reconstructed_with_bias(module, root, name: str, uniform: bool):
    """``prune`` (non-uniform: layer 0 loses a KV group too), ``reconstruct{bias=true}`` against
    the module before pruning, ``compress``: o_proj and down_proj gain biases Llama has none of."""
    from lorashear.ir.fileformat import save_ir

    module = clone_module(module)
    PassManager.parse("discover").run(module)
    save_ir(clone_module(module), root / f"{name}-dense.ir")
    data = root / "calibration.ids"
    data.write_text(" ".join(map(str, torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(5)).tolist())))
    if not uniform:
        groups = module.attributes["groups"]
        attn0 = next(f for f in groups.families if f.kind == "attn" and f.layer == 0)
        module.attributes["prune-mask"] = PruneMaskAttr.from_dict({attn0.id: (attn0.size - 1,)})
    prune = ("prune{ratio=0.4,metric=random,uniform=true}" if uniform
             else "prune{ratio=0.3,metric=random,scope=global,kinds=mlp,seed=3}")
    manager = PassManager.parse(f'{prune},reconstruct{{data="{data}",seq-len=16,batches=2,batch=2,bias=true,'
                                f'reference="{root / f"{name}-dense.ir"}"}},compress')
    manager.run(module)
    # each down_proj; each o_proj (uniform) or layer 0's, the one whose head went (non-uniform)
    assert manager.records[1].statistics["biases added"] == (4 if uniform else 3)
    return module


def _greedy(model, prompt: torch.Tensor, eos: set[int]) -> torch.Tensor:
    """Greedy decoding by full recomputation: the reference for ``generate``."""
    ids = prompt
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            token = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            if int(token) in eos:
                break
    return ids


def _eos(config: dict) -> set[int]:
    eos = config.get("eos_token_id")
    return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())


@pytest.fixture(scope="module")
def emitted(lowered, tmp_path_factory):
    """name -> (directory, compressed module): three LoRA families and Qwen3 non-uniform, one
    uniform (stock config); then every directory loaded in one lorashear-free subprocess."""
    root = tmp_path_factory.mktemp("hf-remote")
    modules = {f: _prune_non_uniform(lowered(f, True), seed=i) for i, f in enumerate(FAMILIES)}
    modules["qwen3"] = _prune_non_uniform(_tiny_qwen3(root), seed=7)
    uniform = clone_module(lowered("qwen2", True))
    PassManager.parse("discover,prune{ratio=0.4,metric=random,uniform=true},compress").run(uniform)
    modules["uniform-qwen2"] = uniform
    modules["bias-llama"] = _reconstructed_with_bias(lowered("llama", True), root, "bias-llama", False)
    modules["uniform-bias-llama"] = _reconstructed_with_bias(lowered("llama", True), root,
                                                             "uniform-bias-llama", True)
    dirs = {}
    for name, module in modules.items():
        dirs[name] = save_model_dir(module, root / name, merge=True)
    ids, mask = random_batch(128)
    torch.save({"ids": ids, "mask": mask, "prompt": torch.tensor(PROMPT)}, root / "inputs.pt")
    jobs = {name: (str(d), not name.startswith("uniform")) for name, d in dirs.items()}
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(root / "hf-modules"), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs), str(root / "inputs.pt"),
                           str(root / "results.pt")], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(root / "results.pt")
    return {name: (dirs[name], modules[name], results[name]) for name in modules}, (ids, mask)


@pytest.mark.parametrize("name", [*FAMILIES, "qwen3", "bias-llama"])
def test_non_uniform_loads_with_remote_code_only(emitted, name):
    (model_dir, module, result), (ids, mask) = emitted[0][name], emitted[1]
    config = json.loads((model_dir / "config.json").read_text())
    family = hf.REMOTE_CODE_FAMILIES[module.attributes["config"].config["model_type"]]
    # the config claims no stock architecture, and registers the shipped files
    assert config["model_type"] == f"lorashear_{module.attributes['config'].config['model_type']}"
    assert config["architectures"] == [f"Lorashear{family}ForCausalLM"]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert all((model_dir / f).is_file() for f in ("configuration_lorashear.py", "modeling_lorashear.py"))
    assert result["class"] == f"Lorashear{family}ForCausalLM"
    # the per-layer widths are the weights' own, and they do differ
    params = module.params
    head_dim = config["head_dim"]
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        assert config["layer_intermediate_sizes"][i] == params[layer + "mlp.up_proj.weight"].type.shape[0]
        assert config["layer_num_attention_heads"][i] * head_dim == params[layer + "self_attn.q_proj.weight"].type.shape[0]
        assert config["layer_num_key_value_heads"][i] * head_dim == params[layer + "self_attn.v_proj.weight"].type.shape[0]
    assert len(set(config["layer_intermediate_sizes"])) > 1
    assert len(set(config["layer_num_key_value_heads"])) > 1
    # loaded without lorashear: lorashear's logits and greedy tokens
    reference = load_pretrained(model_dir)
    with torch.no_grad():
        want = reference(ids, attention_mask=mask).logits
    assert (result["logits"] - want).abs()[mask.bool()].max() <= 1e-4
    tokens = _greedy(reference, torch.tensor(PROMPT), _eos(config))
    assert torch.equal(result["tokens"], tokens)


def test_uniform_prune_keeps_the_stock_config(emitted):
    (model_dir, _, result), (ids, mask) = emitted[0]["uniform-qwen2"], emitted[1]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert "auto_map" not in config and not (model_dir / "modeling_lorashear.py").exists()
    assert config["intermediate_size"] < 128 and config["num_key_value_heads"] < 3
    assert result["class"] == "Qwen2ForCausalLM"
    reference = load_pretrained(model_dir)
    with torch.no_grad():
        want = reference(ids, attention_mask=mask).logits
    assert (result["logits"] - want).abs()[mask.bool()].max() <= 1e-4
    assert torch.equal(result["tokens"], _greedy(reference, torch.tensor(PROMPT), _eos(config)))


@pytest.mark.parametrize("name", ["bias-llama", "uniform-bias-llama"])
def test_reconstructed_biases_are_claimed_through_the_config_flags(emitted, name):
    """``reconstruct{bias=true}`` gave o_proj and down_proj biases: the config sets Llama's
    ``attention_bias`` and ``mlp_bias``, the other projections get zero biases, and stock
    transformers (with the shipped file where the widths differ) computes lorashear's logits."""
    from safetensors.torch import load_file

    (model_dir, _, result), (ids, mask) = emitted[0][name], emitted[1]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    assert config["model_type"] == ("llama" if name.startswith("uniform") else "lorashear_llama")
    weights = load_file(model_dir / hf.WEIGHTS_FILE)
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        for zero in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert not weights[f"{prefix}{zero}.bias"].any(), zero
        folded = ("self_attn.o_proj", "mlp.down_proj") if layer == 0 or name.startswith("uniform") \
            else ("mlp.down_proj",)
        for part in ("self_attn.o_proj", "mlp.down_proj"):
            assert bool(weights[f"{prefix}{part}.bias"].any()) == (part in folded), part
    with torch.no_grad():
        want = load_pretrained(model_dir)(ids, attention_mask=mask).logits
    assert (result["logits"] - want).abs()[mask.bool()].max() <= 1e-4
    assert torch.equal(result["tokens"], _greedy(load_pretrained(model_dir), torch.tensor(PROMPT), _eos(config)))


def test_stock_loading_refuses_a_non_uniform_model(emitted):
    """Without trust_remote_code, stock transformers refuses instead of failing on a shape."""
    from transformers import AutoModelForCausalLM

    model_dir = emitted[0]["llama"][0]
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False)
    assert "trust_remote_code=True" in (model_dir / "README.md").read_text()


def test_unsupported_family_loads_with_lorashear_only(emitted, monkeypatch, tmp_path):
    """A family without a per-layer modeling file: the config claims nothing stock, the
    README says so, emission succeeds and lorashear loads it."""
    _, module, _ = emitted[0]["mistral"]
    monkeypatch.setattr(hf, "REMOTE_CODE_FAMILIES", {"llama": "Llama"})
    model_dir = save_model_dir(module, tmp_path / "hf", merge=True)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == hf.LORASHEAR_ONLY_TYPE and "auto_map" not in config
    assert config["lorashear_source_model_type"] == "mistral"
    assert not (model_dir / "modeling_lorashear.py").exists()
    assert "load_pretrained" in (model_dir / "README.md").read_text()
    ids, mask = emitted[1]
    from lorashear.runtime.executor import emit_torch
    with torch.no_grad():
        want = emit_torch(module)(ids, attention_mask=mask).logits
        got = load_pretrained(model_dir)(ids, attention_mask=mask).logits
    assert (got - want).abs()[mask.bool()].max() <= 1e-4


def test_remote_model_switches_attention_and_saves_again(emitted, tmp_path):
    """``set_attn_implementation`` after loading reaches every per-layer config, and the model
    saved by transformers loads again with the same logits."""
    from transformers import AutoModelForCausalLM

    model_dir = emitted[0]["qwen2"][0]
    ids, mask = emitted[1]
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True,
                                                 attn_implementation="eager").eval()
    assert {layer.self_attn.config._attn_implementation for layer in model.model.layers} == {"eager"}
    model.set_attn_implementation("sdpa")
    assert {layer.self_attn.config._attn_implementation for layer in model.model.layers} == {"sdpa"}
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True).eval()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = again(input_ids=ids, attention_mask=mask).logits
    assert (got - want).abs()[mask.bool()].max() <= 1e-5
