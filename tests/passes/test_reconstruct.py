"""`reconstruct`: the least-squares fold of removed inputs into kept ones -- exact algebra on a
hand-made layer, lower held-out loss than pruning alone on a trained tiny Llama, masked ==
compressed afterwards, and errors before any change."""

from __future__ import annotations

import pytest
import torch

from lorashear.analysis.groups import FamilyMember, GroupFamily, GroupsAttr, PruneMaskAttr
from lorashear.analysis.masking import zero_groups
from lorashear.errors import PassError
from lorashear.ir.core import clone_module
from lorashear.ir.fileformat import save_ir
from lorashear.ir.parser import parse_module
from lorashear.ir.storage import DataStorage
from lorashear.passes import PassManager, parse_pipeline
from lorashear.passes.reconstruct import solve_correction
from lorashear.runtime.executor import emit_torch
from tests.conftest import build_tiny, markov_tokens, save_base_and_lower, train_all_weights

# --- exact algebra ------------------------------------------------------------------------------
LAYER_IR = """lorashear-ir 1
param @emb.weight : f32[16, 6] = meta
param @q.weight : f32[5, 6] = meta
param @q.lora_A.weight : f32[2, 6] = meta
param @q.lora_B.weight : f32[5, 2] = meta
input %input_ids : i64[B, S]
%0 = embedding(@emb.weight, %input_ids) : f32[B, S, 6]
%1 = lora_linear(%0, @q.weight, none, @q.lora_A.weight, @q.lora_B.weight, scaling=2.0, dropout=0.0) : f32[B, S, 5] loc("layers.0.q")
output logits = %1
"""
REMOVED = (4, 5)


def _layer() -> tuple:
    """A lora_linear on an embedding whose columns 4 and 5 are combinations of columns 0..3, so
    that on any tokens the removed inputs X_R are exact linear combinations of the kept X_K.
    One family of six channels slices the embedding's and the layer's input columns."""
    module = parse_module(LAYER_IR)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(16, 6, generator=g)
    table[:, 4:] = table[:, :4] @ torch.randn(4, 2, generator=g)
    values = {"emb.weight": table, "q.weight": torch.randn(5, 6, generator=g),
              "q.lora_A.weight": torch.randn(2, 6, generator=g),
              "q.lora_B.weight": 0.5 * torch.randn(5, 2, generator=g)}
    for name, tensor in values.items():
        module.params[name].storage = DataStorage(tensor)
    family = GroupFamily(0, "mlp", 0, 6, tuple(FamilyMember(p, 1, 1) for p in values if p != "q.lora_B.weight"))
    module.attributes["groups"] = GroupsAttr((family,))
    module.attributes["prune-mask"] = PruneMaskAttr.from_dict({0: REMOVED})
    return module, torch.randint(0, 16, (4, 12), generator=g)


@pytest.fixture()
def layer_ids(tmp_path):
    path = tmp_path / "layer.ids"
    path.write_text(" ".join(map(str, torch.randint(0, 16, (300,), generator=torch.Generator().manual_seed(1)).tolist())))
    return path


def _outputs(module, ids) -> torch.Tensor:
    with torch.no_grad():
        return emit_torch(module)(ids).logits


def test_solve_recovers_removed_inputs_that_are_combinations_of_kept_ones():
    g = torch.Generator().manual_seed(2)
    x_kept = torch.randn(200, 5, generator=g, dtype=torch.float64)
    x = torch.cat([x_kept, x_kept @ torch.randn(5, 3, generator=g, dtype=torch.float64)], 1)
    weight = torch.randn(7, 8, generator=g, dtype=torch.float64)
    removed = torch.tensor([False] * 5 + [True] * 3)
    correction = solve_correction(weight, x.T @ x, removed, ~removed, 0.0)
    folded = weight[:, :5] + correction.delta
    assert torch.allclose(x_kept @ folded.T, x @ weight.T, atol=1e-9)
    assert correction.error_before > 0 and correction.error_after <= 1e-9 * correction.error_before
    # damp > 0 trades exactness for conditioning: close, not exact, and never worse than nothing
    damped = solve_correction(weight, x.T @ x, removed, ~removed, 0.1)
    assert 0 < damped.error_after < damped.error_before


def test_exact_fold_on_the_module_itself_then_the_units_are_zero(layer_ids):
    module, ids = _layer()
    dense = _outputs(module, ids)
    PassManager.parse(f'reconstruct{{data="{layer_ids}",seq-len=8,batches=2,damp=0}}').run(module)
    assert (_outputs(module, ids) - dense).abs().max() <= 1e-5
    for name in ("emb.weight", "q.weight", "q.lora_A.weight"):  # the masked model's zeros
        assert torch.all(module.params[name].storage.load()[:, list(REMOVED)] == 0), name


def test_exact_fold_from_a_reference_after_the_units_were_zeroed(layer_ids, tmp_path):
    module, ids = _layer()
    dense = _outputs(module, ids)
    save_ir(clone_module(module), tmp_path / "dense.ir")
    zero_groups(module, module.attributes["groups"], {0: REMOVED})  # what prune does
    pruned = _outputs(module, ids)
    assert (pruned - dense).abs().max() > 0.1
    with pytest.raises(PassError, match="zero already"):  # nothing left to fold without it
        PassManager.parse(f'reconstruct{{data="{layer_ids}",batches=8,seq-len=8,damp=0}}').run(clone_module(module))
    manager = PassManager.parse(f'reconstruct{{data="{layer_ids}",batches=8,seq-len=8,damp=0,'
                                f'reference="{tmp_path / "dense.ir"}"}}')
    manager.run(module)
    assert (_outputs(module, ids) - dense).abs().max() <= 1e-5
    assert manager.records[-1].statistics["output error left"] <= 1e-8


# --- on a trained tiny Llama ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama trained (all weights) on the first half of a Markov stream, with its groups;
    calibration text is that half, held-out windows come from the other half."""
    root = tmp_path_factory.mktemp("reconstruct")
    tokens = markov_tokens(6000)
    (root / "calibration.ids").write_text(" ".join(map(str, tokens[:3000].tolist())))
    tm = build_tiny("llama", root, seed=3)
    base = tm.peft.get_base_model()
    windows = tokens[: 6000 // 32 * 32].view(-1, 32)
    with tm.peft.disable_adapter():
        train_all_weights(base, windows[:90], 100, seed=0)
    module = save_base_and_lower(base, tm.model_dir, tm.adapter_dir)
    PassManager.parse("discover").run(module)
    save_ir(clone_module(module), root / "dense.ir")
    return module, root, windows[100:]


def _loss(module, windows) -> float:
    with torch.no_grad():
        return emit_torch(module)(windows, labels=windows).loss.item()


def _prune_and_reconstruct(trained, prune_kinds: str, **options):
    module, root, _ = trained
    pruned = clone_module(module)
    PassManager.parse(f'prune{{ratio=0.3,metric=wanda,kinds={prune_kinds},'
                      f'data="{root / "calibration.ids"}",seq-len=32}}').run(pruned)
    text = ",".join(f"{k}={v}" for k, v in {"data": f'"{root / "calibration.ids"}"', "seq-len": 32,
                                            "reference": f'"{root / "dense.ir"}"', **options}.items())
    rebuilt = clone_module(pruned)
    manager = PassManager.parse(f"reconstruct{{{text}}}")
    manager.run(rebuilt)
    return pruned, rebuilt, manager.records[-1].statistics


def test_reconstruct_lowers_held_out_loss_after_prune(trained):
    _, _, held_out = trained
    pruned, rebuilt, statistics = _prune_and_reconstruct(trained, "mlp")
    assert statistics["consumers reconstructed"] == 2  # the two down_proj
    assert 0 < statistics["output error left"] < 1
    assert _loss(rebuilt, held_out) < _loss(pruned, held_out) - 0.01


@pytest.mark.parametrize("kinds", ["attn,mlp", "hidden"])
def test_masked_equals_compressed_after_reconstruct(trained, kinds):
    _, _, held_out = trained
    pruned, rebuilt, statistics = _prune_and_reconstruct(trained, kinds, kinds=kinds)
    assert statistics["consumers reconstructed"] > 0
    masked = _outputs(rebuilt, held_out[:4])
    assert (masked - _outputs(pruned, held_out[:4])).abs().max() > 1e-3  # it did change the model
    PassManager.parse("compress").run(rebuilt)
    assert (masked - _outputs(rebuilt, held_out[:4])).abs().max() <= 1e-4


def test_errors_come_before_any_change(trained, tmp_path):
    module, root, _ = trained
    data = f'data="{root / "calibration.ids"}",seq-len=32'
    for bad in ("damp=-0.1", "damp=inf", "damp=nan", "kinds=heads", "batches=0"):
        with pytest.raises(PassError):
            parse_pipeline(f"reconstruct{{{data},{bad}}}")
    untouched = clone_module(module)
    with pytest.raises(PassError, match="prune-mask"):
        PassManager.parse(f"reconstruct{{{data}}}").run(untouched)
    pruned = clone_module(module)
    PassManager.parse("prune{ratio=0.3}").run(pruned)
    before = {n: p.storage.load().clone() for n, p in pruned.params.items()}
    for options, match in ((data, "zero already"),
                           (f'{data},reference="{tmp_path / "missing.ir"}"', "does not exist"),
                           (f'reference="{root / "dense.ir"}"', "needs calibration text")):
        with pytest.raises(PassError, match=match):
            PassManager.parse(f"reconstruct{{{options}}}").run(pruned)
        assert all(torch.equal(before[n], p.storage.load()) for n, p in pruned.params.items())


# --- inside lhspg ---------------------------------------------------------------------------------
def _lhspg(module, root, **opts):
    text = ",".join(f"{k}={v}" for k, v in {
        "ratio": 0.3, "periods": 2, "steps": 4, "settle": 0.5, "seq-len": 32, "batch": 4, "lr": 5e-3,
        "data": f'"{root / "calibration.ids"}"', "progress": "false", **opts}.items())
    result = clone_module(module)
    PassManager.parse(f"lhspg{{{text}}}").run(result)
    return result


def test_lhspg_reconstruct_folds_each_shrink_step_and_masked_equals_compressed(trained):
    from lorashear.passes.compress import compress_module

    module, root, held_out = trained
    plain, folded = _lhspg(module, root), _lhspg(module, root, reconstruct="true")
    # the same groups are chosen (scores and split come before any fold) and end at zero
    assert plain.attributes["prune-mask"] == folded.attributes["prune-mask"]
    periods = folded.attributes["lhspg-log"].periods
    assert all(0 <= p["reconstruct_error_left"] < 1 for p in periods)
    assert not any("reconstruct_error_left" in p for p in plain.attributes["lhspg-log"].periods)
    changed = [n for n in plain.params if n.endswith(("down_proj.weight", "o_proj.weight"))
               and not torch.equal(plain.params[n].storage.load(), folded.params[n].storage.load())]
    assert changed, "the fold changed no consumer"
    compressed = clone_module(folded)
    compress_module(compressed, folded.attributes["groups"], folded.attributes["prune-mask"].as_dict())
    assert (_outputs(folded, held_out[:4]) - _outputs(compressed, held_out[:4])).abs().max() <= 1e-4


def test_progressive_fold_keeps_a_linear_consumer_exact_through_every_shrink_step():
    """Removed inputs that are linear combinations of kept ones: whatever each step takes
    from E_R (LoRA update included), the kept columns take over and the output is unchanged."""
    from lorashear.analysis.saliency import _gram
    from lorashear.passes.progressive_fold import FoldTarget
    from lorashear.passes.reconstruct import fold_operator

    g = torch.Generator().manual_seed(7)
    x_kept = torch.randn(300, 6, generator=g, dtype=torch.float64)
    x = torch.cat([x_kept, x_kept @ torch.randn(6, 3, generator=g, dtype=torch.float64)], 1)
    removed = torch.tensor([False] * 6 + [True] * 3)
    weight = torch.randn(5, 9, generator=g, dtype=torch.float64)
    a, b = torch.randn(2, 9, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    dense = x @ (weight + 0.5 * b @ a).T
    target = FoldTarget(weight, torch.arange(6, 9), torch.arange(6),
                        fold_operator(_gram(x, False), removed, ~removed, 0.0),  # float64 throughout
                        torch.ones(5, dtype=torch.bool), (a, b, 0.5))
    for share in (0.3, 0.5, 1.0):  # a shrink step; the last one merges LoRA and zeroes the rest
        before = target.removed_part()
        if share < 1.0:
            weight[:, 6:] *= 1 - share
        else:
            weight[:, 6:] = 0
            a[:, 6:] = 0
        target.fold(before)
        assert torch.allclose(x @ (weight + 0.5 * b @ a).T, dense, atol=1e-8)
    assert not weight[:, 6:].any()


# --- bias=true -----------------------------------------------------------------------------------
def test_solve_with_a_bias_recovers_removed_inputs_that_are_affine_in_kept_ones():
    from lorashear.analysis.saliency import _gram

    g = torch.Generator().manual_seed(4)
    x_kept = torch.randn(200, 5, generator=g, dtype=torch.float64)
    offset = torch.randn(3, generator=g, dtype=torch.float64)  # the part no kept column carries
    x = torch.cat([x_kept, x_kept @ torch.randn(5, 3, generator=g, dtype=torch.float64) + offset], 1)
    weight = torch.randn(7, 8, generator=g, dtype=torch.float64)
    removed = torch.tensor([False] * 5 + [True] * 3)
    plain = solve_correction(weight, x.T @ x, removed, ~removed, 0.0)
    assert plain.bias is None and plain.error_after > 1e-3 * plain.error_before  # no bias: not exact
    correction = solve_correction(weight, _gram(x, ones=True), removed, ~removed, 0.0, bias=True)
    folded = x_kept @ (weight[:, :5] + correction.delta).T + correction.bias
    assert torch.allclose(folded, x @ weight.T, atol=1e-9)
    assert correction.error_after <= 1e-9 * correction.error_before
    damped = solve_correction(weight, _gram(x, ones=True), removed, ~removed, 0.1, bias=True)
    assert 0 < damped.error_after < plain.error_after  # the bias is not damped away


@pytest.mark.parametrize("prune_kinds", ["attn,mlp", "attn,mlp,hidden"])
def test_bias_true_masked_equals_compressed_and_the_bias_is_sliced(trained, prune_kinds):
    _, _, held_out = trained
    pruned, rebuilt, statistics = _prune_and_reconstruct(trained, prune_kinds, bias="true")
    assert statistics["biases added"] == statistics["consumers reconstructed"] == 4  # 2 o_proj, 2 down_proj
    _, _, no_bias = _prune_and_reconstruct(trained, prune_kinds)
    # one more free parameter per output: the calibration error left can only fall (held-out
    # quality is the benchmark's: bench/RESULTS.md)
    assert statistics["output error left"] < no_bias["output error left"]
    width = rebuilt.params["model.layers.0.mlp.down_proj.bias"].type.shape[0]
    masked = _outputs(rebuilt, held_out[:4])
    PassManager.parse("compress").run(rebuilt)
    assert (masked - _outputs(rebuilt, held_out[:4])).abs().max() <= 1e-4
    hidden = rebuilt.params["model.norm.weight"].type.shape[0]
    assert rebuilt.params["model.layers.0.mlp.down_proj.bias"].type.shape == (hidden,)
    assert (hidden < width) == ("hidden" in prune_kinds)


# --- inputs=pruned (sequential) --------------------------------------------------------------------
def test_solve_cross_recovers_a_pruned_input_that_is_a_combination_of_kept_ones():
    """The cross-gram solve: the dense output E x_d is reproduced to 1e-9 from the pruned inputs
    when the dense inputs are linear in the kept pruned ones, and with X_p = X_d it is the
    one-shot fold exactly."""
    from lorashear.passes.reconstruct_sequential import solve_cross

    g = torch.Generator().manual_seed(6)
    x_kept = torch.randn(200, 5, generator=g, dtype=torch.float64)
    x_dense = x_kept @ torch.randn(5, 8, generator=g, dtype=torch.float64)  # upstream changed the inputs
    weight = torch.randn(7, 8, generator=g, dtype=torch.float64)
    folded, before, after, bias = solve_cross(weight, weight[:, :5], x_dense.T @ x_dense, x_dense.T @ x_kept,
                                              x_kept.T @ x_kept, 0.0)
    assert bias is None and before > 1
    assert torch.allclose(x_kept @ folded.T, x_dense @ weight.T, atol=1e-9) and after <= 1e-9 * before
    x = torch.cat([x_kept, x_kept @ torch.randn(5, 3, generator=g, dtype=torch.float64)], 1)
    removed = torch.tensor([False] * 5 + [True] * 3)
    for damp in (0.0, 0.1):
        one_shot = solve_correction(weight, x.T @ x, removed, ~removed, damp)
        same, _, after, _ = solve_cross(weight, weight[:, :5], x.T @ x, x.T @ x_kept, x_kept.T @ x_kept, damp)
        assert torch.allclose(same, weight[:, :5] + one_shot.delta, atol=1e-9)
        assert after == pytest.approx(one_shot.error_after, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("inputs", ["pruned", "pruned-to-dense"])
def test_inputs_pruned_is_exact_on_the_layer_and_equals_one_shot_there(layer_ids, inputs):
    """One consumer fed by the embedding: the pruned model's inputs to it are the dense ones
    (kept columns; the removed ones alive up to the consumer), so the sequential fold is the
    one-shot fold (and exact, the removed columns being combinations of the kept)."""
    module, ids = _layer()
    dense = _outputs(module, ids)
    options = f'data="{layer_ids}",seq-len=8,batches=2,damp=0'
    one_shot = clone_module(module)
    PassManager.parse(f"reconstruct{{{options}}}").run(one_shot)
    manager = PassManager.parse(f"reconstruct{{{options},inputs={inputs}}}")
    manager.run(module)
    assert (_outputs(module, ids) - dense).abs().max() <= 1e-5
    assert torch.allclose(module.params["q.weight"].storage.load(), one_shot.params["q.weight"].storage.load(),
                          atol=1e-5)
    assert manager.records[-1].statistics["output error left"] <= 1e-8


@pytest.mark.parametrize(("prune_kinds", "options"), [
    ("attn,mlp", {"inputs": "pruned"}), ("attn,mlp", {"inputs": "pruned-to-dense"}),
    ("attn,mlp", {"inputs": "pruned", "bias": "true"}), ("attn,mlp,hidden", {"inputs": "pruned"}),
    ("attn,mlp,hidden", {"inputs": "pruned-to-dense", "kinds": "attn,mlp,hidden"})])
def test_inputs_pruned_after_prune_masked_equals_compressed(trained, prune_kinds, options):
    _, _, held_out = trained
    pruned, rebuilt, statistics = _prune_and_reconstruct(trained, prune_kinds, **options)
    options = {k: v for k, v in options.items() if k != "inputs"}
    _, one_shot, one_shot_statistics = _prune_and_reconstruct(trained, prune_kinds, **options)
    assert statistics["consumers reconstructed"] == one_shot_statistics["consumers reconstructed"] >= 4
    first = "model.layers.0.self_attn.o_proj.weight"
    same = torch.allclose(rebuilt.params[first].storage.load(), one_shot.params[first].storage.load(), atol=1e-5)
    # the first consumer reads the dense inputs masked (the same fold), unless hidden channels
    # were removed before it (then the residual stream itself differs)
    assert same == ("hidden" not in prune_kinds)
    last = "model.layers.1.mlp.down_proj.weight"  # its inputs are not the dense ones
    assert not torch.allclose(rebuilt.params[last].storage.load(), one_shot.params[last].storage.load(), atol=1e-5)
    masked = _outputs(rebuilt, held_out[:4])
    assert (masked - _outputs(pruned, held_out[:4])).abs().max() > 1e-3
    PassManager.parse("compress").run(rebuilt)
    assert (masked - _outputs(rebuilt, held_out[:4])).abs().max() <= 1e-4
