"""The run's calibration: what `validate` fits on the validation split and writes to calibration.json
(referral threshold, conformal prediction sets, out-of-distribution refusal), and what test and predict
do with it: the decisions per image and the metrics.json blocks of what they achieved.

The rules themselves live in decisions/referral_and_sets.py (referral, conformal sets) and
decisions/refusal.py (refusal, exchangeability tests); this file wires them to a run's outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .ood_scores import BASELINE_SCORES, DIFFUSION_SCORES
from .referral_and_sets import (
    CONFORMAL_KINDS,
    apply_referral,
    check_referral_levels,
    conformal_report,
    conformal_thresholds,
    prediction_sets,
    referral_threshold,
    selective_report,
)
from .refusal import apply_refusal, calibrate_refusal, conformity_shift, refusal_metrics
from .set_shift import reference_outputs, set_shift


@dataclass
class CalibrationSettings:
    """The decision rules `validate` calibrates on the validation split; `model.init_args.calibration`."""

    target_accuracy: float | None = 0.95
    """Referral: the accuracy to certify on the accepted images (null to refer a fixed fraction instead)."""
    refer_fraction: float | None = None
    """Referral: the fraction of most uncertain images to refer (with target_accuracy: null)."""
    delta: float = 0.1
    """Referral: 1 - the confidence of the accuracy guarantee."""
    alpha: float = 0.1
    """Conformal prediction sets: the miscoverage; sets hold the true class with probability >= 1 - alpha."""
    ood_score: str | None = None
    """Out-of-distribution score (decisions/ood_scores.py): null = the model's default, typicality for
    diffusion classifiers (also excess_error, best_error), energy for the baselines (also msp, entropy)."""
    ood_alpha: float = 0.01
    """Refuse an image whose conformal p-value is below this: at most this fraction of images like the
    validation images is refused. Needs at least 1/ood_alpha calibration images (half the validation
    split for the typicality score)."""
    shift_level: float = 0.01
    """Level of the test that warns when a whole test or predict set is not like the validation images."""
    ood_bins: int = 32
    """Bins of t over which the typicality score's reference mean and spread of the log error are fitted."""

    def __post_init__(self):
        check_referral_levels(self.target_accuracy, self.refer_fraction, self.delta)
        for name in ("alpha", "ood_alpha", "shift_level"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"calibration.{name} must lie in (0, 1), got {getattr(self, name)}")
        if self.ood_score is not None and self.ood_score not in DIFFUSION_SCORES + BASELINE_SCORES:
            raise ValueError(
                f"calibration.ood_score={self.ood_score!r} is not one of {DIFFUSION_SCORES + BASELINE_SCORES}"
            )
        if self.ood_bins < 1:
            raise ValueError(f"calibration.ood_bins must be >= 1, got {self.ood_bins}")


def calibrate(outputs: dict, settings: CalibrationSettings, num_classes: int, ood_score: str) -> dict:
    """calibration.json from per-image validation outputs: the referral threshold and both kinds of
    conformal thresholds, with the calibration set's size and the finite-sample correction used, the
    out-of-distribution refusal of `ood_score` (decisions/refusal.py) and what the whole-set tests compare
    with (decisions/set_shift.py). A rule that cannot be calibrated is kept with `feasible: false` and
    the reason, so that every output of the runs that use it can say it was off."""
    if "label" not in outputs:
        raise ValueError("calibration needs labelled validation images")
    referral = referral_threshold(
        outputs["entropy"], outputs["prediction"], outputs["label"], settings.target_accuracy,
        settings.refer_fraction, settings.delta,
    )  # fmt: skip
    probs, labels = outputs["probs"], outputs["label"]
    conformal = {}
    for kind in CONFORMAL_KINDS:
        try:
            thresholds = conformal_thresholds(probs, labels, settings.alpha, kind == "class_conditional", num_classes)
            conformal[kind] = thresholds | {"feasible": True, "reason": None}
        except ValueError as reason:  # too few images (of a class) for alpha
            conformal[kind] = {"alpha": settings.alpha, "class_conditional": kind == "class_conditional",
                               "num_classes": num_classes, "feasible": False, "reason": str(reason)}  # fmt: skip
    refusal = calibrate_refusal(outputs, ood_score, settings.ood_alpha, settings.shift_level, settings.ood_bins)
    return {"n_calibration": len(outputs["label"]), "settings": asdict(settings), "referral": referral,
            "conformal": conformal, OOD_BLOCK: refusal, SHIFT_REFERENCE: reference_outputs(outputs)}  # fmt: skip


OOD_BLOCK = "out_of_distribution"  # calibration.json and metrics.json key; absent in runs calibrated before it
SHIFT_REFERENCE = "validation_outputs"  # calibration.json: what the whole-set tests compare a set with
SHIFT_BLOCK = "set_shift"  # metrics.json / decisions.json: the whole-set tests
RULES_BLOCK = "rules"  # metrics.json / decisions.json: each decision rule, on or OFF and why
RULE_NAMES = {"refusal": "refusal", "referral": "referral", "prediction_sets": "prediction sets",
              "prediction_sets_marginal": "marginal prediction sets", "set_shift": "whole-set shift check"}  # fmt: skip


def rule_status(calibration: dict | None, note: str | None = None) -> dict[str, dict]:
    """Each decision rule: {"on": bool, "reason": why it is OFF}. Without a calibration every rule is OFF,
    for the reason `note` gives (no calibration.json, or one for other weights or settings)."""
    if not calibration:
        reason = note or "no calibration of these weights"
        return {rule: {"on": False, "reason": reason} for rule in RULE_NAMES}
    refusal = calibration.get(OOD_BLOCK)
    old = "the calibration was written before this rule existed: run validate again"
    found = {
        "refusal": (refusal["feasible"], refusal["reason"]) if refusal else (False, old),
        "referral": (calibration["referral"]["feasible"], calibration["referral"]["reason"]),
        "prediction_sets": _conformal_status(calibration["conformal"]["class_conditional"]),
        "prediction_sets_marginal": _conformal_status(calibration["conformal"]["marginal"]),
        "set_shift": (True, None) if refusal and SHIFT_REFERENCE in calibration else (False, old),
    }
    return {rule: {"on": bool(on), "reason": None if on else reason} for rule, (on, reason) in found.items()}


def _conformal_status(thresholds: dict) -> tuple[bool, str | None]:
    return thresholds.get("feasible", True), thresholds.get("reason")


def calibration_lines(calibration: dict) -> dict[str, str]:
    """What `validate` set, one line per rule (a rule that is OFF: see off_lines)."""
    referral, sets, refusal = (
        calibration["referral"],
        calibration["conformal"]["class_conditional"],
        calibration[OOD_BLOCK],
    )
    profile = f" ({refusal['n_reference']} more fitted its time profile)" if refusal["n_reference"] else ""
    return {
        "referral": f"referral: refer when the uncertainty exceeds {referral['threshold']:.4g} (validation coverage "
        f"{referral['coverage']:.3f}, accuracy {referral['accuracy']:.3f})",
        "prediction_sets": f"prediction sets: class-conditional conformal at alpha {sets['alpha']}, thresholds "
        f"{[round(q, 4) for q in sets.get('q', [])]} ({sets.get('correction')})",
        "refusal": f"refusal: {refusal['score']} score, p < {refusal['alpha']} against {refusal['n_calibration']} "
        f"calibration images{profile}",
    }


def off_lines(rules: dict[str, dict]) -> list[str]:
    """One line per reason a rule of `rule_status` is off: "refusal OFF: <why>" (rules off for the same reason
    share a line: "refusal, referral, ... OFF: no calibration ..."); empty when every rule is on."""
    by_reason: dict[str, list[str]] = {}
    for rule, status in rules.items():
        if not status["on"]:
            by_reason.setdefault(status["reason"], []).append(RULE_NAMES[rule])
    return [f"{', '.join(names)} OFF: {reason}" for reason, names in by_reason.items()]


def rules_off(calibration: dict | None, note: str | None = None) -> list[str]:
    return off_lines(rule_status(calibration, note))


# what apply_calibration adds to each image's outputs
DECISION_KEYS = ("refer", "prediction_set", "prediction_set_marginal", "ood_score", "ood_pvalue", "out_of_distribution",
                 "ood_bands")  # fmt: skip


def apply_calibration(calibration: dict, outputs: dict) -> dict[str, Tensor]:
    """Per-image decisions of a calibration on new outputs: `refer` (B,) and the prediction sets (B, C)
    of both kinds (`prediction_set`: class-conditional, `prediction_set_marginal`); with an
    out-of-distribution block also `ood_score`, `ood_pvalue` and `out_of_distribution`. A refused
    image is always referred and gets no prediction set. A rule that is OFF decides as if it were not
    there (a set of every class, no refusal; referral OFF refers every image), and its column says "off"."""
    num_classes = outputs["probs"].shape[1]
    sets = {
        kind: prediction_sets(outputs["probs"], thresholds)
        if thresholds.get("feasible", True)
        else torch.ones(len(outputs["probs"]), num_classes, dtype=torch.bool)
        for kind, thresholds in calibration["conformal"].items()
    }
    decisions = {
        "refer": apply_referral(outputs["entropy"], calibration["referral"]["threshold"]),
        "prediction_set": sets["class_conditional"],
        "prediction_set_marginal": sets["marginal"],
    }
    if OOD_BLOCK in calibration:
        decisions |= apply_refusal(calibration[OOD_BLOCK], outputs)
        refused = decisions["out_of_distribution"]
        decisions["refer"] = decisions["refer"] | refused
        for key in ("prediction_set", "prediction_set_marginal"):
            decisions[key] = decisions[key] & ~refused[:, None]
    return decisions


def calibration_metrics(calibration: dict, decisions: dict, outputs: dict, class_names: list[str]) -> dict:
    """metrics.json's `out_of_distribution` and `set_shift` blocks (also without labels: predict), and with
    labels the `selective` and `conformal` blocks: the calibrated rules and what they achieved on these
    images, the prediction sets on the images not refused."""
    numbers = {}
    if OOD_BLOCK in calibration:
        numbers[OOD_BLOCK] = refusal_metrics(calibration[OOD_BLOCK], decisions)
        if SHIFT_REFERENCE in calibration:
            block = calibration[OOD_BLOCK]
            numbers[SHIFT_BLOCK] = set_shift(calibration[SHIFT_REFERENCE], block["calibration_scores"], outputs,
                                             decisions["ood_score"], block["shift_level"], class_names,
                                             block.get("calibration_bands"), decisions.get("ood_bands"))  # fmt: skip
    if "label" not in outputs:
        return numbers
    labels = outputs["label"]
    answered = ~decisions.get("out_of_distribution", torch.zeros(len(labels), dtype=torch.bool))
    selective = calibration["referral"] | {"test": selective_report(decisions["refer"], outputs["prediction"], labels)}
    conformal = {"alpha": calibration["settings"]["alpha"], "n_calibration": calibration["n_calibration"]}
    level = calibration["settings"].get("shift_level", 0.01)
    for kind, key in zip(CONFORMAL_KINDS, ("prediction_set_marginal", "prediction_set")):
        thresholds = calibration["conformal"][kind]
        if not thresholds.get("feasible", True):
            conformal[kind] = thresholds
            continue
        report = conformal_report(decisions[key][answered], labels[answered]) if answered.any() else {}
        if "scores" in thresholds:  # calibrations written before the check stored no scores
            report["exchangeability"] = conformity_shift(thresholds, outputs["probs"], labels, level)
        conformal[kind] = {k: v for k, v in thresholds.items() if k != "scores"} | {
            "test": report | {"n_refused": int((~answered).sum())}
        }
    return numbers | {"selective": selective, "conformal": conformal}
