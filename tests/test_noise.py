"""diffusion/noise.py: the counter-based (eps, t) pairs. Each number depends on (seed, id, step) and
its position alone; the normals and times have the distributions they claim; strata are covered."""

import math

import pytest
import torch

from diffusion.noise import EXPLANATION_STEP, normals, pair_keys, shared_noise, stratified_times, uniform_times


def test_keys_separate_seed_id_and_step():
    ids, steps = torch.arange(50).reshape(-1, 1), torch.arange(50)
    keys = pair_keys(ids, steps, seed=0)
    assert keys.shape == (50, 50) and keys.unique().numel() == 2500
    assert pair_keys(torch.tensor(1), torch.tensor(0), 0) != pair_keys(torch.tensor(0), torch.tensor(1), 0)
    assert not torch.equal(pair_keys(ids, steps, 1), keys)
    assert not torch.equal(pair_keys(ids, steps, -1), keys)  # the validation-loss stream
    # ids above 2**32 (the combined datamodule's) and a large seed stay distinct and finite
    big = pair_keys(torch.tensor([3_000_000_001, 3_000_000_002]), torch.tensor(0), seed=10**12)
    assert big[0] != big[1]


def test_pairs_depend_on_seed_id_and_step_only():
    t_all, eps_all = shared_noise(torch.tensor([3, 9]), range(0, 4), (2, 4, 4), seed=1)
    t_one, eps_one = shared_noise(torch.tensor([9]), range(2, 4), (2, 4, 4), seed=1)
    assert torch.equal(t_one[0], t_all[1, 2:]) and torch.equal(eps_one[0], eps_all[1, 2:])
    # any subset of pairs, in any order and shape, gives the same numbers
    keys = pair_keys(torch.tensor([9, 3, 9]), torch.tensor([3, 0, 0]), seed=1)
    assert torch.equal(normals(keys, (2, 4, 4)), torch.stack([eps_all[1, 3], eps_all[0, 0], eps_all[1, 0]]))
    assert torch.equal(uniform_times(keys), torch.stack([t_all[1, 3], t_all[0, 0], t_all[1, 0]]))
    t_other, eps_other = shared_noise(torch.tensor([3]), range(0, 4), (2, 4, 4), seed=2)
    assert not torch.equal(t_other[0], t_all[0]) and not torch.equal(eps_other[0], eps_all[0])


def test_normals_are_standard_normal_and_independent():
    keys = pair_keys(torch.arange(8).reshape(-1, 1), torch.arange(16), seed=0)
    eps = normals(keys, (3, 32, 32)).double()  # 393,216 values
    n = eps.numel()
    assert abs(eps.mean()) < 5 / math.sqrt(n) and abs(eps.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((eps**4).mean() - 3) < 5 * math.sqrt(96 / n)  # kurtosis of a normal: 3 (var of x^4 is 96)
    # the tail as a normal's: P(|x| > 3) = 0.0027
    assert abs((eps.abs() > 3).double().mean() - 0.0026998) < 5 * math.sqrt(0.0027 / n)
    flat = eps.reshape(128, -1)
    correlations = torch.corrcoef(flat)[~torch.eye(128, dtype=torch.bool)]  # between pairs
    assert correlations.abs().max() < 6 / math.sqrt(flat.shape[1])
    within = torch.corrcoef(torch.stack([flat[:, :-1].flatten(), flat[:, 1:].flatten()]))[0, 1]  # neighbours
    assert abs(within) < 5 / math.sqrt(n)


def test_times_are_uniform_on_the_unit_interval():
    t = uniform_times(pair_keys(torch.arange(100).reshape(-1, 1), torch.arange(100), seed=0)).double()
    assert ((t >= 0) & (t < 1)).all()
    counts = torch.histc(t, bins=10, min=0, max=1)
    chi2 = ((counts - 1000) ** 2 / 1000).sum()
    assert chi2 < 27.9  # the 0.999 quantile of chi-squared with 9 degrees of freedom


def test_stratified_times_one_per_stratum_and_deterministic():
    ids = torch.tensor([11, 12])
    for num_steps in (1, 2, 7, 51, 501):
        t = stratified_times(ids, num_steps, seed=3)
        assert t.shape == (2, num_steps) and t.dtype == torch.float64
        assert ((t >= 0) & (t < 1)).all()
        for row in torch.floor(t * num_steps).long():
            assert sorted(row.tolist()) == list(range(num_steps))
        assert torch.equal(t[1], stratified_times(ids[1:], num_steps, seed=3)[0])  # the image's own order


def test_stratified_order_differs_per_image_and_seed_and_is_shuffled():
    def order(seed, sample_id):
        return torch.floor(stratified_times(torch.tensor([sample_id]), 51, seed) * 51).long()[0]

    assert not torch.equal(order(0, 0), order(0, 1))
    assert not torch.equal(order(0, 0), order(1, 0))
    assert not torch.equal(order(0, 0), torch.arange(51))  # an early exit after a prefix sees t spread out
    with pytest.raises(ValueError):
        stratified_times(torch.tensor([0]), 0, 0)


def test_the_explanation_stream_is_no_classification_step():
    keys = pair_keys(torch.arange(20).reshape(-1, 1), torch.arange(600), seed=0)
    explanation = pair_keys(torch.arange(20), torch.tensor(EXPLANATION_STEP), seed=0)
    assert not torch.isin(explanation, keys).any()
