"""What a finished run found, for the terminal: the newest test results and explanations under a run folder.

    python -m tools.summary runs/demo [--seconds 312]

prints accuracy, F1, AUROC, N and (if given) the wall time of the newest metrics.json under the
folder; what the decision rules calibrated by `validate` did on the test images (refusals of images
unlike the training data, referral, prediction sets); if the run was explained (`predict ...
--model.init_args.explain true`), where the explanation pictures are and their faithfulness numbers;
and where the reports (report.html of the test and of the newest predict run) are.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from decisions.calibration import OOD_BLOCK, RULES_BLOCK, SHIFT_BLOCK, off_lines
from diffusion.voting import VOTE_RULES
from experiment.pretrained import CARD_FILE
from experiment.run_folders import EXPORT_DIR
from experiment.user_errors import tool_main
from reports.explanations import EXPLAIN_FILE, EXPLANATIONS_DIR
from reports.report import REPORT_FILE
from reports.results import newest_metrics

EXPLANATION_NUMBERS = (
    "flip_rate",
    "factual_kept_rate",
    "factual_closer_rate",
    "l2_input_factual",
    "l2_input_counterfactual",
    "concentration_ratio",
)


def summary_table(metrics: dict, seconds: float | None = None) -> str:
    rows = [
        ("accuracy", f"{metrics['accuracy']:.3f}"),
        ("F1 (macro)", f"{metrics['f1']:.3f}"),
        ("AUROC", f"{metrics.get('auroc', math.nan):.3f}"),
    ]
    if "n_steps" in metrics:  # a diffusion classifier
        rows += [
            *((f"{rule} rule accuracy", f"{metrics.get(f'{rule}_accuracy', math.nan):.3f}") for rule in VOTE_RULES),
            ("test images", str(metrics["n_images"])),
            ("N (eps, t) steps", str(metrics["n_steps"])),
            ("rule", str(metrics.get("rule", "majority"))),
        ]
    else:
        rows += [("ECE", f"{metrics.get('ece', math.nan):.3f}"), ("test images", str(metrics["n_images"]))]
    if seconds is not None:
        rows.append(("seconds (fit, validate, test)", f"{seconds:.0f}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def decisions_summary(metrics: dict) -> str | None:
    """What the calibrated rules did on the test images, each rule that was OFF and why; None for a run written
    before rules were reported."""
    if RULES_BLOCK not in metrics:
        return None
    n, rows, rules = metrics["n_images"], [], metrics[RULES_BLOCK]
    rows += [("OFF", line) for line in off_lines(rules)]
    refusal = metrics.get(OOD_BLOCK)
    if refusal and rules["refusal"]["on"]:
        rows.append(("refused: unlike the training data", f"{refusal['n_refused']} of {n} "
                     f"(p < {refusal['alpha']}, {refusal['score']} score)"))  # fmt: skip
    shift = metrics.get(SHIFT_BLOCK)
    if shift:
        verdict = (f"NOT like it ({', '.join(shift['fired'])}): the guarantees do not hold" if shift["shifted"]
                   else "no check fired")  # fmt: skip
        rows.append(("the test set vs validation", f"{verdict} (Bonferroni p = {shift['pvalue']:.2g})"))
    if rules["referral"]["on"]:
        referral, test = metrics["selective"], metrics["selective"]["test"]
        accuracy = f"; accuracy on the answered {test['accuracy']:.3f}" if test["n_accepted"] else ""
        rows.append(
            ("referred to a human", f"{test['n_referred']} of {n}{accuracy} (target {referral['target_accuracy']})")
        )
    sets = metrics.get("conformal", {}).get("class_conditional", {}).get("test", {})
    if rules["prediction_sets"]["on"] and "coverage" in sets:
        promised = 1 - metrics["conformal"]["alpha"]
        rows.append(("prediction sets", f"hold the label for {sets['coverage']:.1%} of the answered (promised >= "
                     f"{promised:.0%}), mean size {sets['mean_set_size']:.2f}"))  # fmt: skip
    conformity = sets.get("exchangeability")
    if conformity:
        verdict = "WORSE: the coverage promise does not hold" if conformity["shifted"] else "as on validation"
        rows.append(("labels vs images", f"{verdict} (Mann-Whitney p = {conformity['pvalue']:.2g})"))
    width = max(len(name) for name, _ in rows)
    return "Decisions calibrated on the validation split:\n" + "\n".join(f"  {a:<{width}}  {b}" for a, b in rows)


def reports(run_dir: str | Path) -> list[Path]:
    """The newest test report and the newest report of a predict run under `run_dir`."""
    found = sorted(Path(run_dir).rglob(REPORT_FILE), key=lambda path: path.stat().st_mtime)
    tested = [path for path in found if (path.parent / "metrics.json").is_file()]
    predicted = [path for path in found if not (path.parent / "metrics.json").is_file()]
    return [group[-1] for group in (tested, predicted) if group]


def explanation_summary(run_dir: str | Path) -> str | None:
    """Where the newest explanations under `run_dir` are and their numbers; None if there are none."""
    found = sorted(Path(run_dir).rglob(EXPLAIN_FILE), key=lambda path: path.stat().st_mtime)
    if not found:
        return None
    numbers = json.loads(found[-1].read_text())
    folder = found[-1].parent / EXPLANATIONS_DIR
    settings = numbers["settings"]
    lines = [f"  {key:<24} {numbers[key]:.3f}" for key in EXPLANATION_NUMBERS if numbers.get(key) is not None]
    return (
        f"Explanations of {numbers['n_images']} images (t0 = {settings['t0']}, w = {settings['guidance_scale']}, "
        f"{settings['sampling_steps']} DDIM steps):\n"
        + "\n".join(lines)
        + f"\n  open {folder / 'summary.png'} (one row per image) and {folder}/image_<id>.png"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run's default_root_dir, e.g. runs/demo")
    parser.add_argument("--seconds", type=float, default=None, help="wall time to report beside the metrics")
    args = parser.parse_args(argv)
    path = newest_metrics(args.run_dir)
    metrics = json.loads(path.read_text())
    print(f"\nTest results ({path}):\n{summary_table(metrics, args.seconds)}\n")
    decisions = decisions_summary(metrics)
    if decisions:
        print(decisions + "\n")
    explanations = explanation_summary(args.run_dir)
    if explanations:
        print(explanations + "\n")
    for report in reports(args.run_dir):
        print(f"Report (open in a browser): {report}")
    exported = Path(args.run_dir) / EXPORT_DIR
    if (exported / CARD_FILE).is_file():
        print(f"Exported model (safetensors, config, calibration, model card): {exported}/")


if __name__ == "__main__":
    tool_main(main, "python -m tools.summary ...")
