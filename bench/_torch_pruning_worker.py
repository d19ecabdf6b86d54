"""Prune the default model with Torch-Pruning's LLM recipe; run in its own process.

``bench_side_by_side.py`` starts this under a timeout (Torch-Pruning's dependency graph can
hang on grouped-query attention, its issue #527). The recipe follows Torch-Pruning's
``examples/LLMs/prune_llm.py``: ``MetaPruner`` with ``GroupMagnitudeImportance(p=2, mean)``,
``prune_num_heads=True``, ``prune_head_dims=False`` (RoPE stays intact), per-layer (not
global) ratios, ``num_heads`` for q/k/v. Two changes: the hidden size is left alone (embedding
and ``lm_head`` ignored), because the comparison is at a share of the attention + MLP weights,
and when its share misses the target by more than 2 points (at 0.5 it prunes no heads) it
prunes once more with the MLP ratio that reaches the target.
The model needs eager attention and ``use_cache=False`` to trace (DESIGN.md 9).

When every layer ends up with the same head and channel counts, and the query heads are a
multiple of the KV heads, the model is saved as a stock Hugging Face directory (config
updated) that lorashear can lower; with it go the logits on a fixed prompt so the caller can
check that lowering kept the function. The outcome is a JSON file:

    python3 bench/_torch_pruning_worker.py MODEL_DIR RATIO OUT_DIR
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import torch


def weight_numel(model, names: tuple[str, ...]) -> int:
    """Elements of the Linear weights whose own name is one of ``names``."""
    return sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 2)[-2] in names)


ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def prune_once(model_dir: str, head_ratio: float, mlp_ratio: float):
    """The dense model pruned by Torch-Pruning's recipe; seconds for graph and pruning."""
    import torch_pruning as tp
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager",
                                                 dtype=torch.float32)
    model.config.use_cache = False
    model.eval()
    config = model.config
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = config.num_attention_heads
            num_heads[m.k_proj] = config.num_key_value_heads
            num_heads[m.v_proj] = config.num_key_value_heads
    example = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model, example_inputs={"input_ids": example, "attention_mask": torch.ones_like(example)},
        importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False, pruning_ratio=mlp_ratio, head_pruning_ratio=head_ratio,
        ignored_layers=[model.lm_head, model.model.embed_tokens], num_heads=num_heads,
        prune_num_heads=True, prune_head_dims=False)
    graph_s = time.perf_counter() - start
    for group in pruner.step(interactive=True):
        group.prune()
    return model, {"graph_s": graph_s, "prune_s": time.perf_counter() - start}


def main() -> int:
    model_dir, ratio, out_dir = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
    out_dir.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 2)
    import torch_pruning as tp
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    attn0 = layers * 2 * hidden * head_dim * (config.num_attention_heads + config.num_key_value_heads)
    mlp0 = layers * 3 * hidden * config.intermediate_size
    outcome: dict = {"torch_pruning": getattr(tp, "__version__", "?"), "attempts": []}
    # Its ratio is per width, and at some ratios it prunes no heads (DESIGN.md 9): when the
    # attention + MLP share misses the target, prune again with the MLP ratio that makes up
    # the difference.
    mlp_ratio = ratio
    for _ in range(2):
        model, seconds = prune_once(model_dir, ratio, mlp_ratio)
        attn1, mlp1 = weight_numel(model, ATTN), weight_numel(model, MLP)
        share = 1 - (attn1 + mlp1) / (attn0 + mlp0)
        outcome["attempts"].append({"head_ratio": ratio, "mlp_ratio": round(mlp_ratio, 4),
                                    "share_removed": share, **seconds})
        if abs(share - ratio) <= 0.02:
            break
        mlp_ratio = min(0.95, max(0.0, (ratio * (attn0 + mlp0) - (attn0 - attn1)) / mlp0))
    outcome["share_removed"] = share
    config = model.config
    shapes = {(layer.self_attn.q_proj.out_features // head_dim, layer.self_attn.k_proj.out_features // head_dim,
               layer.mlp.gate_proj.out_features) for layer in model.model.layers}
    outcome["layer_shapes"] = sorted(shapes)  # (query heads, KV heads, MLP channels)
    outcome["parameters"] = sum(p.numel() for p in model.parameters())
    if len(shapes) != 1:
        outcome["error"] = f"non-uniform layers {sorted(shapes)}: not a stock Llama config"
    else:
        (q_heads, kv_heads, channels), = shapes
        if q_heads % kv_heads:
            outcome["error"] = f"{q_heads} query heads over {kv_heads} KV heads: not a stock Llama config"
        else:
            config.num_attention_heads, config.num_key_value_heads = q_heads, kv_heads
            config.head_dim, config.intermediate_size = head_dim, channels
            for layer in model.model.layers:  # the attention modules cached the old counts
                layer.self_attn.num_key_value_groups = q_heads // kv_heads
            example = torch.randint(0, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                logits = model(example).logits
            torch.save(logits, out_dir / "logits.pt")
            torch.save(example, out_dir / "prompt.pt")
            model.save_pretrained(out_dir / "hf")
            outcome["hf_dir"] = str(out_dir / "hf")
    (out_dir / "outcome.json").write_text(json.dumps(outcome, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
