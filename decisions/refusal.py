"""Knowing when not to answer: conformal refusal of out-of-distribution images, and a warning for a shifted set.

Calibration (on the validation split, by `validate`, beside the referral rule and the prediction sets):

1. The validation images are split in two by a seeded random permutation of their ids, which
   looks at nothing else: the reference half fits the score's `TimeProfile` (decisions/ood_scores.py;
   scores without one use every image for step 2), the calibration half gives n scores s_1..s_n.
2. A new image with score s gets the conformal p-value p = (1 + #{i: s_i >= s}) / (n + 1) and is
   refused when p < alpha. For an image exchangeable with the calibration images (the same
   distribution), P(p <= u) <= u for every u, so the false-refusal rate is at most alpha
   (Vovk et al. 2005; Bates et al. 2023, "Testing for outliers with conformal p-values"). The profile
   is fitted on other images, so the score is fixed before the calibration scores are seen, which
   the guarantee needs. Refusals need n >= 1/alpha - 1 calibration images: below that no p-value
   is small enough, and calibration says so.
3. A whole test or predict set is checked at once: if its images are exchangeable with the
   calibration images, their scores are neither stochastically larger nor smaller. The two-sided
   Mann-Whitney U test (normal approximation with the tie correction) compares the two samples; its
   rank statistic is the mean p-value in other words, and it accounts for the randomness of both
   samples, which a test of the p-values against the uniform distribution would not (they share one
   calibration set). decisions/set_shift.py runs it beside tests of the classifier's own outputs.

Why our own code: the p-value is one count; the Mann-Whitney test is checked against its exact null
distribution (tests/test_refusal.py) and against scipy's `mannwhitneyu` (tests/test_set_shift.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .ood_scores import NEEDS_PROFILE, TimeProfile, band_offsets, ood_score
from .uncertainty import auroc

SPLIT_SEED = 0  # the permutation of the validation ids into reference and calibration halves
TRUE_POSITIVE_RATE = 0.95


def reference_half(ids: Tensor, seed: int = SPLIT_SEED) -> Tensor:
    """Bool (n,): True for the floor(n / 2) images that fit the time profile, False for the others.

    A seeded random permutation of the images in id order: the same ids give the same halves on
    every rank and run, and the split depends on nothing but the ids.
    """
    order = torch.argsort(torch.as_tensor(ids).cpu(), stable=True)
    shuffled = order[torch.randperm(len(order), generator=torch.Generator().manual_seed(seed))]
    chosen = torch.zeros(len(order), dtype=torch.bool)
    chosen[shuffled[: len(order) // 2]] = True
    return chosen


def conformal_pvalues(calibration_scores, scores) -> Tensor:
    """(1 + #{calibration >= s}) / (n + 1) for every s in `scores` (float64)."""
    calibration = torch.as_tensor(calibration_scores, dtype=torch.float64).sort().values
    scores = torch.as_tensor(scores, dtype=torch.float64)
    at_least = len(calibration) - torch.searchsorted(calibration, scores, side="left")
    return (1.0 + at_least.double()) / (len(calibration) + 1.0)


def refusal_threshold(calibration_scores, alpha: float) -> float:
    """The score above which an image is refused (p < alpha): the (m + 1)-th largest calibration score,
    m = ceil(alpha (n + 1)) - 2, since p < alpha holds exactly when at most m calibration scores are >= s;
    +inf when no image can be refused."""
    calibration = torch.as_tensor(calibration_scores, dtype=torch.float64).sort(descending=True).values
    m = math.ceil(alpha * (len(calibration) + 1) - 1e-9) - 2
    return float(calibration[m]) if 0 <= m < len(calibration) else math.inf


def min_calibration_images(alpha: float) -> int:
    """The fewest calibration scores with which p < alpha can happen: 1 / (n + 1) < alpha."""
    return math.floor(1.0 / alpha + 1e-9)


def midranks(values: Tensor) -> Tensor:
    """Ranks 1..n of `values`, ties given the mean of the ranks they span."""
    unique, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    return (last - (counts.double() - 1) / 2)[inverse]


def shift_test(calibration_scores, scores, level: float, alternative: str = "two-sided") -> dict:
    """Mann-Whitney U test of `scores` against the calibration scores: two-sided (the whole-set check: a set
    scoring more typical than the calibration images is not exchangeable with them either) or "greater"
    (the conformity check: do the images conform worse?).

    U counts the (image, calibration) pairs whose image score is larger, ties 1/2; under
    exchangeability E[U] = n m / 2, Var[U] = n m / 12 (n + m + 1 - sum(t^3 - t) / ((n + m)(n + m - 1)))
    over the tie groups t. `shifted` is True when the p-value is below `level`; `direction` says which
    way the scores moved.
    """
    if alternative not in ("two-sided", "greater"):
        raise ValueError(f"alternative must be 'two-sided' or 'greater', got {alternative!r}")
    calibration = torch.as_tensor(calibration_scores, dtype=torch.float64)
    scores = torch.as_tensor(scores, dtype=torch.float64)
    n, m = len(calibration), len(scores)
    ranks = midranks(torch.cat([calibration, scores]))
    u = float(ranks[n:].sum()) - m * (m + 1) / 2
    ties = torch.unique(torch.cat([calibration, scores]), return_counts=True)[1].double()
    total = n + m
    correction = float((ties**3 - ties).sum()) / (total * (total - 1)) if total > 1 else 0.0
    variance = n * m / 12.0 * (total + 1 - correction)
    z = (u - n * m / 2) / math.sqrt(variance) if variance > 0 else 0.0
    one_sided = 0.5 * math.erfc(z / math.sqrt(2.0))
    pvalue = min(1.0, math.erfc(abs(z) / math.sqrt(2.0))) if alternative == "two-sided" else one_sided
    return {
        "test": f"{alternative} Mann-Whitney U of the images' scores against the calibration scores",
        "mean_pvalue": float(conformal_pvalues(calibration, scores).mean()) if m else float("nan"),
        "u": u,
        "z": z,
        "pvalue": pvalue,
        "direction": "larger" if z > 0 else "smaller" if z < 0 else "the same",
        "level": level,
        "shifted": pvalue < level,
        "n_calibration": n,
        "n_images": m,
    }


def conformity_shift(thresholds: dict, probs, labels, level: float) -> dict:
    """Do labelled images conform worse to their label than the calibration images did? The scores
    1 - probs[label] of the images against the calibration's (`thresholds["scores"]`, of
    calibration.conformal_thresholds), class by class for class-conditional sets: one-sided Mann-Whitney
    tests, Bonferroni over the classes. If they do, the images are not exchangeable with the
    calibration images and the coverage guarantee of the prediction sets does not hold for them:
    what happens when only the relation of images to labels moved, which no score of the images
    alone can see."""
    probs, labels = torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(labels).long()
    scores = 1.0 - probs.gather(1, labels[:, None])[:, 0]
    if thresholds["class_conditional"]:
        present = [y for y in range(thresholds["num_classes"]) if (labels == y).any()]
        tests = {str(y): shift_test(thresholds["scores"][y], scores[labels == y], level, "greater") for y in present}
    else:
        tests = {"all": shift_test(thresholds["scores"], scores, level, "greater")}
    pvalue = min(1.0, len(tests) * min((test["pvalue"] for test in tests.values()), default=1.0))
    return {"pvalue": pvalue, "level": level, "shifted": pvalue < level,
            "per_class_pvalue": {key: test["pvalue"] for key, test in tests.items()}}  # fmt: skip


def detection_report(in_distribution, shifted, tpr: float = TRUE_POSITIVE_RATE) -> dict:
    """How well a score tells shifted images (positives) from in-distribution ones: AUROC (ties 1/2)
    and the false-positive rate at the threshold that flags `tpr` of the shifted images."""
    inside = torch.as_tensor(in_distribution, dtype=torch.float64)
    outside = torch.as_tensor(shifted, dtype=torch.float64)
    threshold = torch.quantile(outside, 1.0 - tpr, interpolation="lower")  # flags >= tpr of them
    scores = torch.cat([inside, outside])
    positives = torch.cat([torch.zeros(len(inside)), torch.ones(len(outside))])
    return {"auroc": auroc(scores, positives), "fpr_at_95_tpr": float((inside >= threshold).double().mean())}


def calibrate_refusal(outputs: dict, score: str, alpha: float, level: float, bins: int) -> dict:
    """calibration.json's `out_of_distribution` block from per-image validation outputs."""
    ids = outputs["id"]
    reference = reference_half(ids) if score in NEEDS_PROFILE else torch.zeros(len(ids), dtype=torch.bool)
    profile = None
    if score in NEEDS_PROFILE:
        profile = TimeProfile.fit(outputs["step_errors"][reference], outputs["step_times"][reference], bins)
    calibration = {key: value[~reference] for key, value in outputs.items() if isinstance(value, Tensor)}
    scores = ood_score(score, calibration, profile)
    n, needed = len(scores), min_calibration_images(alpha)
    return {
        "score": score,
        "alpha": alpha,
        "shift_level": level,
        "n_reference": int(reference.sum()),
        "n_calibration": n,
        "profile": profile.as_dict() if profile else None,
        "calibration_scores": scores.tolist(),
        "calibration_bands": band_offsets(calibration, profile).tolist() if profile else None,
        "threshold": refusal_threshold(scores, alpha),
        "feasible": n >= needed,
        "reason": None
        if n >= needed
        else f"ood_alpha={alpha} needs at least {needed} calibration images, got {n}: no image can be refused",
    }


def apply_refusal(block: dict, outputs: dict) -> dict[str, Tensor]:
    """Per-image `ood_score`, `ood_pvalue` and `out_of_distribution` (p < alpha) of new outputs, and with a time
    profile `ood_bands`, the error-profile offsets the whole-set check compares."""
    profile = TimeProfile(**block["profile"]) if block.get("profile") else None
    scores = ood_score(block["score"], outputs, profile)
    pvalues = conformal_pvalues(block["calibration_scores"], scores)
    found = {"ood_score": scores, "ood_pvalue": pvalues, "out_of_distribution": pvalues < block["alpha"]}
    return found | ({"ood_bands": band_offsets(outputs, profile)} if profile else {})


def refusal_metrics(block: dict, decisions: dict) -> dict:
    """metrics.json's `out_of_distribution` block: the rule, whether it was on, and how many images it refused."""
    refused = decisions["out_of_distribution"]
    keep = ("score", "alpha", "threshold", "n_reference", "n_calibration", "feasible", "reason")
    return {key: block[key] for key in keep} | {
        "n_images": len(refused),
        "n_refused": int(refused.sum()) if block["feasible"] else None,
        "refused_fraction": float(refused.double().mean()) if block["feasible"] else None,
    }


def conformity_message(conformity: dict, class_names: list[str]) -> str:
    """The one line a test run prints when its labelled images conform worse than the calibration images."""
    worst = min(conformity["per_class_pvalue"].items(), key=lambda item: item[1])
    name = class_names[int(worst[0])] if worst[0].isdigit() else "all"
    return (
        f"these images conform worse to their labels than the calibration images (class {name}: one-sided "
        f"Mann-Whitney p = {worst[1]:.2g}; Bonferroni over the classes {conformity['pvalue']:.2g} < "
        f"{conformity['level']}): the prediction sets' coverage guarantee does not hold for this set"
    )
