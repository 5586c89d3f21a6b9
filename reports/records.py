"""One image's record, made in one place: predictions.csv's row, the report's gallery card and the summary of
tools.classify all read the one `ImageRecord` that `image_records` makes per image from the gathered outputs.

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

from dataclasses import dataclass

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


FLAGS = {"true": True, "false": False}


def flag(value) -> str:
    return str(bool(value)).lower()


def set_names(members: list[bool], class_names: list[str]) -> str:
    """A prediction set as its class names joined by "|" (empty when no class is in the set)."""
    return "|".join(name for name, inside in zip(class_names, members) if inside)


def off_columns(rules: dict | None) -> set[str]:
    """The predictions.csv columns of the decision rules that are OFF (decisions.rule_status)."""
    return {RULE_COLUMNS[rule] for rule, status in (rules or {}).items() if rule in RULE_COLUMNS and not status["on"]}


@dataclass(frozen=True)
class ImageRecord:
    """One image's outputs and decisions, typed (see the module docstring for the fields); made once per image,
    after the gather over processes and the removal of duplicates. `row` formats it as predictions.csv writes
    it; the report's card and tools.classify's summary read the fields themselves."""

    id: int
    leading: int  # the class the scores lead with
    probs: list[float]
    entropy: float
    entropy_normalized: float
    score: float
    path: str | None = None
    label: int | None = None
    votes: list[int] | None = None
    mean_error: list[float] | None = None
    forwards: int | None = None
    refer: bool | None = None  # None: no calibration applied (the decisions below likewise)
    prediction_set: list[bool] | None = None
    prediction_set_marginal: list[bool] | None = None
    ood_score: float | None = None
    ood_pvalue: float | None = None
    out_of_distribution: bool | None = None
    off: frozenset[str] = frozenset()  # the columns of the decision rules that are OFF

    @property
    def refused(self) -> bool:
        """Refused as out of distribution, by a refusal that is on: no answer is given."""
        return bool(self.out_of_distribution) and "out_of_distribution" not in self.off

    @property
    def prediction(self) -> int:
        return NO_ANSWER if self.refused else self.leading

    @property
    def referred(self) -> bool:
        return bool(self.refer) and "refer" not in self.off

    def row(self, class_names: list[str]) -> dict:
        """predictions.csv's row: the fields formatted, in the column order of the module docstring."""
        decided = lambda column, value: OFF if column in self.off else value  # noqa: E731
        row = {"id": self.id} | {key: getattr(self, key) for key in ("path", "label") if getattr(self, key) is not None}
        row |= {"prediction": self.prediction, "predicted_class": "" if self.refused else class_names[self.leading]}
        row |= {"leading_class": class_names[self.leading]} if self.out_of_distribution is not None else {}
        per_class = lambda prefix, values, formatted: {  # noqa: E731
            f"{prefix}_{name}": formatted(value) for name, value in zip(class_names, values)}  # fmt: skip
        row |= per_class("votes", self.votes, int) if self.votes is not None else {}
        row |= per_class("prob", self.probs, number)
        row |= {"entropy": number(self.entropy), "entropy_normalized": number(self.entropy_normalized)}
        row |= per_class("error", self.mean_error, number) if self.mean_error is not None else {}
        row["score"] = number(self.score)
        row |= {"forwards": self.forwards} if self.forwards is not None else {}
        if self.refer is not None:
            row["refer"] = decided("refer", flag(self.refer))
            for key in ("prediction_set", "prediction_set_marginal"):
                row[key] = decided(key, set_names(getattr(self, key), class_names))
        if self.out_of_distribution is not None:
            row |= {"ood_score": number(self.ood_score), "ood_pvalue": number(self.ood_pvalue)}
            row["out_of_distribution"] = decided("out_of_distribution", flag(self.out_of_distribution))
        return row


OPTIONAL_FIELDS = ("path", "label", "votes", "mean_error", "forwards", "refer", "prediction_set",
                   "prediction_set_marginal", "ood_score", "ood_pvalue", "out_of_distribution")  # fmt: skip


def read_predictions(path) -> tuple[list[ImageRecord], list[str]]:
    """predictions.csv of a finished run read back as records, and its class names: for the tools that compare
    runs (studies, Table 1), which have only the files. `ImageRecord.row` is its inverse (tests/test_records.py)."""
    import csv

    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    class_names = [key.removeprefix("prob_") for key in (rows[0] if rows else {}) if key.startswith("prob_")]
    return [record_of_row(row, class_names) for row in rows], class_names


def record_of_row(row: dict[str, str], class_names: list[str]) -> ImageRecord:
    """One predictions.csv row as its record (a column that says "off" comes back in `off`)."""
    per_class = lambda prefix, kind: [kind(row[f"{prefix}_{name}"]) for name in class_names]  # noqa: E731
    kinds = {"label": int, "forwards": int, "ood_score": float, "ood_pvalue": float, "refer": FLAGS.__getitem__,
             "out_of_distribution": FLAGS.__getitem__,
             "prediction_set": lambda value: [name in value.split("|") for name in class_names],
             "prediction_set_marginal": lambda value: [name in value.split("|") for name in class_names]}  # fmt: skip
    off = frozenset(key for key in RULE_COLUMNS.values() if row.get(key) == OFF)
    values = {key: kind(row[key]) if key not in off else kind_off(key, class_names)
              for key, kind in kinds.items() if key in row}  # fmt: skip
    answered = int(row["prediction"]) != NO_ANSWER
    return ImageRecord(
        id=int(row["id"]), leading=int(row["prediction"]) if answered else class_names.index(row["leading_class"]),
        probs=per_class("prob", float), entropy=float(row["entropy"]),
        entropy_normalized=float(row["entropy_normalized"]), score=float(row["score"]), path=row.get("path"),
        votes=per_class("votes", int) if f"votes_{class_names[0]}" in row else None,
        mean_error=per_class("error", float) if f"error_{class_names[0]}" in row else None, off=off, **values,
    )  # fmt: skip


def kind_off(key: str, class_names: list[str]):
    """The value an OFF rule's column holds in a record: present (so the column is written), decided nothing."""
    return [False] * len(class_names) if key.startswith("prediction_set") else False


def image_records(outputs: dict, rules: dict | None = None) -> list[ImageRecord]:
    """Every image's record from the gathered per-image outputs (one row per id); `rules`: decisions.rule_status."""
    off = frozenset(off_columns(rules))
    columns = {key: plain(outputs[key]) for key in OPTIONAL_FIELDS if key in outputs}
    fixed = {key: plain(outputs[key]) for key in ("id", "probs", "entropy", "entropy_normalized", "score")}
    leading = plain(outputs["prediction"])
    kinds = {"refer": bool, "out_of_distribution": bool, "label": int, "forwards": int}
    records = []
    for i in range(len(leading)):
        values = {key: column[i] for key, column in columns.items()}
        values |= {key: kinds[key](value) for key, value in values.items() if key in kinds}
        values |= {key: [bool(member) for member in value] for key, value in values.items()
                   if key.startswith("prediction_set")}  # fmt: skip
        records.append(ImageRecord(leading=int(leading[i]), off=off, **{key: fixed[key][i] for key in fixed}, **values))
    return records


def from_every_rank(mine, trainer) -> list:
    """[every process's `mine`] under DDP (all_gather_object: call it on every rank), [mine] in one process."""
    if trainer is None or trainer.world_size <= 1:
        return [mine]
    parts = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, mine)
    return parts
