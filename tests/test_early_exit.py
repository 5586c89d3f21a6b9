import itertools
import math

import pytest
import torch

from diffusion.early_exit import EXIT_RULES, binomial_upper_tail, exact_decided, prune_classes, sequential_decided
from diffusion.voting import summarize, vote_counts


def majority_vote(errors: torch.Tensor) -> torch.Tensor:
    return summarize(errors)["prediction"]


def decided(counts, steps_done, total):
    return exact_decided(torch.tensor(counts), steps_done, total).tolist()


def errors_from_votes(votes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(M, N) winning class per step -> (M, C, N) errors whose per-step argmin is that class."""
    return 1.0 - torch.nn.functional.one_hot(votes, num_classes).permute(0, 2, 1).float()


def test_exit_rules():
    assert EXIT_RULES == ("none", "exact", "sequential")


def test_exact_two_classes_by_hand():
    # total 11: after 6 steps at 6-0, 5 remain and class 1 can reach 5 < 6
    assert decided([[6, 0]], 6, 11) == [True]
    # after 5 at 5-0, 6 remain and class 1 can reach 6 > 5
    assert decided([[5, 0]], 5, 11) == [False]
    # 4-3 after 7 of 11: class 1 can reach 7 > 4
    assert decided([[4, 3], [3, 4]], 7, 11) == [False, False]
    # total 6, 3-0 after 3: class 1 can only tie at 3-3, and the tie goes to class 0
    assert decided([[3, 0]], 3, 6) == [True]
    # 0-3: class 0 can tie at 3-3 and would win the tie, so nothing is settled yet
    assert decided([[0, 3]], 3, 6) == [False]
    # 0-4 after 4 of 6: class 0 can reach only 2
    assert decided([[0, 4]], 4, 6) == [True]


def test_exact_three_classes_by_hand():
    # total 11, 8 done, 3 remain; leader class 1 with 5
    assert decided([[1, 5, 2]], 8, 11) == [True]  # class 2 can tie at 5 but 2 > 1; class 0 reaches 4
    assert decided([[2, 5, 1]], 8, 11) == [False]  # class 0 can tie at 5 and would win the tie
    assert decided([[0, 5, 3]], 8, 11) == [False]  # class 2 can reach 6
    assert decided([[5, 2, 1]], 8, 11) == [True]  # class 1 reaches 5 = tie, lost to class 0
    # batch of mixed rows, steps_done per row
    counts = torch.tensor([[1, 5, 2], [2, 5, 1], [3, 0, 0]])
    assert exact_decided(counts, torch.tensor([8, 8, 3]), 11).tolist() == [True, False, False]


def test_exact_all_steps_done_is_always_decided():
    assert decided([[2, 2], [0, 0], [1, 3]], 4, 4) == [True, True, True]
    assert decided([[0, 0, 0]], 0, 0) == [True]
    with pytest.raises(ValueError):
        exact_decided(torch.tensor([[3, 3]]), 6, 5)


@pytest.mark.parametrize("num_classes, max_total", [(2, 7), (3, 5), (4, 4)])
def test_exact_matches_brute_force_over_every_completion(num_classes, max_total):
    """Reference test: enumerate every vote sequence of length `total`; for each prefix, the
    prefix's counts are decided iff voting.majority_vote gives one class for all sequences that
    share those prefix counts (i.e. for every completion of the remaining votes)."""
    for total in range(max_total + 1):
        sequences = list(itertools.product(range(num_classes), repeat=total))
        votes = torch.tensor(sequences, dtype=torch.long).reshape(len(sequences), total)
        finals = majority_vote(errors_from_votes(votes, num_classes))
        seen_true = seen_false = False
        for steps_done in range(total + 1):
            prefix = votes[:, :steps_done]
            counts = vote_counts(errors_from_votes(prefix, num_classes))  # zeros when steps_done = 0
            flags = exact_decided(counts, steps_done, total)
            groups: dict[tuple, set] = {}
            for row, final in zip(counts.tolist(), finals.tolist()):
                groups.setdefault(tuple(row), set()).add(final)
            for row, flag in zip(counts.tolist(), flags.tolist()):
                assert flag == (len(groups[tuple(row)]) == 1), (total, steps_done, row, groups[tuple(row)])
                seen_true |= flag
                seen_false |= not flag
        if total >= 2:
            assert seen_true and seen_false  # both outcomes exercised


@pytest.mark.parametrize("num_classes", [2, 3])
def test_chunked_simulation_with_exact_exit_equals_full_majority(num_classes):
    torch.manual_seed(0)
    batch, num_steps, chunk = 200, 51, 4
    # per-image bias towards a random class, from clear-cut to near coin-flip
    favoured = torch.nn.functional.one_hot(torch.randint(num_classes, (batch,)), num_classes)[:, :, None]
    errors = torch.randn(batch, num_classes, num_steps) - torch.rand(batch, 1, 1) * favoured
    counts = torch.zeros(batch, num_classes, dtype=torch.long)
    active = torch.ones(batch, dtype=torch.bool)
    predictions = torch.full((batch,), -1)
    steps_used = 0
    for start in range(0, num_steps, chunk):
        stop = min(start + chunk, num_steps)
        chunk_counts = vote_counts(errors[active, :, start:stop])
        counts[active] += chunk_counts
        steps_used += int(active.sum()) * (stop - start)
        now = exact_decided(counts, stop, num_steps) & active
        # the leader on the steps seen so far, by voting's own tie rule
        predictions[now] = majority_vote(errors[now, :, :stop])
        active &= ~now
        if not active.any():
            break
    assert not active.any()
    assert torch.equal(predictions, majority_vote(errors))
    assert steps_used < batch * num_steps
    assert (predictions >= 0).all()


def exact_tail(k: int, n: int) -> float:
    # exact rational, correctly rounded by Python's int / int
    return sum(math.comb(n, j) for j in range(max(k, 0), n + 1)) / 2**n


def test_binomial_upper_tail_hand_values():
    got = binomial_upper_tail(torch.tensor([10, 9, 0, 11, 0, 1]), torch.tensor([10, 10, 10, 10, 0, 1]))
    assert got.dtype == torch.float64
    expected = torch.tensor([1 / 1024, 11 / 1024, 1.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_binomial_upper_tail_matches_math_comb_sums():
    pairs = [(k, n) for n in range(61) for k in range(-1, n + 2)]
    k, n = (torch.tensor(column) for column in zip(*pairs))
    expected = torch.tensor([exact_tail(kk, nn) for kk, nn in pairs], dtype=torch.float64)
    torch.testing.assert_close(binomial_upper_tail(k, n), expected, rtol=1e-12, atol=0)


def test_binomial_upper_tail_large_n_and_shapes():
    n = 3001
    ks = [0, 1400, 1501, 1600, 1800, 2500]
    got = binomial_upper_tail(torch.tensor(ks), torch.tensor(n))
    expected = torch.tensor([exact_tail(k, n) for k in ks], dtype=torch.float64)
    # lgamma(n + 1) ~ 2e4 here, so its rounding leaves ~1e-12 relative error (docstring)
    torch.testing.assert_close(got, expected, rtol=1e-11, atol=0)
    assert got[2].item() == pytest.approx(0.5, rel=1e-11)  # n odd, k = (n + 1) / 2: symmetry
    assert binomial_upper_tail(torch.ones(2, 3), torch.full((2, 3), 2.0)).shape == (2, 3)


def test_sequential_threshold_at_alpha_001():
    two = torch.tensor(
        [
            [7, 0],  # p = 1/128 = 0.0078, but only 7 steps < min_steps = 10
            [10, 0],  # p = 1/1024
            [9, 1],  # p = 11/1024 = 0.0107 > 0.01
            [10, 1],  # p = 12/2048 = 0.0059
            [1, 10],  # leader is class 1: same p
            [6, 6],  # tie: p >= 1/2
        ]
    )
    assert sequential_decided(two, alpha=0.01).tolist() == [False, True, False, True, True, False]
    three = torch.tensor(
        [
            [9, 1, 5],  # L=0, R=2, n=14, k=9: p = 3473/16384 = 0.21
            [12, 1, 0],  # L=0, R=1, n=13, k=12: p = 14/8192 = 0.0017
            [0, 5, 0],  # 5 steps < min_steps
        ]
    )
    assert sequential_decided(three, alpha=0.01).tolist() == [False, True, False]
    # runner-up tie between classes 2 and 3: n = 13, k = 12 either way
    assert sequential_decided(torch.tensor([[0, 12, 1, 1]]), alpha=0.01).tolist() == [True]


def test_sequential_min_steps_and_alpha():
    counts = torch.tensor([[7, 0], [6, 0]])
    assert sequential_decided(counts, alpha=0.01, min_steps=7).tolist() == [True, False]
    assert sequential_decided(counts, alpha=0.01, min_steps=8).tolist() == [False, False]
    assert sequential_decided(counts, alpha=0.02, min_steps=0).tolist() == [True, True]
    # a third class's votes count towards min_steps, not towards the test: [10, 1, 1] tests
    # n = 11, k = 10 (p = 12/2048) like [10, 1], but has 12 steps done
    assert sequential_decided(torch.tensor([[10, 1, 1]]), alpha=0.01, min_steps=12).tolist() == [True]
    assert sequential_decided(torch.tensor([[10, 1]]), alpha=0.01, min_steps=12).tolist() == [False]
    assert sequential_decided(torch.tensor([[10, 1, 1]]), alpha=0.01, min_steps=13).tolist() == [False]
    with pytest.raises(ValueError):
        sequential_decided(counts, alpha=0.0)


def test_sequential_never_fires_without_a_lead():
    ties = torch.tensor([[k, k, 3] for k in range(7, 200, 7)])
    assert not sequential_decided(ties, alpha=0.5, min_steps=0).any()
    assert not sequential_decided(ties[:, :2], alpha=0.5, min_steps=0).any()


def test_prune_classes_by_hand():
    # means per class: image 0 [3, 1, 2, 0.5] -> lowest two are 3 and 1
    #                  image 1 [1, 1, 0, 1]   -> class 2, then the tie 0/1/3 goes to 0
    errors = torch.tensor(
        [
            [[3.0, 3.0, 3.0], [0.0, 1.0, 2.0], [2.0, 2.0, 2.0], [0.5, 0.5, 0.5]],
            [[1.0, 1.0, 1.0], [0.0, 2.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]],
        ]
    )

    def kept(keep):
        return [row.nonzero().flatten().tolist() for row in prune_classes(errors, keep)]

    assert kept(2) == [[1, 3], [0, 2]]
    assert kept(1) == [[3], [2]]
    assert kept(3) == [[1, 2, 3], [0, 1, 2]]
    assert kept(4) == [[0, 1, 2, 3]] * 2
    assert kept(9) == [[0, 1, 2, 3]] * 2
    with pytest.raises(ValueError):
        prune_classes(errors, keep=0)


def test_pruned_classes_take_no_part_in_either_exit():
    kept = torch.tensor([[False, True, True, False]])
    # 26 of 36 steps done, 10 to come; class 0 won 6 before it was pruned and can win no more
    counts = torch.tensor([[6, 15, 5, 0]])
    assert not exact_decided(counts, 26, 36).item()  # unmasked, class 0 could reach 16 > 15 ...
    assert exact_decided(counts, 26, 36, kept).item()  # ... masked, only class 2 can tie at 15, and 1 < 2 wins
    # the runner-up is the best kept class, not a pruned one with more votes before pruning
    counts = torch.tensor([[12, 12, 0, 0]])
    assert not sequential_decided(counts, alpha=0.01, min_steps=0).item()  # a tie between 0 and 1
    assert sequential_decided(counts, alpha=0.01, min_steps=0, kept=kept).item()  # 12 vs 0: p = 2**-12
    # one kept class: nothing to beat
    alone = torch.tensor([[False, True, False, False]])
    assert sequential_decided(torch.tensor([[0, 7, 0, 0]]), alpha=0.01, min_steps=5, kept=alone).item()
