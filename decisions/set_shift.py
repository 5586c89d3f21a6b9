"""Is a whole test or predict set like the validation images? Tests that see a second hospital.

One per-image score cannot see every shift: likelihood-style scores rank smoother or simpler
images from elsewhere as *more* typical (Nalisnick et al. 2019), and a new site often changes what
the classifier answers before it changes how unusual each image looks. So a set is compared with
the calibration images in three ways at once:

  ood_score          the set's out-of-distribution scores against the calibration half's scores:
                     two-sided Mann-Whitney (decisions/refusal.shift_test), since a set that scores
                     more typical than validation images is not exchangeable with them either;
  predicted_classes  the predicted-class counts against the validation images': a chi-square test of
                     homogeneity (black-box shift detection, Rabanser, Gunnemann & Lipton 2019,
                     "Failing loudly"); a change of the label mix also voids referral and marginal
                     coverage, which assume the validation mix;
  error_profile      (diffusion classifiers) the mean signed offset of the images' standardised log errors in 4 bands
                     of t (decisions/ood_scores.band_offsets) against the calibration half's: Hotelling's two-sample
                     T^2. A per-image score must see each image apart; a set's mean offset averages the noise of
                     100 images away, which is what another processing curve or burned-in text leaves;
  class_score_<c>    the distribution of the class scores (vote fractions of a diffusion classifier,
                     softmax of a baseline) against the validation images': two-sample Kolmogorov-Smirnov
                     per class (one class for two, whose scores sum to 1), as in "Failing loudly".

The set is flagged when any test's p-value is below level / m, m the number of tests (Bonferroni):
for a set exchangeable with the validation images, the chance of any flag is at most `level`. KS on
vote fractions, which take few values, is conservative (ties only lower its rejection rate), and so
is Yates' correction of the 2 x 2 chi-square. The tests come from scipy.stats.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from .refusal import shift_test


def class_score_columns(num_classes: int) -> list[int]:
    """The class-score columns tested: class 1 alone for two classes (the other is 1 minus it), else all."""
    return [1] if num_classes == 2 else list(range(num_classes))


def reference_outputs(outputs: dict) -> dict:
    """What calibration.json keeps of the validation images for these tests: predictions and class scores."""
    return {
        "prediction": outputs["prediction"].long().tolist(),
        "probs": [[round(float(p), 6) for p in row] for row in outputs["probs"].double()],
    }


def class_mix_test(reference: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict:
    """Chi-square test of homogeneity of the predicted-class counts of two sets (classes neither set predicts
    left out; with one class left there is nothing to compare and p = 1)."""
    table = np.stack([np.bincount(reference, minlength=num_classes), np.bincount(predictions, minlength=num_classes)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return {"pvalue": 1.0, "statistic": 0.0, "reference_counts": table[0].tolist(), "counts": table[1].tolist()}
    result = stats.chi2_contingency(table)
    return {"pvalue": float(result.pvalue), "statistic": float(result.statistic),
            "reference_counts": table[0].tolist(), "counts": table[1].tolist()}  # fmt: skip


def class_score_test(reference: np.ndarray, scores: np.ndarray) -> dict:
    result = stats.ks_2samp(reference, scores)
    return {"pvalue": float(result.pvalue), "statistic": float(result.statistic),
            "reference_mean": float(reference.mean()), "mean": float(scores.mean())}  # fmt: skip


def profile_testable(calibration_bands, bands) -> bool:
    """Hotelling's test needs more vectors than dimensions on each side (a pooled covariance of full rank) and
    finite values; a smaller set or calibration (a handful of images) is compared without it."""
    if calibration_bands is None or bands is None:
        return False
    reference, sample = np.asarray(calibration_bands, dtype=np.float64), torch.as_tensor(bands).double().numpy()
    if reference.ndim != 2 or min(len(reference), len(sample)) <= reference.shape[1]:
        return False
    return bool(np.isfinite(reference).all() and np.isfinite(sample).all())


def hotelling_test(reference, sample) -> dict:
    """Hotelling's two-sample T^2 with the pooled covariance: do two sets of vectors have the same mean? Under
    equal means and covariances (n + m - k - 1) / (k (n + m - 2)) T^2 follows F(k, n + m - k - 1); for k = 1 it is
    the pooled two-sample t-test squared. scipy has no Hotelling test: a few lines, checked against that t-test."""
    reference, sample = np.asarray(reference, dtype=np.float64), np.asarray(sample, dtype=np.float64)
    n, m, k = len(reference), len(sample), reference.shape[1]
    difference = sample.mean(axis=0) - reference.mean(axis=0)
    pooled = ((n - 1) * np.cov(reference, rowvar=False, ddof=1).reshape(k, k)
              + (m - 1) * np.cov(sample, rowvar=False, ddof=1).reshape(k, k)) / (n + m - 2)  # fmt: skip
    t2 = n * m / (n + m) * float(difference @ np.linalg.pinv(pooled) @ difference)
    f = (n + m - k - 1) / (k * (n + m - 2)) * t2
    return {"pvalue": float(stats.f.sf(f, k, n + m - k - 1)), "statistic": t2,
            "offset": difference.tolist(), "n_reference": n}  # fmt: skip


def set_shift(reference: dict, calibration_scores, outputs: dict, scores, level: float, class_names: list[str],
              calibration_bands=None, bands=None) -> dict:  # fmt: skip
    """metrics.json's whole-set block: every test's p-value, the Bonferroni decision and which tests fired.
    `reference`: reference_outputs of the validation images; `calibration_scores`: their OOD scores (the
    calibration half); `outputs`: the set's per-image `prediction` and `probs`; `scores`: its OOD scores;
    `calibration_bands`, `bands`: the error-profile offsets of both (diffusion classifiers; None: no such test)."""
    num_classes = len(class_names)
    ref_probs = np.asarray(reference["probs"], dtype=np.float64)
    probs = torch.as_tensor(outputs["probs"]).double().numpy()
    tests = {"ood_score": shift_test(calibration_scores, scores, level)}
    if profile_testable(calibration_bands, bands):
        tests["error_profile"] = hotelling_test(calibration_bands, torch.as_tensor(bands).double().numpy())
    tests["predicted_classes"] = class_mix_test(
        np.asarray(reference["prediction"]), torch.as_tensor(outputs["prediction"]).long().numpy(), num_classes
    )
    for column in class_score_columns(num_classes):
        tests[f"class_score_{class_names[column]}"] = class_score_test(ref_probs[:, column], probs[:, column])
    per_test_level = level / len(tests)
    fired = [name for name, test in tests.items() if test["pvalue"] < per_test_level]
    return {
        "level": level,
        "per_test_level": per_test_level,
        "correction": f"Bonferroni over {len(tests)} tests",
        "pvalue": min(1.0, len(tests) * min(test["pvalue"] for test in tests.values())),
        "shifted": bool(fired),
        "fired": fired,
        "n_images": len(probs),
        "n_reference": len(ref_probs),
        "tests": tests,
    }


def describe_test(name: str, test: dict) -> str:
    """One test of the block in a few words, for the warning line and the report."""
    if name == "ood_score":
        return f"out-of-distribution scores {test['direction']} (two-sided Mann-Whitney p = {test['pvalue']:.2g})"
    if name == "error_profile":
        offsets = ", ".join(f"{value:+.2f}" for value in test["offset"])
        return f"error-profile offsets by t-band {offsets} sd (Hotelling p = {test['pvalue']:.2g})"
    if name == "predicted_classes":
        return (f"predicted-class mix {test['counts']} vs {test['reference_counts']} on validation "
                f"(chi-square p = {test['pvalue']:.2g})")  # fmt: skip
    return (f"{name.removeprefix('class_score_')} scores mean {test['mean']:.3f} vs {test['reference_mean']:.3f} on "
            f"validation (Kolmogorov-Smirnov p = {test['pvalue']:.2g})")  # fmt: skip


def shift_message(block: dict) -> str | None:
    """The one line a run prints when its set is not like the validation images; None when no test fired."""
    if not block["shifted"]:
        return None
    reasons = "; ".join(describe_test(name, block["tests"][name]) for name in block["fired"])
    return (
        f"these {block['n_images']} images are not like the validation images ({reasons}; each below "
        f"{block['per_test_level']:.2g} = {block['level']} / {len(block['tests'])}): the referral, prediction-set "
        "and refusal guarantees do not hold for this set"
    )
