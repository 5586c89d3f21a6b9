"""Uncertainty metrics and figures against hand-computed references on tiny tensors."""

import json
import math

import pytest
import torch
from matplotlib.figure import Figure

from decisions.uncertainty import (
    FILTER_FRACTIONS,
    aurc,
    brier_score,
    classification_auroc,
    confusion_groups,
    error_detection_auroc,
    expected_calibration_error,
    filtered_accuracy,
    risk_coverage,
    uncertainty_report,
)
from reports.figures import plot_filtered_accuracy, plot_uncertainty_boxes

T = torch.tensor


def outcome(correct):
    """(predictions, labels) for a binary task with the given correctness pattern."""
    labels = torch.zeros(len(correct), dtype=torch.long)
    return (~T(correct, dtype=torch.bool)).long(), labels


# ---------------------------------------------------------------- filtered accuracy
def test_filter_fractions_and_keys():
    assert len(FILTER_FRACTIONS) == 11 and FILTER_FRACTIONS[0] == 0.0 and FILTER_FRACTIONS[-1] == 0.5
    preds, labels = outcome([1, 1, 1, 1])
    acc = filtered_accuracy(preds, labels, T([0.1, 0.2, 0.3, 0.4]))
    assert list(acc) == ["0.00", "0.05", "0.10", "0.15", "0.20", "0.25", "0.30", "0.35", "0.40", "0.45", "0.50"]


def test_filtered_accuracy_two_most_uncertain_wrong():
    # wrong: index 1 (u=0.9) and index 3 (u=0.8), the two most uncertain of N = 6
    preds, labels = outcome([1, 0, 1, 0, 1, 1])
    acc = filtered_accuracy(preds, labels, T([0.1, 0.9, 0.2, 0.8, 0.3, 0.4]))
    # n_drop = floor(f*6 + 1/2): f=0.05 -> 0, 0.10..0.20 -> 1, 0.25..0.50 -> 2 or 3
    assert acc["0.00"] == pytest.approx(4 / 6)
    assert acc["0.05"] == pytest.approx(4 / 6)
    for key in ("0.10", "0.15", "0.20"):
        assert acc[key] == pytest.approx(4 / 5)  # only u=0.9 dropped
    for key in ("0.25", "0.30", "0.35", "0.40", "0.45", "0.50"):
        assert acc[key] == 1.0  # both errors dropped


def test_filtered_accuracy_rounds_half_up():
    # 5 % of 10 images = 0.5 -> one image dropped (banker's round() would drop none)
    preds, labels = outcome([1] * 9 + [0])
    acc = filtered_accuracy(preds, labels, torch.arange(10.0), fractions=(0.0, 0.05))
    assert acc == {"0.00": pytest.approx(0.9), "0.05": 1.0}


def test_filtered_accuracy_tie_drops_higher_index_first():
    u = T([0.5, 0.5, 0.5, 0.5])
    # f = 0.25 of N = 4 drops one image; among equals the highest index (3) goes first
    preds, labels = outcome([1, 1, 1, 0])  # index 3 wrong -> dropped -> 3/3
    assert filtered_accuracy(preds, labels, u, fractions=(0.25,))["0.25"] == 1.0
    preds, labels = outcome([0, 1, 1, 1])  # index 0 wrong, index 3 (correct) dropped -> 2/3
    assert filtered_accuracy(preds, labels, u, fractions=(0.25,))["0.25"] == pytest.approx(2 / 3)


def test_filtered_accuracy_nothing_left_is_nan_and_bad_fraction_raises():
    preds, labels = outcome([1, 0])
    assert math.isnan(filtered_accuracy(preds, labels, T([0.1, 0.2]), fractions=(1.0,))["1.00"])
    with pytest.raises(ValueError):
        filtered_accuracy(preds, labels, T([0.1, 0.2]), fractions=(1.5,))


# ---------------------------------------------------------------- risk-coverage / AURC
def test_risk_coverage_and_aurc_by_hand():
    # ascending uncertainty: index 1 (0.1), 3 (0.2), 2 (0.3), 0 (0.4)
    # correctness in that order [1, 1, 0, 1] -> risks [0/1, 0/2, 1/3, 1/4]
    preds, labels = outcome([1, 1, 0, 1])
    u = T([0.4, 0.1, 0.3, 0.2])
    coverage, risk = risk_coverage(preds, labels, u)
    assert coverage.tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert risk.tolist() == pytest.approx([0.0, 0.0, 1 / 3, 1 / 4])
    assert aurc(preds, labels, u) == pytest.approx((0 + 0 + 1 / 3 + 1 / 4) / 4)  # = 7/48


def test_aurc_tie_rule():
    u = T([0.5, 0.5])
    # equal uncertainty: index 0 counts as more certain
    assert aurc(*outcome([0, 1]), u) == pytest.approx((1 / 1 + 1 / 2) / 2)
    assert aurc(*outcome([1, 0]), u) == pytest.approx((0 / 1 + 1 / 2) / 2)


# ---------------------------------------------------------------- error-detection AUROC
def test_error_detection_auroc_perfect_and_reversed():
    preds, labels = outcome([1, 1, 0, 0])
    assert error_detection_auroc(preds, labels, T([0.1, 0.2, 0.8, 0.9])) == pytest.approx(1.0)
    assert error_detection_auroc(preds, labels, T([0.9, 0.8, 0.2, 0.1])) == pytest.approx(0.0)


def test_error_detection_auroc_pairwise_by_hand():
    # errors u = {0.5, 0.2}; correct u = {0.5, 0.1, 0.3}
    # pairs (error, correct): (.5,.5)=1/2 (.5,.1)=1 (.5,.3)=1 (.2,.5)=0 (.2,.1)=1 (.2,.3)=0 -> 3.5/6
    preds, labels = outcome([0, 0, 1, 1, 1])
    u = T([0.5, 0.2, 0.5, 0.1, 0.3])
    assert error_detection_auroc(preds, labels, u) == pytest.approx(3.5 / 6)


def test_error_detection_auroc_large_scores_and_undefined():
    # scores far outside [0, 1] must not be squashed into ties (sigmoid(100) == sigmoid(200) in fp32)
    preds, labels = outcome([1, 0])
    assert error_detection_auroc(preds, labels, T([100.0, 200.0])) == pytest.approx(1.0)
    assert math.isnan(error_detection_auroc(*outcome([1, 1, 1]), T([0.1, 0.2, 0.3])))
    assert math.isnan(error_detection_auroc(*outcome([0, 0]), T([0.1, 0.2])))


# ---------------------------------------------------------------- ECE
def test_ece_two_bins_by_hand():
    # confidences 0.9, 0.9, 0.6, 0.6 with correctness 1, 0, 1, 1, 10 bins:
    # bin (0.8, 0.9]: acc 0.5, conf 0.9; bin (0.5, 0.6]: acc 1.0, conf 0.6
    # ECE = |0.5 - 0.9| * 2/4 + |1.0 - 0.6| * 2/4 = 0.2 + 0.2 = 0.4
    probs = T([[0.1, 0.9], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    labels = T([1, 0, 0, 1])
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.4)


def test_ece_perfectly_calibrated_is_zero():
    # four images at confidence 0.75, three correct -> acc 0.75 = conf
    probs = T([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, T([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-7)
    assert expected_calibration_error(T([[1.0, 0.0], [0.0, 1.0]]), T([0, 1])) == pytest.approx(0.0)


def test_ece_bins_are_right_closed():
    # 0.6 (a vote fraction 6/10, stored in float32) shares the bin (0.5, 0.6] with 0.55:
    # acc 1/2, conf (0.6 + 0.55)/2 = 0.575 -> ECE = |0.5 - 0.575| = 0.075
    probs = T([[0.6, 0.4], [0.55, 0.45]])
    assert expected_calibration_error(probs, T([0, 1]), n_bins=10) == pytest.approx(0.075, abs=1e-6)
    # 1.0 shares (0.9, 1.0] with 0.95: acc 1/2, conf 0.975 -> ECE = 0.475
    probs = T([[1.0, 0.0], [0.95, 0.05]])
    assert expected_calibration_error(probs, T([1, 0]), n_bins=10) == pytest.approx(0.475, abs=1e-6)


def test_ece_uses_argmax_of_probs_and_matches_torchmetrics_off_edges():
    from torchmetrics.functional.classification import multiclass_calibration_error

    # three classes; argmax [0, 1, 2] vs labels [0, 1, 0]; confidences 0.5, 0.7, 0.4 (15 bins, all apart)
    # ECE = (|1 - .5| + |1 - .7| + |0 - .4|) / 3 = 1.2 / 3
    probs = T([[0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])
    assert expected_calibration_error(probs, T([0, 1, 0])) == pytest.approx(0.4, abs=1e-6)
    # consistency (not a reference): away from bin edges the definitions coincide
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(200, 3, generator=g), dim=1)
    labels = torch.randint(0, 3, (200,), generator=g)
    ref = multiclass_calibration_error(probs, labels, num_classes=3, n_bins=15, norm="l1")
    assert expected_calibration_error(probs, labels) == pytest.approx(float(ref), abs=1e-5)


# ---------------------------------------------------------------- Brier
def test_brier_by_hand():
    assert brier_score(T([[1.0, 0.0], [0.0, 1.0]]), T([0, 1])) == 0.0  # one-hot, right
    assert brier_score(T([[1.0, 0.0]]), T([1])) == 2.0  # (1-0)^2 + (0-1)^2
    # [0.7, 0.3] y=0: 0.09 + 0.09 = 0.18; [0.4, 0.6] y=0: 0.36 + 0.36 = 0.72 -> mean 0.45
    assert brier_score(T([[0.7, 0.3], [0.4, 0.6]]), T([0, 0])) == pytest.approx(0.45)
    # 3 classes [0.5, 0.3, 0.2] y=0: 0.25 + 0.09 + 0.04 = 0.38
    assert brier_score(T([[0.5, 0.3, 0.2]]), T([0])) == pytest.approx(0.38)


# ---------------------------------------------------------------- classification AUROC
def test_classification_auroc_binary_pairs():
    # p(class 1) = [0.8, 0.4, 0.6, 0.3], labels [1, 1, 0, 0]
    # (pos, neg) pairs: (.8,.6)=1 (.8,.3)=1 (.4,.6)=0 (.4,.3)=1 -> 3/4
    p1 = T([0.8, 0.4, 0.6, 0.3])
    probs = torch.stack([1 - p1, p1], dim=1)
    assert classification_auroc(probs, T([1, 1, 0, 0])) == pytest.approx(0.75)
    # a tie (.6, .6) counts 1/2: (.8,.6)=1 (.8,.3)=1 (.6,.6)=1/2 (.6,.3)=1 -> 3.5/4
    p1 = T([0.8, 0.6, 0.6, 0.3])
    probs = torch.stack([1 - p1, p1], dim=1)
    assert classification_auroc(probs, T([1, 1, 0, 0])) == pytest.approx(3.5 / 4)
    assert math.isnan(classification_auroc(probs, T([1, 1, 1, 1])))


def test_classification_auroc_multiclass_skips_absent_class():
    probs = T([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.65, 0.25, 0.1]])
    labels = T([0, 1, 0, 1])  # class 2 absent
    # class 0: pos {.7, .6} vs neg {.2, .65}: 1 + 1 + 1 + 0 -> 3/4
    # class 1: pos {.7, .25} vs neg {.2, .3}: 1 + 1 + 1 + 0 -> 3/4      macro = 0.75
    assert classification_auroc(probs, labels) == pytest.approx(0.75)


# ---------------------------------------------------------------- confusion groups
def test_confusion_groups_binary_and_multiclass():
    preds, labels = T([1, 0, 1, 0]), T([1, 0, 0, 1])
    g = confusion_groups(preds, labels)
    assert list(g) == ["TP", "TN", "FP", "FN"]
    assert g["TP"].tolist() == [True, False, False, False]
    assert g["TN"].tolist() == [False, True, False, False]
    assert g["FP"].tolist() == [False, False, True, False]
    assert g["FN"].tolist() == [False, False, False, True]
    g0 = confusion_groups(preds, labels, positive=0)
    assert g0["TP"].tolist() == g["TN"].tolist() and g0["FP"].tolist() == g["FN"].tolist()
    g3 = confusion_groups(T([0, 2, 1]), T([0, 1, 1]))
    assert g3["correct"].tolist() == [True, False, True] and g3["wrong"].tolist() == [False, True, False]
    assert set(confusion_groups(preds, labels, num_classes=3)) == {"correct", "wrong"}


# ---------------------------------------------------------------- report
def test_uncertainty_report_keys_and_json():
    probs = T([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels, preds = T([0, 1, 1, 0]), T([0, 1, 0, 1])
    u = T([0.1, 0.2, 0.9, 0.8])
    rep = uncertainty_report(probs, labels, preds, u)
    assert set(rep) == {"accuracy", "auroc", "ece", "brier", "aurc", "error_detection_auroc", "accuracy_filtered"}
    assert rep["accuracy"] == 0.5 and rep["error_detection_auroc"] == 1.0
    assert rep["accuracy_filtered"]["0.50"] == 1.0
    assert all(isinstance(v, float) for k, v in rep.items() if k != "accuracy_filtered")
    json.loads(json.dumps(rep))
    # all correct: error-detection AUROC undefined, still serialisable
    rep = uncertainty_report(probs, labels, labels, u)
    assert math.isnan(rep["error_detection_auroc"])
    json.dumps(rep)


# ---------------------------------------------------------------- figures
def test_plot_filtered_accuracy(tmp_path):
    curves = {
        "diffusion (vote entropy)": {"0.00": 0.7, "0.25": 0.8, "0.50": 0.9},
        "ResNet-18 (softmax entropy)": filtered_accuracy(*outcome([1, 0, 1, 1]), T([0.1, 0.9, 0.2, 0.3])),
    }
    path = tmp_path / "fig" / "filtered.png"
    fig = plot_filtered_accuracy(curves, path=path)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_title() == "Accuracy vs. uncertain images filtered out"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(curves)
    assert path.stat().st_size > 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_uncertainty_boxes_with_empty_group(tmp_path):
    preds, labels = T([1, 0, 0, 1, 0]), T([1, 0, 1, 1, 0])  # TP 2, TN 2, FP 0, FN 1
    path = tmp_path / "boxes.png"
    fig = plot_uncertainty_boxes(T([0.1, 0.2, 0.9, 0.3, 0.25]), preds, labels, path=path)
    assert isinstance(fig, Figure)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["TP\nn=2", "TN\nn=2", "FP\nn=0", "FN\nn=1"]
    assert fig.axes[0].get_ylabel() == "vote entropy"
    assert path.stat().st_size > 0
    fig3 = plot_uncertainty_boxes(T([0.1, 0.5, 0.2]), T([0, 2, 1]), T([0, 1, 1]), ylabel="entropy")
    assert [t.get_text() for t in fig3.axes[0].get_xticklabels()] == ["correct\nn=2", "wrong\nn=1"]
