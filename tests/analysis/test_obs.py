"""The reconstruction-aware metrics ``obs`` / ``obs-single``: a unit's score is exactly the
output error ``reconstruct``'s fold leaves after removing it (and, for the greedy, the set
removed so far); the greedy beats taking the k best single scores; and ``prune{metric=obs}``
with every allocation option, then ``reconstruct`` and ``compress``, keeps masked == compressed
on the tiny Llama."""

from __future__ import annotations

import pytest
import torch

from lorashear.analysis.groups import GroupsAttr
from lorashear.analysis.obs import consumer_columns, family_errors, obs_scores
from lorashear.analysis.saliency import input_gram_matrices, lora_delta, lora_updates, score_groups
from lorashear.data.calibration import CalibrationOptions, calibration_batches
from lorashear.errors import PassError
from lorashear.ir.core import clone_module
from lorashear.passes import PassManager
from lorashear.passes.reconstruct import solve_correction
from tests.conftest import ir_logits, random_batch


def _correlated(n: int, out: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [out, n], gram [n, n]) of inputs with strongly correlated columns."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n, dtype=torch.float64) + 0.5 * torch.randn(n, n, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix
    return torch.randn(out, n, generator=g, dtype=torch.float64), x.T @ x


def _fold_error(weight: torch.Tensor, gram: torch.Tensor, columns: torch.Tensor) -> float:
    """``reconstruct``'s output error left after removing ``columns`` and folding, undamped."""
    removed = torch.zeros(len(gram), dtype=torch.bool)
    removed[columns.flatten()] = True
    return solve_correction(weight, gram, removed, ~removed, 0.0).error_after


@pytest.mark.parametrize("width", [1, 3])
def test_scores_are_the_post_fold_error_and_greedy_beats_top_k(width):
    weight, gram = _correlated(24, 7, 300, seed=0)
    columns = torch.arange(24).view(-1, width)
    single = family_errors([weight], [gram], [columns], 0.0, greedy=False)
    for u in range(len(columns)):
        assert single[u] == pytest.approx(_fold_error(weight, gram, columns[u]), rel=1e-6)
    greedy = family_errors([weight], [gram], [columns], 0.0, greedy=True)
    order, top = torch.argsort(greedy), torch.argsort(single)
    assert order[0] == top[0]
    for k in range(1, len(columns)):
        error = _fold_error(weight, gram, columns[order[:k]])
        assert greedy[order[k - 1]] == pytest.approx(error, rel=1e-6)  # the score is the set's error
        assert error <= _fold_error(weight, gram, columns[top[:k]]) * (1 + 1e-9)


def test_damped_score_is_the_damped_objective_and_consumers_add():
    weight, gram = _correlated(12, 5, 200, seed=1)
    other_weight, other_gram = _correlated(12, 3, 200, seed=2)
    columns = torch.arange(12).view(-1, 2)
    damp = 0.1
    ridge = damp * float(gram.diagonal().mean())
    single = family_errors([weight], [gram], [columns], damp, greedy=False)
    for u in range(len(columns)):
        removed = torch.zeros(12, dtype=torch.bool)
        removed[columns[u]] = True
        # the OBS objective with H + ridge I: output error + ridge * (||W_R||^2 + ||dW||^2)
        damped = gram + ridge * torch.eye(12, dtype=torch.float64)
        kept = ~removed
        delta = weight[:, removed] @ damped[removed][:, kept] @ torch.linalg.inv(damped[kept][:, kept])
        change = torch.zeros_like(weight)
        change[:, removed], change[:, kept] = -weight[:, removed], delta
        assert single[u] == pytest.approx(float(torch.einsum("ij,jk,ik->", change, damped, change)), rel=1e-8)
    both = family_errors([weight, other_weight], [gram, other_gram], [columns, columns], 0.0, greedy=False)
    alone = family_errors([other_weight], [other_gram], [columns], 0.0, greedy=False)
    assert torch.allclose(both, family_errors([weight], [gram], [columns], 0.0, greedy=False) + alone)


@pytest.fixture(scope="module")
def tiny(lowered, tmp_path_factory):
    module = clone_module(lowered("llama", True))
    module.attributes.pop("groups", None)
    PassManager.parse("discover").run(module)
    path = tmp_path_factory.mktemp("obs") / "tokens.ids"
    ids = torch.randint(0, 128, (2400,), generator=torch.Generator().manual_seed(7))
    path.write_text(" ".join(map(str, ids.tolist())))
    return module, path


def test_module_scores_are_the_measured_fold_error_on_the_model(tiny):
    """On the tiny Llama with LoRA: every MLP and head-group unit's obs-single score times the
    family's output energy is ``reconstruct``'s error left (effective weight, real activations)."""
    module, path = tiny
    groups = module.attributes["groups"]
    assert isinstance(groups, GroupsAttr)
    batches = calibration_batches(module, CalibrationOptions(str(path), 4, 4, 32, 0), "test")
    families = [f.id for f in groups.families if f.kind in ("attn", "mlp")]
    scores = obs_scores(module, groups, families, batches, greedy=False, damp=0.0)
    found = consumer_columns(module, groups, families)
    grams = input_gram_matrices(module, batches, {c.param for cs in found.values() for c in cs})
    updates = lora_updates(module)
    for f in families:
        (consumer,) = found[f]  # one o_proj / down_proj each
        update = updates[consumer.param]
        weight = module.params[consumer.param].storage.load().double() + lora_delta(
            *(module.params[n].storage.load() for n in (update.lora_A, update.lora_B)), update.scaling,
            torch.float64)
        gram = grams[consumer.param]
        energy = float(torch.einsum("ij,jk,ik->", weight, gram, weight))
        for u in range(groups.families[f].size):
            assert float(scores[f][u]) * energy == pytest.approx(
                _fold_error(weight, gram, consumer.columns[u]), rel=1e-6, abs=1e-9 * energy)


def test_obs_needs_a_consumer_and_data(tiny):
    module, _ = tiny
    groups = module.attributes["groups"]
    with pytest.raises(PassError, match="needs calibration text"):
        score_groups(module, groups, "obs")


@pytest.mark.parametrize("options", [
    "metric=obs", "metric=obs-single", "metric=obs,scope=global", "metric=obs,uniform=true,align=8",
    "metric=obs,attn-share=0.5", "metric=obs,kinds=attn,mlp,hidden"])
def test_prune_obs_then_reconstruct_then_compress_is_exact(tiny, options):
    module, path = tiny
    data = f'data="{path}",seq-len=32,batches=4'
    pruned = clone_module(module)
    manager = PassManager.parse(f"prune{{ratio=0.3,{options},{data}}}")
    manager.run(pruned)
    statistics = manager.records[-1].statistics
    assert statistics["metric"] == options.split(",")[0].split("=")[1]
    assert abs(statistics["parameter share removed"] - 0.3) < 0.1
    dense_copy = clone_module(module)  # reconstruct reads the removed units from the live module
    dense_copy.attributes["prune-mask"] = pruned.attributes["prune-mask"]
    PassManager.parse(f"reconstruct{{{data}}}").run(dense_copy)
    ids, _ = random_batch(128, batch=2, seq=9)
    masked = ir_logits(dense_copy, ids)
    assert (masked - ir_logits(pruned, ids)).abs().max() > 1e-4  # the fold changed the model
    PassManager.parse("compress").run(dense_copy)
    assert (masked - ir_logits(dense_copy, ids)).abs().max() <= 1e-4


def test_global_obs_ranks_units_across_layers_by_their_share_of_the_output(tiny):
    """scope=global with obs: units compete by score as they are (no per-family RMS), so the
    removed units are exactly the lowest scores across the MLP families (those the ratio takes)."""
    module, path = tiny
    groups = module.attributes["groups"]
    pruned = clone_module(module)
    PassManager.parse(f'prune{{ratio=0.3,metric=obs,scope=global,kinds=mlp,data="{path}",'
                      f'seq-len=32,batches=4}}').run(pruned)
    removed = pruned.attributes["prune-mask"].as_dict()
    batches = calibration_batches(module, CalibrationOptions(str(path), 4, 4, 32, 0), "test")
    mlp = [f.id for f in groups.families if f.kind == "mlp"]
    scores = score_groups(module, groups, "obs", family_ids=mlp, batches=batches)
    taken = [float(scores[f][u]) for f in mlp for u in removed.get(f, ())]
    left = [float(scores[f][u]) for f in mlp for u in range(groups.families[f].size) if u not in removed.get(f, ())]
    assert taken and max(taken) <= sorted(left)[len(mlp)]  # each family's last unit is never taken


_HEADS_ON_THREADS = """
import sys
import torch
torch.set_num_threads(int(sys.argv[1]))
from lorashear.analysis.obs import family_errors
g = torch.Generator().manual_seed(0)
x = torch.randn(2304, 576, generator=g, dtype=torch.float64)
weight = torch.randn(64, 576, generator=g, dtype=torch.float64)
heads = torch.arange(576).view(3, 192)  # three KV groups of 192 columns, SmolLM2's o_proj
errors = family_errors([weight], [x.T @ x], [heads], 0.01, greedy=True)
print(" ".join(f"{float(e):.12e}" for e in errors))
"""


def test_multi_column_units_score_on_two_threads():
    """Three 192 x 192 float64 head blocks on two threads: MKL's batched LU solve (what the
    greedy once called) reports DLASWP errors and hangs on them; the Cholesky solve returns the
    one-thread scores. In subprocesses, so a regression fails on the timeout, not by hanging."""
    import subprocess
    import sys

    def scores(threads: int) -> torch.Tensor:
        done = subprocess.run([sys.executable, "-c", _HEADS_ON_THREADS, str(threads)], capture_output=True,
                              text=True, timeout=120, check=True)
        assert "DLASWP" not in done.stdout + done.stderr
        return torch.tensor([float(v) for v in done.stdout.split()], dtype=torch.float64)

    assert torch.allclose(scores(2), scores(1), rtol=1e-9)


def test_spd_solve_falls_back_to_lu_on_an_indefinite_block():
    from lorashear.analysis.obs import spd_solve

    blocks = torch.tensor([[[2.0, 0.0], [0.0, 3.0]], [[0.0, 1.0], [1.0, 0.0]]], dtype=torch.float64)
    rhs = torch.tensor([[[2.0], [3.0]], [[5.0], [7.0]]], dtype=torch.float64)
    assert torch.equal(spd_solve(blocks, rhs), torch.tensor([[[1.0], [1.0]], [[7.0], [5.0]]], dtype=torch.float64))
    assert torch.equal(spd_solve(blocks[1], rhs[1]), torch.tensor([[7.0], [5.0]], dtype=torch.float64))
