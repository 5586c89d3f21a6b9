"""Decision rules calibrated on the validation split, then applied unchanged to the test set.

Two ways to act on a classifier's uncertainty, both fitted on calibration outputs only
(per-image results on the validation split) and then applied to the test set:

- Referral (selective classification): an image whose uncertainty exceeds a threshold goes to a
  human. The threshold either refers a fixed fraction of images or is the largest one whose error
  rate among accepted images is certified below 1 - target accuracy with probability >= 1 - delta
  (a Clopper-Pearson bound, Bonferroni over the thresholds scanned, after Geifman & El-Yaniv,
  "Selective classification for deep neural networks", 2017).
- Split-conformal prediction sets (Vovk et al.; Angelopoulos & Bates, "A gentle introduction to
  conformal prediction", 2021), marginal or class-conditional (Mondrian): each image gets the set of
  classes whose score is not too far from the calibration labels' scores.

Inputs, as in `decisions/uncertainty.py`: probs (N, C) class scores whose rows sum to 1 (vote
fractions of a diffusion classifier, or softmax / MC-dropout mean probabilities of a baseline),
labels (N,), predictions (N,) the model's decisions (not necessarily argmax of probs), uncertainty
(N,) with higher = more uncertain (vote entropy). Images are ranked with that file's tie rule: a
stable ascending sort on (uncertainty, index).

Why a few lines of our own rather than a library: MAPIE and crepes wrap scikit-learn estimators
(they fit or call `predict_proba` themselves) and bring scikit-learn, scipy and pandas with them;
here the scores are already given and split conformal is one quantile. The Clopper-Pearson bound is
an exact binomial CDF and a bisection (`clopper_pearson_upper`), written before scipy became a
dependency (decisions/statistics.py) and checked against its closed form at zero errors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .uncertainty import certainty_order, per_image

CONFORMAL_CORRECTION = "ceil((n+1)(1-alpha))-th smallest of n"
CONFORMAL_KINDS = ("marginal", "class_conditional")


# ---------------------------------------------------------------- Clopper-Pearson
def binomial_cdf(errors: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= errors), summed exactly in log space (no overflow for large n)."""
    if errors >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = torch.arange(errors + 1, dtype=torch.float64)
    log_pmf = math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1)
    log_pmf = log_pmf + i * math.log(p) + (n - i) * math.log1p(-p)
    return min(1.0, float(torch.logsumexp(log_pmf, 0).exp()))


def clopper_pearson_upper(errors: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper confidence bound on an error rate.

    Definition: the largest p with P(Binomial(n, p) <= errors) >= 1 - confidence. For every true
    rate p, P(bound < p) <= 1 - confidence, whatever n (an exact, not asymptotic, bound). Found by
    bisection on p, which the CDF decreases in, to the last bit of a float64. n = 0 (nothing
    observed) and errors = n give 1.0; errors = 0 has the closed form 1 - (1 - confidence)^(1/n).
    """
    if not 0 <= errors <= n:
        raise ValueError(f"need 0 <= errors <= n, got errors={errors}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n == 0 or errors == n:
        return 1.0
    level = 1.0 - confidence
    lo, hi = 0.0, 1.0  # invariant: CDF(lo) >= level > CDF(hi)
    for _ in range(2000):  # stops when the interval is one float apart (about 60 steps)
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if binomial_cdf(errors, n, mid) >= level:
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------- referral
def apply_referral(uncertainty, threshold: float) -> Tensor:
    """Bool (N,): True = refer the image to a human. Accepted iff uncertainty <= threshold.

    Written as `not (u <= threshold)` so that a NaN uncertainty is referred, never accepted.
    """
    return ~(torch.as_tensor(uncertainty).double() <= threshold)


def selective_report(refer, predictions, labels) -> dict:
    """Coverage (fraction accepted), accuracy and risk on the accepted images, counts.

    Accuracy and risk are NaN when nothing is accepted (there is no error rate to report).
    """
    refer, predictions, labels = per_image(torch.as_tensor(refer), predictions, labels)
    accepted = ~refer.bool()
    k = int(accepted.sum())
    accuracy = float((predictions[accepted] == labels[accepted]).double().mean()) if k else float("nan")
    return {
        "coverage": k / accepted.shape[0],
        "accuracy": accuracy,
        "risk": 1.0 - accuracy,
        "n_accepted": k,
        "n_referred": accepted.shape[0] - k,
    }


def check_referral_levels(target_accuracy, refer_fraction, delta: float) -> None:
    if (target_accuracy is None) == (refer_fraction is None):
        raise ValueError(
            "give exactly one of target_accuracy (certify the accuracy on accepted images) or "
            f"refer_fraction (refer a fixed fraction), got target_accuracy={target_accuracy}, "
            f"refer_fraction={refer_fraction}"
        )
    if target_accuracy is not None and not 0.0 < target_accuracy < 1.0:
        raise ValueError(f"target_accuracy must lie in (0, 1), got {target_accuracy}")
    if refer_fraction is not None and not 0.0 <= refer_fraction <= 1.0:
        raise ValueError(f"refer_fraction must lie in [0, 1], got {refer_fraction}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")


def _fraction_rule(sorted_u: Tensor, refer_fraction: float) -> float:
    """The threshold that refers the round(f * n) most uncertain images (round half up).

    It is the uncertainty of the last accepted image in the module's order. Images tied with it
    are accepted too (accept iff u <= threshold), so with ties fewer than round(f * n) may be
    referred; the caller reports the realised fraction. round(f * n) = 0 gives +inf: nothing is
    referred, at test time either, which is what f = 0 means; round(f * n) = n gives -inf.
    """
    n = sorted_u.shape[0]
    n_keep = n - min(n, math.floor(refer_fraction * n + 0.5 + 1e-9))
    if n_keep == n:
        return math.inf
    return float(sorted_u[n_keep - 1]) if n_keep > 0 else -math.inf


def _certified_rule(sorted_u: Tensor, sorted_errors: Tensor, target_accuracy: float, delta: float) -> tuple:
    """(threshold, number of candidates m): the largest candidate whose risk bound <= 1 - a.

    Candidates are the distinct calibration uncertainties. Candidate j accepts k_j images with e_j
    errors; its bound is the Clopper-Pearson upper bound at confidence 1 - delta / m, so with
    probability >= 1 - delta all m bounds hold at once (Bonferroni) and the chosen one holds
    whichever is chosen. Geifman & El-Yaniv bisect over the thresholds and divide delta by the
    number of bisection steps; scanning all m is simpler and only more conservative. The CDF
    decreases in p, so bound <= r exactly when P(Binomial(k, r) <= e) <= delta / m: one CDF per
    candidate instead of a bisection. The threshold is -inf (refer everything) when none qualifies.
    """
    values, counts = torch.unique_consecutive(sorted_u, return_counts=True)
    accepted = counts.cumsum(0)
    errors = sorted_errors.cumsum(0)[accepted - 1]
    m, risk = values.shape[0], 1.0 - target_accuracy
    for j in reversed(range(m)):  # largest coverage first; stop at the first that qualifies
        if binomial_cdf(int(errors[j]), int(accepted[j]), risk) <= delta / m:
            return float(values[j]), m
    return -math.inf, m


def referral_threshold(
    uncertainty,
    predictions,
    labels,
    target_accuracy: float | None = None,
    refer_fraction: float | None = None,
    delta: float = 0.1,
) -> dict:
    """Fit a referral threshold on calibration outputs (accept iff uncertainty <= threshold).

    Exactly one rule:
    - refer_fraction f: refer the round(f * n) most uncertain calibration images (ties at the
      threshold are accepted, so the realised fraction `refer_fraction_realised` may be lower);
    - target_accuracy a: the largest coverage whose error rate among accepted images is at most
      1 - a with probability >= 1 - delta (see `_certified_rule`). If no threshold qualifies,
      `feasible` is False, the threshold is -inf (every image referred) and `reason` says why.

    Only calibration inputs enter; apply the result to test images with `apply_referral`.
    `risk_bound` is the Clopper-Pearson bound on the calibration accepted images at confidence
    `confidence` (1 - delta / candidates). For refer_fraction one threshold is tested (candidates
    = 1): it is chosen from the uncertainties alone, without the labels, so the bound is a fair
    estimate but carries no guarantee of the target_accuracy kind.
    """
    check_referral_levels(target_accuracy, refer_fraction, delta)
    uncertainty, predictions, labels = per_image(uncertainty, predictions, labels)
    if uncertainty.isnan().any():
        raise ValueError("calibration uncertainties contain NaN; such images cannot be ranked")
    order = certainty_order(uncertainty)
    sorted_u, sorted_errors = uncertainty.double()[order], (predictions != labels)[order].long()
    if refer_fraction is not None:
        threshold, m = _fraction_rule(sorted_u, refer_fraction), 1
    else:
        threshold, m = _certified_rule(sorted_u, sorted_errors, target_accuracy, delta)
    accepted = sorted_u <= threshold
    k, e = int(accepted.sum()), int(sorted_errors[accepted].sum())
    feasible = refer_fraction is not None or threshold > -math.inf
    reason = None
    if not feasible:
        reason = (
            f"no threshold certifies accuracy >= {target_accuracy} at delta={delta} on "
            f"{sorted_u.shape[0]} calibration images ({m} candidates): every image is referred"
        )
    return {
        "rule": "refer_fraction" if refer_fraction is not None else "target_accuracy",
        "threshold": threshold,
        "target_accuracy": target_accuracy,
        "refer_fraction": refer_fraction,
        "delta": delta,
        "n_calibration": sorted_u.shape[0],
        "candidates": m,
        "confidence": 1.0 - delta / m,
        "coverage": k / sorted_u.shape[0],
        "refer_fraction_realised": (sorted_u.shape[0] - k) / sorted_u.shape[0],
        "accuracy": 1.0 - e / k if k else float("nan"),
        "risk_bound": clopper_pearson_upper(e, k, 1.0 - delta / m),
        "feasible": feasible,
        "reason": reason,
    }


# ---------------------------------------------------------------- split conformal
# Nonconformity score s(x, y) = 1 - probs[y]. With the q below, P(y_test in set) >= 1 - alpha for
# an exchangeable test image, ties or not (the set keeps every class with score <= q). The upper
# bound 1 - alpha + 1 / (n + 1) needs continuous scores: vote fractions take few values (k / N
# votes), so ties are common and coverage may exceed it. Class-conditional (Mondrian) sets give the
# same two statements within each true class, with that class's n_y.
def _quantile(scores: Tensor, alpha: float, what: str) -> tuple[float, int]:
    """(q, rank): the ceil((n+1)(1-alpha))-th smallest score; refuses when that rank exceeds n."""
    n = scores.shape[0]
    rank = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)  # 1e-9: 20 * 0.95 may read 19.000000000000004
    if rank > n:
        n_min = math.ceil(1.0 / alpha - 1e-9) - 1
        raise ValueError(
            f"alpha={alpha} needs at least {n_min} calibration images{what}, got n={n}: the "
            f"ceil((n+1)(1-alpha))-th smallest score does not exist (q = +inf, every set = all classes)"
        )
    return float(torch.sort(scores).values[rank - 1]), rank


def conformal_thresholds(probs, labels, alpha: float, class_conditional: bool, num_classes: int) -> dict:
    """Split-conformal thresholds on the scores 1 - probs[label] of the calibration images.

    Marginal: one q over all n images. Class-conditional: one q_y per class y from the n_y images of
    label y (coverage >= 1 - alpha within every true class, at the price of needing enough images in
    each). `q`, `n` and `rank` are numbers (marginal) or lists indexed by class, `scores` the
    calibration scores (a list of lists by class).
    """
    probs, labels = per_image(probs, labels)
    if probs.ndim != 2 or probs.shape[1] != num_classes:
        raise ValueError(f"probs must be (N, {num_classes}), got {tuple(probs.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    scores = 1.0 - probs.double().gather(1, labels.long()[:, None])[:, 0]
    if class_conditional:
        fitted = [_quantile(scores[labels == y], alpha, f" of class {y}") for y in range(num_classes)]
        q, rank = [f[0] for f in fitted], [f[1] for f in fitted]
        n = [int((labels == y).sum()) for y in range(num_classes)]
        kept = [scores[labels == y].tolist() for y in range(num_classes)]
    else:
        (q, rank), n, kept = _quantile(scores, alpha, ""), scores.shape[0], scores.tolist()
    return {
        "alpha": alpha,
        "class_conditional": class_conditional,
        "num_classes": num_classes,
        "q": q,
        "n": n,
        "rank": rank,
        "correction": CONFORMAL_CORRECTION,
        "scores": kept,  # the calibration scores (per class), for the exchangeability check of a test set
    }


def prediction_sets(probs, thresholds: dict) -> Tensor:
    """Bool (N, C): class y is in an image's set iff 1 - probs[y] <= q (or q_y)."""
    (probs,) = per_image(probs)
    q = torch.as_tensor(thresholds["q"], dtype=torch.float64)
    if probs.shape[1] != thresholds["num_classes"]:
        raise ValueError(f"probs have {probs.shape[1]} classes, the thresholds {thresholds['num_classes']}")
    return 1.0 - probs.double() <= q


def conformal_report(sets, labels) -> dict:
    """Empirical coverage (overall and per true class, NaN for an absent class), set sizes.

    `empty` is the fraction of images whose set is empty (possible when q is small), `singleton`
    the fraction with exactly one class (a confident decision).
    """
    sets, labels = per_image(torch.as_tensor(sets), labels)
    covered = sets.gather(1, labels.long()[:, None])[:, 0].double()
    size = sets.sum(1).double()
    per_class = [
        float(covered[labels == y].mean()) if (labels == y).any() else float("nan") for y in range(sets.shape[1])
    ]
    return {
        "coverage": float(covered.mean()),
        "coverage_per_class": per_class,
        "mean_set_size": float(size.mean()),
        "empty": float((size == 0).double().mean()),
        "singleton": float((size == 1).double().mean()),
    }
