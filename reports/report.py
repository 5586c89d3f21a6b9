"""report.html: the page a person reads after every test and predict run, one self-contained file.

It says what the numbers mean, what the calibrated decision rules (refusal, referral, prediction
sets) did on these images, shows the figures (filtering curve, risk-coverage, reliability diagram,
confusion matrix, out-of-distribution scores) and the images to look at (reports/gallery.py), each
with its votes and, where the run explained it, its factual / counterfactual / difference map. Every
figure and image is embedded as a data URI, so the page opens from disk with no server and no network.
Rendered with Jinja2 (autoescaped) from templates/report.html.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import jinja2
import numpy as np
from PIL import Image

from decisions.calibration import OOD_BLOCK, RULES_BLOCK, SHIFT_BLOCK, off_lines
from decisions.refusal import conformity_message
from decisions.set_shift import describe_test, shift_message

from .records import ImageRecord

REPORT_FILE = "report.html"
TEMPLATES = Path(__file__).parent / "templates"
EXPLANATIONS_DIR = "explanations"
HEADLINES = (  # metrics.json key, name, what it means
    ("accuracy", "Accuracy", "share of the images whose leading class is their label, refused ones included"),
    ("accuracy_answered", "Accuracy of the answers", "the same on the images not refused: the answers given"),
    ("auroc", "AUROC", "how well the score ranks positives above negatives: 1 perfect, 0.5 chance"),
    ("f1", "F1 (macro)", "harmonic mean of precision and recall, averaged over the classes"),
    ("ece", "Calibration error (ECE)", "mean gap between confidence and accuracy over 15 bins; 0 = calibrated"),
    ("error_detection_auroc", "Error detection (AUROC)",
     "how well the uncertainty finds the wrong answers: 1 = every error more uncertain than every right one"),
    ("aurc", "AURC", "area under the risk-coverage curve: the mean error rate when the most certain are kept"),
    ("brier", "Brier score", "squared distance of the class probabilities from the label, 0 to 2; lower is better"),
    ("n_images", "Images", "images in this run, each counted once"),
    ("n_refused", "Refused", "images refused as unlike the calibration images: no answer, neither right nor wrong"),
)  # fmt: skip


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def array_uri(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return data_uri(buffer.getvalue())


def prediction_cards(outputs: dict, class_names: list[str]) -> list[dict]:
    """A predict run's cards (no labels, no metrics): how many images, refused, referred, and per class."""
    n = len(outputs["id"])
    cards = [{"name": "Images", "value": str(n), "meaning": "images in this run, each counted once"}]
    answered = ~outputs["out_of_distribution"] if "out_of_distribution" in outputs else None
    if answered is not None:
        cards.append({"name": "Refused", "value": str(n - int(answered.sum())),
                      "meaning": "unlike the images the model was calibrated on: no answer"})  # fmt: skip
    if "refer" in outputs:
        referred = int((outputs["refer"] & (answered if answered is not None else True)).sum())
        cards.append({"name": "Referred", "value": str(referred),
                      "meaning": "answered, but too uncertain to act on without a human"})  # fmt: skip
    predictions = outputs["prediction"] if answered is None else outputs["prediction"][answered]
    for index, name in enumerate(class_names):
        cards.append({"name": f"Predicted {name}", "value": str(int((predictions == index).sum())),
                      "meaning": "answered images given this class"})  # fmt: skip
    return cards


def headline_cards(numbers: dict) -> list[dict]:
    cards = []
    undefined = numbers.get("undefined") or {}
    for key, name, meaning in HEADLINES:
        value = numbers.get(key)
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            cards.append({"name": name, "value": f"{value:.3f}" if isinstance(value, float) else str(value),
                          "meaning": meaning})  # fmt: skip
        elif key in undefined:  # metrics.json's null, with why
            cards.append({"name": name, "value": "undefined", "meaning": undefined[key]})
    return cards


def decision_rules(numbers: dict, outputs: dict, calibration: dict | None) -> list[dict]:
    """Rows of the decision table: how each rule was set on validation, what it did on these images; a rule
    that is OFF says so, and why, in both columns."""
    if not calibration:
        return []
    rules, n, status = [], len(outputs["id"]), numbers[RULES_BLOCK]
    off = lambda rule: f"OFF: {status[rule]['reason']}"  # noqa: E731
    refusal = calibration.get(OOD_BLOCK)
    if refusal and not status["refusal"]["on"]:
        rules.append({"name": "Refusal (out of distribution)", "setting": off("refusal"),
                      "outcome": f"no image was checked; all {n} were answered"})  # fmt: skip
    elif refusal:
        refused = int(outputs["out_of_distribution"].sum())
        rules.append({"name": "Refusal (out of distribution)",
                      "setting": f"{refusal['score']} score; refused when its conformal p-value against "
                                 f"{refusal['n_calibration']} validation images is below {refusal['alpha']} "
                                 f"(score above {refusal['threshold']:.4g}): at most {refusal['alpha']:.0%} of "
                                 "images like the validation images are refused",
                      "outcome": f"{refused} of {n} refused ({refused / n:.1%}); they get no answer"})  # fmt: skip
    referral = calibration["referral"]
    referred = int(outputs["refer"].sum())
    test = numbers.get("selective", {}).get("test")
    achieved = f"; accuracy on the accepted {test['accuracy']:.3f}" if test and test["n_accepted"] else ""
    if not status["referral"]["on"]:
        rules.append({"name": "Referral to a human", "setting": off("referral"),
                      "outcome": f"all {n} referred: no answer is certified"})  # fmt: skip
    else:
        rules.append({"name": "Referral to a human",
                      "setting": f"refer when the uncertainty exceeds {referral['threshold']:.4g}; on validation "
                                 f"{referral['coverage']:.1%} accepted at accuracy {referral['accuracy']:.3f}",
                      "outcome": f"{referred} of {n} referred, {n - referred} answered{achieved}"})  # fmt: skip
    if not status["prediction_sets"]["on"]:
        rules.append({"name": "Prediction sets", "setting": off("prediction_sets"), "outcome": "no sets"})
        return rules
    sets = outputs["prediction_set"].sum(dim=1).double()
    answered = ~outputs["out_of_distribution"] if "out_of_distribution" in outputs else sets >= 0
    conformal = numbers.get("conformal", {}).get("class_conditional", {}).get("test")
    coverage = f"; they hold the label for {conformal['coverage']:.1%}" if conformal and "coverage" in conformal else ""
    mean_size = float(sets[answered].mean()) if answered.any() else float("nan")
    rules.append({"name": "Prediction sets",
                  "setting": f"class-conditional split conformal at alpha {calibration['settings']['alpha']}: the "
                             f"set holds the true class with probability at least "
                             f"{1 - calibration['settings']['alpha']:.0%} within every class",
                  "outcome": f"mean size {mean_size:.2f} over the answered images, "
                             f"{int((sets[answered] == 1).sum())} single-class sets{coverage}"})  # fmt: skip
    return rules


def banners(numbers: dict, calibration: dict | None, class_names: list[str]) -> list[dict]:
    """The lines above everything else: each rule that is OFF and why, then what the whole-set checks found."""
    found = [{"kind": "warn", "text": line} for line in off_lines(numbers[RULES_BLOCK])]
    shift = numbers.get(SHIFT_BLOCK)
    if shift and shift["shifted"]:
        found.append({"kind": "warn", "text": sentence(shift_message(shift))})
    elif shift:
        checks = "; ".join(describe_test(name, test) for name, test in shift["tests"].items())
        found.append({"kind": "ok", "text": f"No whole-set check fired at level {shift['level']} ({checks}). They "
                      "compare this set with the validation images; a shift they cannot see is still possible "
                      "(see the README's section on what refusal and the warnings can and cannot see)."})  # fmt: skip
    conformity = numbers.get("conformal", {}).get("class_conditional", {}).get("test", {}).get("exchangeability")
    if conformity and conformity["shifted"]:
        found.append({"kind": "warn", "text": sentence(conformity_message(conformity, class_names))})
    return found


def sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


FIGURES = (  # the PNG files reports/results.py writes beside predictions.csv, in the report's order
    ("accuracy_filtered.png", "Accuracy after filtering out the most uncertain images (paper Fig. 3)"),
    ("risk_coverage.png", "Error rate among the images kept, most certain first; the star is the calibrated referral"),
    ("reliability.png", "Reliability: accuracy against confidence"),
    ("confusion_matrix.png", "Confusion matrix"),
    ("uncertainty_boxes.png", "Uncertainty of right and wrong answers (paper Fig. 9)"),
    ("ood_scores.png", "Out-of-distribution scores of these images against the calibration images"),
)


def figures(directory: Path) -> list[dict]:
    return [{"uri": data_uri((directory / file).read_bytes()), "caption": caption}
            for file, caption in FIGURES if (directory / file).is_file()]  # fmt: skip


def gallery_sections(gallery: dict, records: dict[int, ImageRecord], class_names: list[str], directory: Path,
                     has_labels: bool) -> list[dict]:  # fmt: skip
    titles = {"refused": ("Refused: unlike the training data", "No image was refused."),
              "wrong": ("Wrong, most confident first", "No image was wrong."),
              "uncertain": ("Most uncertain", "No images.")}  # fmt: skip
    sections = []
    for kind, candidates in gallery.items():
        if kind == "wrong" and not has_labels:
            continue
        title, empty = titles[kind]
        cards = [gallery_item(records[item["id"]], item["thumbnail"], class_names, directory) for item in candidates]
        sections.append({"title": title, "empty": empty, "cards": cards})
    return sections


def gallery_item(record: ImageRecord, thumbnail: np.ndarray, class_names: list[str], directory: Path) -> dict:
    """An image's card: its thumbnail and the fields of its record, with its explanation where predict wrote one."""
    tags = ["refused"] * record.refused
    tags += ["wrong"] * (record.label is not None and not record.refused and record.label != record.prediction)
    tags += ["referred"] * (record.referred and not record.refused)
    has_votes = record.votes is not None
    votes = [str(value) for value in record.votes] if has_votes else [f"{value:.3f}" for value in record.probs]
    explanation = directory / EXPLANATIONS_DIR / f"image_{record.id}.png"
    return {
        "id": record.id,
        "uri": array_uri(thumbnail),
        "name": Path(record.path).name if record.path else f"image id {record.id}",
        "tags": tags,
        "predicted": f"no answer (leading class {class_names[record.leading]})"
        if record.refused
        else class_names[record.leading],
        "label": class_names[record.label] if record.label is not None else None,
        "votes": [{"name": name, "value": value} for name, value in zip(class_names, votes)],
        "votes_name": "votes" if has_votes else "probabilities",
        "uncertainty": f"entropy {record.entropy:.3f}",
        "ood": f"out-of-distribution p-value {record.ood_pvalue:.3g}" if record.ood_pvalue is not None else None,
        "explanation": data_uri(explanation.read_bytes()) if explanation.is_file() else None,
    }


def write_report(directory: Path, stage: str, numbers: dict, outputs: dict, gallery: dict,
                 records: dict[int, ImageRecord], *, class_names: list[str], calibration: dict | None,
                 description: str, model_card: Path | None = None) -> Path:  # fmt: skip
    """Renders report.html into `directory` and returns its path; `model_card`: the card of an export of these
    weights, linked under the title."""
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
    page = environment.get_template(REPORT_FILE).render(
        title=f"{'Test' if stage == 'test' else 'Predictions'}: {len(outputs['id'])} images",
        subtitle=description,
        banners=banners(numbers, calibration, class_names),
        headlines=headline_cards(numbers) if stage == "test" else prediction_cards(outputs, class_names),
        rules=decision_rules(numbers, outputs, calibration),
        figures=figures(Path(directory)),
        gallery=gallery_sections(gallery, records, class_names, directory, "label" in outputs),
        has_metrics=stage == "test",
        directory=str(directory),
        model_card={"path": str(model_card), "uri": model_card.resolve().as_uri()} if model_card else None,
    )
    path = Path(directory) / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path
