"""mmn.neurons.scoring.unit_scores (the one per-unit score from A·M) against hand-computed tensors."""

from __future__ import annotations

import pytest
import torch

from mmn.neurons.scoring import unit_scores

# one layer, 3 image positions, 2 units
A = torch.tensor([[[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0]]])
M = torch.tensor([[[2.0, 1.0], [-1.0, 2.0], [5.0, 0.25]]])
# A·M = [[2, -2], [-3, 1], [-5, 1]] per position
MAX = torch.tensor([[2.0, 1.0]])  # unit 0: max(2, -3, -5); unit 1: max(-2, 1, 1)
SUM = torch.tensor([[-6.0, 0.0]])  # unit 0: 2 - 3 - 5; unit 1: -2 + 1 + 1
PATCH = torch.tensor([[0, 1]])  # first maximal position (unit 1 ties at positions 1 and 2)


def test_max_and_sum_over_positions_by_hand() -> None:
    assert torch.equal(unit_scores(A, M), MAX)
    assert torch.equal(unit_scores(A, M, "max"), MAX)
    assert torch.equal(unit_scores(A, M, "sum"), SUM)
    s, p = unit_scores(A, M, patch=True)
    assert torch.equal(s, MAX) and torch.equal(p, PATCH)
    # positions are always the second-to-last axis: [P, U] and [b, L, P, U] work alike
    assert torch.equal(unit_scores(A[0], M[0], "sum"), SUM[0])
    big_a, big_m = A[None].expand(2, 3, 3, 2), M[None].expand(2, 3, 3, 2)
    assert torch.equal(unit_scores(big_a, big_m), MAX[None].expand(2, 3, 2))
    assert torch.equal(unit_scores(big_a, big_m, patch=True)[1], PATCH[None].expand(2, 3, 2))


def test_max_and_sum_against_an_independent_loop() -> None:
    torch.manual_seed(0)
    a, m = torch.randn(4, 5, 7), torch.randn(4, 5, 7)
    for layer in range(4):
        for unit in range(7):
            vals = [float(a[layer, p, unit]) * float(m[layer, p, unit]) for p in range(5)]
            assert float(unit_scores(a, m)[layer, unit]) == pytest.approx(max(vals), rel=1e-6)
            assert float(unit_scores(a, m, "sum")[layer, unit]) == pytest.approx(sum(vals), abs=1e-5)
            assert int(unit_scores(a, m, patch=True)[1][layer, unit]) == vals.index(max(vals))


def test_bad_aggregate_is_refused() -> None:
    with pytest.raises(ValueError, match="aggregate must be one of"):
        unit_scores(A, M, "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="aggregate must be one of"):
        unit_scores(A, M, "mean", patch=True)  # type: ignore[call-overload]
