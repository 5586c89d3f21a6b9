"""One image's record, made in one place: predictions.csv's row, the report's gallery card and the summary of
tools.classify all read the fields `image_record` makes from an image's per-image outputs.

The fields, in predictions.csv's column order (a field a model or the data does not have is left out):

    id, path, label                  the image (label: the class index, when the data has labels)
    prediction, predicted_class      the answer: the class index and name; -1 and empty when the image is
                                     refused as out of distribution (no answer is given for it)
    leading_class                    the class the model's scores lead with, refused or not (for audit only;
                                     with the out-of-distribution rule only)
    votes_<class>                    the diffusion classifier's votes per class
    prob_<class>                     the class probabilities of the vote rule (or the softmax)
    entropy, entropy_normalized      their Shannon entropy (nats; / log C): the uncertainty
    error_<class>                    the diffusion classifier's mean reconstruction error per class
    score                            probability of class 1 with two classes (ROC), of the winner with more
    forwards                         network forwards used (diffusion; early exit uses fewer)
    refer, prediction_set(_marginal) the calibrated referral and conformal sets ("off" when that rule is OFF)
    ood_score, ood_pvalue, out_of_distribution   the refusal ("off" in its column when the rule is OFF)
"""

from __future__ import annotations

import torch
from torch import Tensor

NO_ANSWER = -1  # the prediction of an image refused as out of distribution
OFF = "off"  # the value in the column of a decision rule that is OFF
RULE_COLUMNS = {
    "referral": "refer",
    "prediction_sets": "prediction_set",
    "prediction_sets_marginal": "prediction_set_marginal",
    "refusal": "out_of_distribution",
}


def plain(value):
    """Tensors, tuples and containers as plain Python values (numbers, strings, lists)."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def number(value) -> str:
    return f"{float(value):.6g}"


def flag(value) -> str:
    return str(bool(value)).lower()


def set_names(members: Tensor, class_names: list[str]) -> str:
    """A prediction set as its class names joined by "|" (empty when no class is in the set)."""
    return "|".join(name for name, inside in zip(class_names, members.tolist()) if inside)


def off_columns(rules: dict | None) -> set[str]:
    """The predictions.csv columns of the decision rules that are OFF (decisions.rule_status)."""
    return {RULE_COLUMNS[rule] for rule, status in (rules or {}).items() if rule in RULE_COLUMNS and not status["on"]}


def image_record(outputs: dict, i: int, class_names: list[str], rules: dict | None = None) -> dict:
    """Image i's fields (see the module docstring), formatted as predictions.csv writes them."""
    has, off = outputs.__contains__, off_columns(rules)
    decided = lambda column, value: OFF if column in off else value  # noqa: E731
    leading = int(outputs["prediction"][i])
    refused = (
        has("out_of_distribution") and "out_of_distribution" not in off and bool(outputs["out_of_distribution"][i])
    )
    record = {"id": int(outputs["id"][i])} | {key: plain(outputs[key][i]) for key in ("path", "label") if has(key)}
    record |= {"prediction": NO_ANSWER, "predicted_class": ""} if refused else {
        "prediction": leading, "predicted_class": class_names[leading]}  # fmt: skip
    record |= {"leading_class": class_names[leading]} if has("out_of_distribution") else {}
    per_class = lambda prefix, key, formatted: {  # noqa: E731
        f"{prefix}_{name}": formatted(value) for name, value in zip(class_names, outputs[key][i].tolist())}  # fmt: skip
    record |= per_class("votes", "votes", int) if has("votes") else {}
    record |= per_class("prob", "probs", number)
    record |= {key: number(outputs[key][i]) for key in ("entropy", "entropy_normalized")}
    record |= per_class("error", "mean_error", number) if has("mean_error") else {}
    record["score"] = number(outputs["score"][i])
    record |= {"forwards": int(outputs["forwards"][i])} if has("forwards") else {}
    if has("refer"):
        record["refer"] = decided("refer", flag(outputs["refer"][i]))
        for key in ("prediction_set", "prediction_set_marginal"):
            record[key] = decided(key, set_names(outputs[key][i], class_names))
    if has("out_of_distribution"):
        record |= {key: number(outputs[key][i]) for key in ("ood_score", "ood_pvalue")}
        record["out_of_distribution"] = decided("out_of_distribution", flag(outputs["out_of_distribution"][i]))
    return record


def from_every_rank(mine, trainer) -> list:
    """[every process's `mine`] under DDP (all_gather_object: call it on every rank), [mine] in one process."""
    if trainer is None or trainer.world_size <= 1:
        return [mine]
    parts = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, mine)
    return parts
