"""Referral thresholds and conformal sets calibrated on one split, checked by hand and by simulation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

from decisions.referral_and_sets import (
    CONFORMAL_CORRECTION,
    apply_referral,
    clopper_pearson_upper,
    conformal_report,
    conformal_thresholds,
    prediction_sets,
    referral_threshold,
    selective_report,
)
from reports.figures import plot_risk_coverage


def T(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def binomial_cdf(errors: int, n: int, p: float) -> float:
    """The textbook sum with math.comb, independent of the module's log-space CDF."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(errors + 1))


# ---------------------------------------------------------------- Clopper-Pearson
@pytest.mark.parametrize(("n", "confidence"), [(1, 0.9), (10, 0.95), (50, 0.99), (200, 0.9)])
def test_clopper_pearson_zero_errors_closed_form(n, confidence):
    # P(X <= 0) = (1 - p)^n = 1 - confidence  <=>  p = 1 - (1 - confidence)^(1/n)
    assert clopper_pearson_upper(0, n, confidence) == pytest.approx(1 - (1 - confidence) ** (1 / n), rel=1e-12)


@pytest.mark.parametrize(("errors", "n", "confidence"), [(1, 10, 0.95), (3, 20, 0.9), (30, 1000, 0.99)])
def test_clopper_pearson_solves_the_exact_cdf(errors, n, confidence):
    bound = clopper_pearson_upper(errors, n, confidence)
    assert errors / n < bound < 1
    assert binomial_cdf(errors, n, bound) == pytest.approx(1 - confidence, abs=1e-9)


def test_clopper_pearson_tabulated_value_edges_and_monotonicity():
    # 1 error in 10 at one-sided 95 %: (1-p)^10 + 10 p (1-p)^9 = 0.05 at p = 0.3942 (tables: 0.394)
    assert clopper_pearson_upper(1, 10, 0.95) == pytest.approx(0.39416, abs=1e-5)
    assert clopper_pearson_upper(0, 0, 0.95) == 1.0 and clopper_pearson_upper(7, 7, 0.95) == 1.0
    bounds = [clopper_pearson_upper(e, 20, 0.9) for e in range(21)]
    assert all(a < b for a, b in zip(bounds, bounds[1:-1])) and bounds[-1] == 1.0
    assert clopper_pearson_upper(2, 20, 0.8) < clopper_pearson_upper(2, 20, 0.9) < clopper_pearson_upper(2, 20, 0.99)
    for bad in [(3, 2, 0.9), (-1, 2, 0.9), (1, 2, 1.0), (1, 2, 0.0)]:
        with pytest.raises(ValueError):
            clopper_pearson_upper(*bad)


# ---------------------------------------------------------------- referral
# Ten calibration images in shuffled order; the wrong ones have u = 0.60 and u = 0.90.
# Sorted:  u       0.05 0.10 0.10 0.20 0.30 0.40 0.50 0.60 0.80 0.90
#          wrong      .    .    .    .    .    .    .    x    .    x
# Candidates: the m = 9 distinct values; accepted k and errors e per candidate:
#          k          1    3    4    5    6    7    8    9   10
#          e          0    0    0    0    0    0    1    1    2
U = T([0.30, 0.90, 0.10, 0.60, 0.05, 0.50, 0.10, 0.80, 0.20, 0.40])
WRONG = (U == 0.60) | (U == 0.90)
LABELS = torch.zeros(10, dtype=torch.long)
PREDS = WRONG.long()


def test_refer_fraction_by_hand_and_ties():
    # f = 0.3: round(3) = 3 referred, 7 accepted: the 7th smallest u = 0.50; errors both referred
    out = referral_threshold(U, PREDS, LABELS, refer_fraction=0.3)
    assert out["rule"] == "refer_fraction" and out["threshold"] == 0.50 and out["candidates"] == 1
    assert out["coverage"] == 0.7 and out["refer_fraction_realised"] == 0.3 and out["accuracy"] == 1.0
    assert out["risk_bound"] == pytest.approx(1 - 0.1 ** (1 / 7))  # e = 0 of k = 7 at 1 - delta = 0.9
    # f = 0.8: 8 referred, 2 accepted, the 2nd smallest u = 0.10; its tie (also 0.10) is accepted
    # too (accept iff u <= threshold), so only 7 are referred: the realised fraction says so
    out = referral_threshold(U, PREDS, LABELS, refer_fraction=0.8)
    assert out["threshold"] == 0.10 and out["coverage"] == 0.3 and out["refer_fraction_realised"] == 0.7
    # f = 0 refers nothing, at test time either; f = 1 refers everything
    assert referral_threshold(U, PREDS, LABELS, refer_fraction=0.0)["threshold"] == math.inf
    everything = referral_threshold(U, PREDS, LABELS, refer_fraction=1.0)
    assert everything["threshold"] == -math.inf and everything["coverage"] == 0.0 and math.isnan(everything["accuracy"])


def test_target_accuracy_by_hand():
    # delta = 0.09 over m = 9 candidates: each bound at confidence 1 - 0.01.
    # a = 0.5, risk r = 0.5. With e = 0 the bound is 1 - 0.01^(1/k): k = 7 -> 0.482 <= 0.5 qualifies,
    # k = 6 -> 0.536 does not. The candidates with errors: bound <= r iff P(Bin(k, r) <= e) <= 0.01:
    # k = 8, e = 1: 9/256 = 0.035; k = 9, e = 1: 10/512 = 0.020; k = 10, e = 2: 56/1024 = 0.055: none.
    # So the threshold is u = 0.50 (k = 7), coverage 0.7.
    out = referral_threshold(U, PREDS, LABELS, target_accuracy=0.5, delta=0.09)
    assert out["rule"] == "target_accuracy" and out["feasible"] and out["reason"] is None
    assert out["threshold"] == 0.50 and out["candidates"] == 9 and out["confidence"] == pytest.approx(0.99)
    assert out["coverage"] == 0.7 and out["accuracy"] == 1.0 and out["n_calibration"] == 10
    assert out["risk_bound"] == pytest.approx(1 - 0.01 ** (1 / 7), rel=1e-12)
    # a = 0.4, r = 0.6: the largest coverage wins even with an error accepted.
    # k = 10, e = 2: 0.4^10 + 10*0.6*0.4^9 + 45*0.36*0.4^8 = 0.01229 > 0.01: no;
    # k = 9,  e = 1: 0.4^9 + 9*0.6*0.4^8 = 0.00380 <= 0.01: yes -> threshold u = 0.80, accuracy 8/9.
    out = referral_threshold(U, PREDS, LABELS, target_accuracy=0.4, delta=0.09)
    assert out["threshold"] == 0.80 and out["coverage"] == 0.9 and out["accuracy"] == pytest.approx(8 / 9)
    assert out["risk_bound"] <= 0.6 and binomial_cdf(1, 9, out["risk_bound"]) == pytest.approx(0.01, abs=1e-9)


def test_infeasible_target_refers_everything():
    # a = 0.9 needs bound <= 0.1; the best e = 0 candidate, k = 7, reaches only 0.482
    out = referral_threshold(U, PREDS, LABELS, target_accuracy=0.9, delta=0.09)
    assert out["feasible"] is False and out["threshold"] == -math.inf
    assert "0.9" in out["reason"] and "every image is referred" in out["reason"]
    assert out["coverage"] == 0.0 and math.isnan(out["accuracy"]) and out["risk_bound"] == 1.0
    assert apply_referral(T([0.0, 0.5, 1e9]), out["threshold"]).all()


def test_exactly_one_rule_and_valid_levels():
    for kwargs in [{}, {"target_accuracy": 0.9, "refer_fraction": 0.1}]:
        with pytest.raises(ValueError, match="target_accuracy.*refer_fraction"):
            referral_threshold(U, PREDS, LABELS, **kwargs)
    for kwargs in [{"target_accuracy": 1.0}, {"refer_fraction": 1.5}, {"refer_fraction": 0.1, "delta": 0.0}]:
        with pytest.raises(ValueError):
            referral_threshold(U, PREDS, LABELS, **kwargs)
    with pytest.raises(ValueError, match="NaN"):
        referral_threshold(T([0.1, float("nan")]), PREDS[:2], LABELS[:2], refer_fraction=0.5)


def test_threshold_depends_on_calibration_only():
    fitted = referral_threshold(U, PREDS, LABELS, target_accuracy=0.5, delta=0.09)
    test_u, test_preds = T([0.2, 0.45, 0.55, 0.9, 0.1]), torch.tensor([0, 1, 0, 1, 1])
    reports = []
    for test_labels in (torch.tensor([0, 1, 0, 1, 1]), torch.tensor([1, 1, 0, 0, 0])):
        reports.append(selective_report(apply_referral(test_u, fitted["threshold"]), test_preds, test_labels))
        assert referral_threshold(U, PREDS, LABELS, target_accuracy=0.5, delta=0.09) == fitted
    # threshold 0.5 accepts test images 0, 1, 4 whatever their labels; only the accuracy moves
    assert reports[0]["n_accepted"] == reports[1]["n_accepted"] == 3 and reports[0]["n_referred"] == 2
    assert reports[0]["accuracy"] == 1.0 and reports[1]["accuracy"] == pytest.approx(1 / 3)
    # ... while the calibration labels do move it: an error at u = 0.05 leaves no e = 0 candidate
    flipped = LABELS.clone()
    flipped[U == 0.05] = 1
    assert referral_threshold(U, PREDS, flipped, target_accuracy=0.5, delta=0.09)["threshold"] != fitted["threshold"]


def test_apply_referral_and_selective_report():
    refer = apply_referral(T([0.1, 0.5, 0.7, float("nan")]), 0.5)
    assert refer.tolist() == [False, False, True, True]  # u == threshold accepted, NaN referred
    report = selective_report(refer, torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 1, 0]))
    assert report == {"coverage": 0.5, "accuracy": 0.5, "risk": 0.5, "n_accepted": 2, "n_referred": 2}
    nothing = selective_report(torch.ones(3, dtype=torch.bool), torch.zeros(3), torch.zeros(3))
    assert nothing["coverage"] == 0.0 and math.isnan(nothing["accuracy"]) and nothing["n_referred"] == 3


# ---------------------------------------------------------------- conformal, by hand
# Calibration, two classes: probs of class 1 and labels; score = 1 - probs[label].
#   p1      0.90 0.80 0.30 0.60 0.95 0.20 0.70
#   label      1    1    0    1    1    0    0
#   score   0.10 0.20 0.30 0.40 0.05 0.20 0.70
CAL_P1 = T([0.90, 0.80, 0.30, 0.60, 0.95, 0.20, 0.70])
CAL_PROBS = torch.stack([1 - CAL_P1, CAL_P1], 1)
CAL_LABELS = torch.tensor([1, 1, 0, 1, 1, 0, 0])
TEST_P1 = T([0.50, 0.65, 0.30, 0.75])
TEST_PROBS = torch.stack([1 - TEST_P1, TEST_P1], 1)
TEST_LABELS = torch.tensor([1, 1, 0, 0])


def test_marginal_conformal_by_hand():
    # alpha = 0.25, n = 7: rank ceil(8 * 0.75) = 6; sorted scores 0.05 0.10 0.20 0.20 0.30 0.40 0.70 -> q = 0.40
    th = conformal_thresholds(CAL_PROBS, CAL_LABELS, 0.25, class_conditional=False, num_classes=2)
    assert th["q"] == pytest.approx(0.40) and th["n"] == 7 and th["rank"] == 6
    assert th["correction"] == CONFORMAL_CORRECTION == "ceil((n+1)(1-alpha))-th smallest of n"
    # class y in the set iff probs[y] >= 0.6: sets {}, {1}, {0}, {1}; covered: no, yes, yes, no
    sets = prediction_sets(TEST_PROBS, th)
    assert sets.tolist() == [[False, False], [False, True], [True, False], [False, True]]
    report = conformal_report(sets, TEST_LABELS)
    assert report["coverage"] == 0.5 and report["coverage_per_class"] == [0.5, 0.5]
    assert report["mean_set_size"] == 0.75 and report["empty"] == 0.25 and report["singleton"] == 0.75
    # a score equal to q is in the set
    assert prediction_sets(T([[0.4, 0.6]]), th).tolist() == [[False, True]]


def test_class_conditional_conformal_by_hand():
    # class 0 scores 0.30 0.20 0.70 (n = 3): rank ceil(4 * 0.75) = 3 -> q0 = 0.70
    # class 1 scores 0.10 0.20 0.40 0.05 (n = 4): rank ceil(5 * 0.75) = 4 -> q1 = 0.40
    th = conformal_thresholds(CAL_PROBS, CAL_LABELS, 0.25, class_conditional=True, num_classes=2)
    assert th["q"] == pytest.approx([0.70, 0.40]) and th["n"] == [3, 4] and th["rank"] == [3, 4]
    # class 0 in iff p0 >= 0.3, class 1 iff p1 >= 0.6: sets {0}, {0, 1}, {0}, {1}
    sets = prediction_sets(TEST_PROBS, th)
    assert sets.tolist() == [[True, False], [True, True], [True, False], [False, True]]
    report = conformal_report(sets, TEST_LABELS)
    assert report["coverage"] == 0.5 and report["mean_set_size"] == 1.25
    assert report["empty"] == 0.0 and report["singleton"] == 0.75


def test_unsupported_level_is_refused():
    # alpha = 0.05 needs ceil(1/0.05) - 1 = 19 images: n = 19 gives rank 19 (the largest score), n = 10 refused
    probs = torch.full((19, 2), 0.5)
    labels = torch.zeros(19, dtype=torch.long)
    assert conformal_thresholds(probs, labels, 0.05, False, 2)["rank"] == 19
    with pytest.raises(ValueError, match=r"alpha=0\.05 needs at least 19 .*n=10"):
        conformal_thresholds(probs[:10], labels[:10], 0.05, False, 2)
    # class-conditional: alpha = 0.25 needs 3 per class; dropping one class-0 image leaves 2
    keep = torch.arange(7) != 2
    with pytest.raises(ValueError, match=r"alpha=0\.25 needs at least 3 calibration images of class 0, got n=2"):
        conformal_thresholds(CAL_PROBS[keep], CAL_LABELS[keep], 0.25, True, 2)
    with pytest.raises(ValueError, match="class 1"):  # an absent class is refused too
        conformal_thresholds(CAL_PROBS[CAL_LABELS == 0], CAL_LABELS[CAL_LABELS == 0], 0.25, True, 2)


# ---------------------------------------------------------------- conformal, by simulation
ALPHA, SPLITS, N_CAL, N_TEST, C = 0.1, 1000, 150, 450, 3


@pytest.fixture(scope="module")
def calibrated_model():
    """SPLITS independent (calibration, test) draws; labels are drawn from probs, so the model is calibrated.

    Softmax of Gaussian logits gives continuous scores (no ties), where split conformal's coverage
    has the exact mean rank / (n + 1), rank = ceil((n+1)(1-alpha)), inside [1 - alpha, 1 - alpha + 1/(n+1)].
    """
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(2.0 * torch.randn(SPLITS, N_CAL + N_TEST, C, generator=g, dtype=torch.float64), -1)
    labels = torch.multinomial(probs.view(-1, C), 1, generator=g).view(SPLITS, -1)
    return probs, labels


@pytest.mark.parametrize("class_conditional", [False, True])
def test_conformal_coverage_on_a_calibrated_model(calibrated_model, class_conditional):
    probs, labels = calibrated_model
    coverage, n = [], []
    for s in range(SPLITS):
        th = conformal_thresholds(probs[s, :N_CAL], labels[s, :N_CAL], ALPHA, class_conditional, C)
        report = conformal_report(prediction_sets(probs[s, N_CAL:], th), labels[s, N_CAL:])
        coverage.append(report["coverage_per_class"] if class_conditional else report["coverage"])
        n.append(th["n"])  # n_y per class, or n
    coverage, n = T(coverage), T(n)
    mean, slack = coverage.mean(0), 3 * coverage.std(0) / math.sqrt(SPLITS)  # 3 Monte-Carlo standard errors
    assert (mean >= 1 - ALPHA - slack).all(), (mean, slack)
    assert (mean <= (1 - ALPHA + 1 / (n + 1)).mean(0) + slack).all(), (mean, slack)
    # sharper: the exact mean, which an off-by-one rank (either way) misses by 2 to 10 standard errors
    exact = (torch.ceil((n + 1) * (1 - ALPHA) - 1e-9) / (n + 1)).mean(0)
    assert ((mean - exact).abs() <= 4 / 3 * slack).all(), (mean, exact, slack)


# ---------------------------------------------------------------- figure
def test_plot_risk_coverage(tmp_path):
    path = tmp_path / "fig" / "risk_coverage.png"
    fig = plot_risk_coverage(PREDS, LABELS, U, operating_point=(0.7, 0.0), path=path, title="calibrated")
    assert isinstance(fig, Figure) and fig.axes[0].get_title() == "calibrated"
    curve, point = fig.axes[0].get_lines()
    assert list(curve.get_xdata()) == pytest.approx([k / 10 for k in range(1, 11)])
    assert list(curve.get_ydata())[6:] == pytest.approx([0, 1 / 8, 1 / 9, 2 / 10])  # errors at ranks 8 and 10
    assert list(point.get_xdata()) == [0.7] and list(point.get_ydata()) == [0.0]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(plot_risk_coverage(PREDS, LABELS, U, operating_point=None).axes[0].get_lines()) == 1


# ---------------------------------------------------------------- through the CLI: validate, then test and predict
def test_validate_calibrates_the_run_and_test_and_predict_apply_it(tmp_path):
    import csv
    import json

    from cli import main
    from tests.helpers.runs import tiny_args

    # refer a fixed quarter: a target accuracy cannot be certified on 24 images (that rule would be OFF)
    settings = '{"target_accuracy": null, "refer_fraction": 0.25, "alpha": 0.2}'  # set together: each alone is refused
    args = tiny_args(tmp_path, "--data.init_args.num_val=24", f"--model.init_args.calibration={settings}")
    main(["fit", *args, "--trainer.max_steps=2"])
    assert main(["validate", *args, "--ckpt_path=last", "--trainer.limit_val_batches=1.0"])  # every image
    calibration = json.loads((tmp_path / "calibration.json").read_text())
    assert calibration["n_calibration"] == 24 and calibration["checkpoint"] == str(
        tmp_path / "checkpoints" / "last.ckpt"
    )
    assert calibration["conformal"]["marginal"]["n"] == 24 and calibration["settings"]["alpha"] == 0.2

    cli = main(["test", *args, "--ckpt_path=last"])
    folder = Path(cli.trainer.log_dir)
    metrics = json.loads((folder / "metrics.json").read_text())
    rows = list(csv.DictReader((folder / "predictions.csv").open()))
    refer = [row["refer"] == "true" for row in rows]
    accepted = [row for row, referred in zip(rows, refer) if not referred]
    assert metrics["selective"]["threshold"] == calibration["referral"]["threshold"]
    assert metrics["selective"]["test"]["coverage"] == pytest.approx(len(accepted) / len(rows))
    assert all(
        (float(r["entropy"]) > metrics["selective"]["threshold"]) == referred for r, referred in zip(rows, refer)
    )
    covered = [
        row["label"] in [str(CLASS_INDEX[name]) for name in row["prediction_set"].split("|") if name] for row in rows
    ]
    assert metrics["conformal"]["class_conditional"]["test"]["coverage"] == pytest.approx(sum(covered) / len(rows))
    assert (folder / "risk_coverage.png").is_file()

    cli = main(["predict", *args, "--ckpt_path=last"])
    predicted = list(csv.DictReader((Path(cli.trainer.log_dir) / "predictions.csv").open()))
    assert [row["prediction_set"] for row in predicted] == [row["prediction_set"] for row in rows]

    # a limit on validate's batches is not used (it calibrates on every image all the same), and a rule that
    # cannot be set for want of images is kept OFF with its reason while the others are set
    assert main(["validate", *args, "--ckpt_path=last", "--trainer.limit_val_batches=1", "--global_batch_size=2",
                 "--model.init_args.calibration.alpha=0.05"])  # fmt: skip
    calibration = json.loads((tmp_path / "calibration.json").read_text())
    assert calibration["n_calibration"] == 24
    sets = calibration["conformal"]["class_conditional"]
    assert not sets["feasible"] and "alpha=0.05 needs at least 19 calibration images of class" in sets["reason"]
    assert calibration["conformal"]["marginal"]["feasible"] and calibration["conformal"]["marginal"]["n"] == 24


CLASS_INDEX = {"no_finding": 0, "pleural_effusion": 1}
