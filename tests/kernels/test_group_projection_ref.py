"""The torch reference of the LHSPG projection against a per-element oracle, and its properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from kernel_problems import (
    ProjectionProblem,
    build_weights,
    check_plan_matches_project_groups,
    chosen_element_masks,
    decision_is_close_call,
    group_element_masks,
    oracle_projection,
    problem_vectors,
    projection_problems,
)

from lorashear.errors import KernelError
from lorashear.kernels import (
    GroupedWeight,
    group_norms,
    group_sq_norms,
    project_groups,
    select_backend,
)

SETTINGS = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
ORACLE_SETTINGS = settings(SETTINGS, max_examples=120)
"""The oracle comparison is the one that pins the semantics down: it gets the most examples."""


def _project(problem: ProjectionProblem, weights: list[GroupedWeight]):
    chosen, lambdas = problem_vectors(problem)
    return project_groups(weights, chosen, lambdas, eps=problem.eps, force=problem.force,
                          backend="torch")


@ORACLE_SETTINGS
@given(projection_problems())
def test_reference_matches_per_element_oracle(problem: ProjectionProblem) -> None:
    weights = build_weights(problem)
    expected = oracle_projection(problem, weights)
    assume(not decision_is_close_call(expected.sq_norm, expected.inner, problem))

    stats = _project(problem, weights)

    assert stats.zeroed.tolist() == expected.zeroed
    torch.testing.assert_close(stats.sq_norm, torch.tensor(expected.sq_norm, dtype=torch.float32),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.inner, torch.tensor(expected.inner, dtype=torch.float32),
                               rtol=1e-4, atol=1e-4)
    for grouped, weight, lora_b, lora_a in zip(weights, expected.weights, expected.lora_b,
                                               expected.lora_a, strict=True):
        torch.testing.assert_close(grouped.weight, torch.tensor(weight, dtype=torch.float32),
                                   rtol=1e-5, atol=1e-5)
        if grouped.lora_B is not None and grouped.lora_A is not None:
            assert grouped.lora_B.tolist() == lora_b
            assert grouped.lora_A.tolist() == lora_a


@SETTINGS
@given(projection_problems(max_dim=9))
def test_zeroed_groups_are_exactly_zero_and_the_rest_is_untouched(
        problem: ProjectionProblem) -> None:
    weights = build_weights(problem)
    before = [grouped.weight.clone() for grouped in weights]
    stats = _project(problem, weights)

    for grouped, original, chosen_mask in zip(weights, before, chosen_element_masks(problem),
                                              strict=True):
        # Bit-identical, not merely close: untouched slices must survive many steps unchanged.
        assert torch.equal(grouped.weight[~chosen_mask], original[~chosen_mask])
    for group in torch.nonzero(stats.zeroed).flatten().tolist():
        for grouped, in_group in zip(weights, group_element_masks(problem, group), strict=True):
            assert (grouped.weight[in_group] == 0).all()
    unchosen = ~problem_vectors(problem)[0]
    assert not stats.zeroed[unchosen].any()
    assert (stats.sq_norm[unchosen] == 0).all() and (stats.inner[unchosen] == 0).all()


@SETTINGS
@given(projection_problems(max_dim=9))
def test_force_zeroes_every_chosen_group_and_clears_its_lora(problem: ProjectionProblem) -> None:
    weights = build_weights(problem)
    chosen, lambdas = problem_vectors(problem)
    stats = project_groups(weights, chosen, lambdas, eps=problem.eps, force=True,
                           backend="torch")

    assert torch.equal(stats.zeroed, chosen)
    for grouped, spec, chosen_mask in zip(weights, problem.weights,
                                          chosen_element_masks(problem), strict=True):
        assert (grouped.weight[chosen_mask] == 0).all()
        if grouped.lora_B is not None and grouped.lora_A is not None:
            # W + s*B@A must be 0 on the pruned slices too, so their LoRA part is gone as well.
            update = grouped.lora_scale * grouped.lora_B @ grouped.lora_A
            assert (update[chosen_mask] == 0).all()
            chosen_rows = torch.tensor([g >= 0 and problem.chosen[g] for g in spec.row_group])
            assert (grouped.lora_B[chosen_rows] == 0).all()


@SETTINGS
@given(projection_problems(max_dim=9), st.sampled_from([torch.bfloat16, torch.float16]))
def test_low_precision_weights_follow_the_float32_computation(
        problem: ProjectionProblem, dtype: torch.dtype) -> None:
    """16-bit weights accumulate in float32, so they round the float32 result once."""
    low = build_weights(problem, dtype=dtype)
    full = [GroupedWeight(g.weight.float(), g.row_group, g.col_group,
                          None if g.lora_B is None else g.lora_B.float(),
                          None if g.lora_A is None else g.lora_A.float(), g.lora_scale)
            for g in low]
    before = [grouped.weight.clone() for grouped in low]
    full_stats = _project(problem, full)
    assume(not decision_is_close_call(full_stats.sq_norm.tolist(), full_stats.inner.tolist(),
                                      problem))
    low_stats = _project(problem, low)

    assert torch.equal(low_stats.zeroed, full_stats.zeroed)
    for low_weight, full_weight, original, chosen_mask in zip(
            low, full, before, chosen_element_masks(problem), strict=True):
        assert low_weight.weight.dtype == dtype
        torch.testing.assert_close(low_weight.weight, full_weight.weight.to(dtype))
        assert torch.equal(low_weight.weight[~chosen_mask], original[~chosen_mask])


@SETTINGS
@given(projection_problems())
def test_group_norms_match_the_oracle_over_all_groups(problem: ProjectionProblem) -> None:
    weights = build_weights(problem)
    every_group = ProjectionProblem(**{**problem.__dict__,
                                       "chosen": (True,) * problem.num_groups})
    expected = oracle_projection(every_group, weights)
    before = [grouped.weight.clone() for grouped in weights]

    norms = group_norms(weights, problem.num_groups, backend="torch")

    torch.testing.assert_close(norms.square(), torch.tensor(expected.sq_norm,
                                                            dtype=torch.float32),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(group_sq_norms(weights, problem.num_groups, backend="torch"),
                               norms.square())
    assert all(torch.equal(g.weight, b) for g, b in zip(weights, before, strict=True))


def test_shared_row_and_column_group_counts_each_element_once() -> None:
    """A square weight whose row i and column i are the same group: element (i, i) counts once."""
    weight = torch.tensor([[3.0, 1.0], [2.0, 5.0]])
    ids = torch.tensor([0, -1], dtype=torch.int32)
    grouped = GroupedWeight(weight, ids, ids)
    stats = project_groups([grouped], torch.tensor([True]), 0.0, backend="torch")
    # Group 0 = row 0 and column 0 = {(0,0), (0,1), (1,0)}: 9 + 1 + 4, not 9 twice.
    assert stats.sq_norm.item() == 14.0
    assert group_sq_norms([grouped], 1, backend="torch").item() == 14.0


def test_zero_norm_group_is_zeroed_without_force_and_shrinks_nothing() -> None:
    weight = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lora_b, lora_a = torch.ones(2, 1), torch.ones(1, 2)
    grouped = GroupedWeight(weight, torch.tensor([0, 1]), torch.tensor([-1, -1]), lora_b, lora_a)
    stats = project_groups([grouped], torch.tensor([True, False]), 5.0, backend="torch")
    assert stats.zeroed.tolist() == [True, False]
    assert weight.tolist() == [[0.0, 0.0], [1.0, 2.0]]
    assert lora_b.tolist() == [[0.0], [1.0]]


def test_lambda_zero_merges_the_lora_part_exactly() -> None:
    """With lambda 0 and eps 0 a group keeps W + D: its effective weight does not change."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 5, generator=generator) + 4.0
    lora_b = torch.randn(6, 2, generator=generator) * 0.1
    lora_a = torch.randn(2, 5, generator=generator) * 0.1
    effective_before = weight + 0.5 * lora_b @ lora_a
    grouped = GroupedWeight(weight, torch.tensor([0, 0, 1, 1, -1, -1]), torch.full((5,), -1),
                            lora_b, lora_a, 0.5)
    stats = project_groups([grouped], torch.tensor([True, True]), 0.0, backend="torch")
    assert not stats.zeroed.any()
    torch.testing.assert_close(weight + 0.5 * lora_b @ lora_a, effective_before)


def test_no_weights_and_nothing_chosen_are_fine() -> None:
    stats = project_groups([], torch.tensor([True, False]), 1.0, backend="torch")
    assert stats.zeroed.tolist() == [True, False]  # a group with no element has norm 0
    weight = torch.randn(3, 3)
    before = weight.clone()
    grouped = GroupedWeight(weight, torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0]))
    stats = project_groups([grouped], torch.zeros(3, dtype=torch.bool), 1.0, force=True,
                           backend="torch")
    assert torch.equal(weight, before) and not stats.zeroed.any()


def test_per_group_force_mask() -> None:
    weight = torch.ones(3, 2)
    grouped = GroupedWeight(weight, torch.tensor([0, 1, 2]), torch.tensor([-1, -1]))
    stats = project_groups([grouped], torch.tensor([True, True, False]), 0.0,
                           force=torch.tensor([False, True, True]), backend="torch")
    assert stats.zeroed.tolist() == [False, True, False]
    assert weight.tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]


@pytest.mark.parametrize("make_weight, message", [
    (lambda: GroupedWeight(torch.ones(2, 3), torch.zeros(3), torch.zeros(3)), "row_group"),
    (lambda: GroupedWeight(torch.ones(2, 3), torch.zeros(2, dtype=torch.int32),
                           torch.zeros(3, dtype=torch.int32), torch.ones(2, 1)), "together"),
    (lambda: GroupedWeight(torch.ones(2, 3), torch.zeros(2, dtype=torch.int32),
                           torch.zeros(3, dtype=torch.int32), torch.ones(2, 1),
                           torch.ones(2, 3)), "do not fit"),
    (lambda: GroupedWeight(torch.ones(2, 3, 1), torch.zeros(2), torch.zeros(3)), "2-D"),
])
def test_malformed_weights_raise_kernel_error(make_weight, message: str) -> None:
    with pytest.raises(KernelError, match=message):
        make_weight()


def test_bad_call_arguments_raise_kernel_error() -> None:
    grouped = GroupedWeight(torch.ones(2, 2), torch.tensor([0, 3]), torch.tensor([-1, -1]))
    with pytest.raises(KernelError, match="group ids"):
        project_groups([grouped], torch.ones(2, dtype=torch.bool), 1.0, backend="torch")
    with pytest.raises(KernelError, match="shape"):
        project_groups([grouped], torch.ones(4, dtype=torch.bool), torch.ones(3),
                       backend="torch")
    with pytest.raises(KernelError, match="lambdas must be >= 0"):
        project_groups([grouped], torch.ones(4, dtype=torch.bool), -1.0, backend="torch")
    with pytest.raises(KernelError, match="bool"):
        project_groups([grouped], torch.ones(4), 1.0, backend="torch")
    with pytest.raises(KernelError, match="unknown kernel backend"):
        project_groups([grouped], torch.ones(4, dtype=torch.bool), 1.0, backend="cuda")


def test_auto_backend_is_the_reference_on_cpu() -> None:
    assert select_backend("auto", torch.device("cpu")) == "torch"


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    grouped = GroupedWeight(torch.ones(2, 2), torch.tensor([0, 1]), torch.tensor([-1, -1]))
    with pytest.raises(KernelError, match="triton"):
        project_groups([grouped], torch.ones(2, dtype=torch.bool), 1.0, backend="triton")


def test_trainable_parameters_are_projected_in_place() -> None:
    """The optimizer passes nn.Parameters that require grad; in-place updates must still work."""
    weight = torch.nn.Parameter(torch.ones(2, 3))
    lora_b = torch.nn.Parameter(torch.ones(2, 1))
    lora_a = torch.nn.Parameter(torch.ones(1, 3))
    grouped = GroupedWeight(weight, torch.tensor([0, -1]), torch.tensor([-1, -1, -1]), lora_b,
                            lora_a)
    stats = project_groups([grouped], torch.tensor([True]), 0.0, force=True, backend="torch")
    assert stats.zeroed.tolist() == [True]
    assert weight.detach().tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert lora_b.detach().tolist() == [[0.0], [1.0]] and weight.requires_grad


@SETTINGS
@given(projection_problems(max_dim=9))
def test_a_plan_with_done_groups_steps_like_project_groups(problem: ProjectionProblem) -> None:
    check_plan_matches_project_groups(problem)
    check_plan_matches_project_groups(problem, done_share=1.0)  # settle: nothing left to shrink
