"""The pure merge functions of peftctl.adapters.core.combine vs hand-written element-wise references."""

from __future__ import annotations

import itertools

import pytest
import torch

from peftctl.adapters.core import combine
from peftctl.errors import ConfigError


def _tensors(n: int = 3, shape=(6, 5), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _topk_reference(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·n) largest |entries| (entries are distinct, so the set is unique)."""
    flat = t.flatten().tolist()
    keep = int(density * len(flat))
    order = sorted(range(len(flat)), key=lambda i: -abs(flat[i]))[:keep]
    out = [flat[i] if i in order else 0.0 for i in range(len(flat))]
    return torch.tensor(out).reshape(t.shape)


def _ties_reference(tensors, weights, density, method):
    trimmed = [_topk_reference(t, density) for t in tensors]
    out = torch.zeros_like(tensors[0])
    for idx in itertools.product(*(range(s) for s in out.shape)):
        values = [float(t[idx]) for t in trimmed]
        if method == "total":
            score = sum(values)
        else:
            score = sum((v > 0) - (v < 0) for v in values)
        elected = 1 if score >= 0 else -1
        agree = [(w * v) for v, w in zip(values, weights) if v != 0 and (v > 0) == (elected > 0)]
        out[idx] = sum(agree) / max(1, len(agree))
    return out


def test_task_arithmetic_is_the_weighted_sum():
    ts, w = _tensors(), [0.5, -1.0, 2.0]
    expected = 0.5 * ts[0] - 1.0 * ts[1] + 2.0 * ts[2]
    torch.testing.assert_close(combine.task_arithmetic(ts, w), expected)
    torch.testing.assert_close(combine.task_arithmetic(ts, torch.tensor(w)), expected)


@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 0.9])
def test_magnitude_prune_keeps_the_top_fraction(density):
    t = _tensors(1)[0]
    pruned = combine.prune(t, density, "magnitude")
    torch.testing.assert_close(pruned, _topk_reference(t, density))
    assert int((pruned != 0).sum()) == int(density * t.numel())


def test_prune_density_one_is_identity_and_negative_is_an_error():
    t = _tensors(1)[0]
    assert torch.equal(combine.prune(t, 1.0, "magnitude"), t)
    assert torch.equal(combine.prune(t, 1.0, "random", rescale=True), t)
    with pytest.raises(ConfigError, match="density=-0.1"):
        combine.prune(t, -0.1, "magnitude")
    with pytest.raises(ConfigError, match="prune method='median'"):
        combine.prune(t, 0.5, "median")


def test_magnitude_prune_merge():
    ts, w = _tensors(), [0.3, 0.7, -0.2]
    expected = sum(wi * _topk_reference(t, 0.4) for wi, t in zip(w, ts))
    torch.testing.assert_close(combine.magnitude_prune(ts, w, 0.4), expected)


def test_majority_sign_mask_total_and_frequency():
    stacked = torch.tensor([[3.0, -1.0, 0.0], [-1.0, -1.0, 2.0], [-1.0, 5.0, -2.0]])
    # column sums: 1, 3, 0 -> elected +, +, + ; sign counts: -1, -1, 0 -> elected -, -, +
    total = combine.calculate_majority_sign_mask(stacked, "total")
    frequency = combine.calculate_majority_sign_mask(stacked, "frequency")
    assert total.tolist() == [[True, False, False], [False, False, True], [False, True, False]]
    assert frequency.tolist() == [[False, True, False], [True, True, True], [True, False, False]]
    with pytest.raises(ConfigError, match="majority_sign_method='mean'"):
        combine.calculate_majority_sign_mask(stacked, "mean")


def test_disjoint_merge_is_the_mean_over_agreeing_entries():
    stacked = torch.tensor([[2.0, 1.0], [4.0, -3.0], [-1.0, 0.0]])
    mask = torch.tensor([[True, False], [True, False], [False, False]])
    # column 0: mean of 2 and 4; column 1: nothing agrees -> 0 (divided by max(1, 0))
    assert combine.disjoint_merge(stacked, mask).tolist() == [3.0, 0.0]


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 0.7, 1.0])
def test_ties_matches_the_elementwise_reference(method, density):
    ts, w = _tensors(), [1.0, 0.5, -0.8]
    torch.testing.assert_close(combine.ties(ts, w, density, method), _ties_reference(ts, w, density, method))


def test_dare_linear_equals_masked_rescaled_sum_under_the_same_generator():
    ts, w, density = _tensors(), [0.4, 0.6, 1.0], 0.3
    result = combine.dare_linear(ts, w, density, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    masks = [torch.bernoulli(torch.full_like(t, density), generator=g) for t in ts]
    expected = sum(wi * m * t / density for wi, m, t in zip(w, masks, ts))
    torch.testing.assert_close(result, expected)


def test_dare_ties_equals_ties_election_on_the_dropped_tensors():
    ts, w, density = _tensors(), [0.4, -0.6, 1.0], 0.5
    result = combine.dare_ties(ts, w, density, "frequency", generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    dropped = [torch.bernoulli(torch.full_like(t, density), generator=g) * t / density for t in ts]
    # ties with density 1 performs no trimming: election + disjoint merge only
    torch.testing.assert_close(result, _ties_reference(dropped, w, 1.0, "frequency"))


@pytest.mark.parametrize("density", [0.1, 0.5, 0.8])
def test_dare_kept_fraction_and_exact_rescale(density):
    t = torch.randn(200, 250, generator=torch.Generator().manual_seed(0))
    dropped = combine.prune(t, density, "random", rescale=True, generator=torch.Generator().manual_seed(1))
    kept = dropped != 0
    assert abs(float(kept.float().mean()) - density) <= 0.02
    # every kept entry is exactly t / density, every other entry exactly 0
    assert torch.equal(dropped[kept], t[kept] / density)
    assert torch.equal(dropped[~kept], torch.zeros_like(dropped[~kept]))
    # the same seed gives the same mask
    again = combine.prune(t, density, "random", rescale=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(dropped, again)


def test_merge_tensors_dispatch_and_density_requirement():
    ts, w = _tensors(), [1.0, 1.0, 1.0]
    torch.testing.assert_close(combine.merge_tensors("linear", ts, w), combine.task_arithmetic(ts, w))
    torch.testing.assert_close(combine.merge_tensors("ties", ts, w, 0.5), combine.ties(ts, w, 0.5))
    torch.testing.assert_close(
        combine.merge_tensors("magnitude_prune", ts, w, 0.5), combine.magnitude_prune(ts, w, 0.5)
    )
    with pytest.raises(ConfigError, match="needs a density"):
        combine.merge_tensors("ties", ts, w)
    with pytest.raises(ConfigError, match="merge kind 'average' is not valid"):
        combine.merge_tensors("average", ts, w)
    with pytest.raises(ConfigError, match="got 2 weights for 3 tensors"):
        combine.task_arithmetic(ts, [1.0, 2.0])


def test_svd_refactor_full_rank_is_exact_and_truncation_is_eckart_young():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 4, generator=g) @ torch.randn(4, 9, generator=g) + 0.01 * torch.randn(12, 9, generator=g)
    a, b = combine.svd_refactor(delta, 9)
    assert a.shape == (9, 9) and b.shape == (12, 9)
    torch.testing.assert_close(b @ a, delta, rtol=1e-5, atol=1e-5)
    singular = torch.linalg.svdvals(delta)
    for rank in (1, 3, 4):
        a, b = combine.svd_refactor(delta, rank, full_matrices=False)
        assert a.shape == (rank, 9) and b.shape == (12, rank)
        error = float((b @ a - delta).norm())
        assert error == pytest.approx(float(singular[rank:].norm()), rel=1e-4, abs=1e-6)


def test_svd_refactor_pads_when_rank_exceeds_the_matrix_rank_dimension():
    delta = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    a, b = combine.svd_refactor(delta, 6)
    assert a.shape == (6, 3) and b.shape == (5, 6)
    torch.testing.assert_close(b @ a, delta, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(a[3:]) == 0 and torch.count_nonzero(b[:, 3:]) == 0


def test_svd_clamp_bounds_factors_at_the_quantile():
    delta = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    a0, b0 = combine.svd_refactor(delta, 4)
    limit = torch.quantile(torch.cat([b0.flatten(), a0.flatten()]), 0.8)
    a, b = combine.svd_refactor(delta, 4, clamp=0.8)
    torch.testing.assert_close(a, a0.clamp(-limit, limit))
    torch.testing.assert_close(b, b0.clamp(-limit, limit))
    assert float(torch.cat([a.flatten(), b.flatten()]).abs().max()) <= float(limit) + 1e-7
    assert not torch.equal(a, a0) or not torch.equal(b, b0)


def test_svd_driver_is_ignored_off_cuda():
    delta = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    a0, b0 = combine.svd_refactor(delta, 3)
    a, b = combine.svd_refactor(delta, 3, driver="gesvd")
    assert torch.equal(a, a0) and torch.equal(b, b0)
