"""One image's record (reports/records.py): made once from the gathered outputs, written as predictions.csv's
row, and read back from that row as the same record, for the tools that have only the files."""

from __future__ import annotations

import csv

import torch

from reports import records
from reports.results import write_predictions

CLASSES = ["no_finding", "pleural_effusion"]


def outputs_with_every_field() -> dict:
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.55, 0.45]])
    return {
        "id": torch.tensor([4, 7, 9]), "path": ["a.png", "b|c.png", "d.png"], "label": torch.tensor([0, 1, 1]),
        "prediction": probs.argmax(1), "probs": probs, "votes": torch.tensor([[9, 1], [2, 8], [6, 4]]),
        "entropy": torch.tensor([0.3, 0.5, 0.69]), "entropy_normalized": torch.tensor([0.4, 0.7, 0.99]),
        "mean_error": torch.tensor([[0.1, 0.2], [0.3, 0.1], [0.2, 0.21]]), "score": probs[:, 1],
        "forwards": torch.tensor([20, 20, 12]), "refer": torch.tensor([False, False, True]),
        "prediction_set": torch.tensor([[True, False], [False, True], [True, True]]),
        "prediction_set_marginal": torch.tensor([[True, False], [False, True], [False, False]]),
        "ood_score": torch.tensor([1.0, 5.0, 2.0]), "ood_pvalue": torch.tensor([0.5, 0.004, 0.2]),
        "out_of_distribution": torch.tensor([False, True, False]),
    }  # fmt: skip


def test_a_refused_image_has_no_answer_but_keeps_its_leading_class():
    rules = {"refusal": {"on": True}, "referral": {"on": True}}
    refused = records.image_records(outputs_with_every_field(), rules)[1]
    assert refused.refused and refused.prediction == records.NO_ANSWER and refused.leading == 1
    row = refused.row(CLASSES)
    assert row["prediction"] == -1 and row["predicted_class"] == "" and row["leading_class"] == "pleural_effusion"


def test_a_rule_that_is_off_says_off_and_decides_nothing():
    rules = {"refusal": {"on": False}, "referral": {"on": False}, "prediction_sets": {"on": True}}
    record = records.image_records(outputs_with_every_field(), rules)[1]
    assert not record.refused and record.prediction == 1 and not record.referred
    row = record.row(CLASSES)
    assert row["out_of_distribution"] == "off" and row["refer"] == "off" and row["prediction_set"] == "pleural_effusion"


def test_predictions_csv_reads_back_as_the_records_that_wrote_it(tmp_path):
    """record -> row -> file -> record -> row: the same rows, whichever rules are on or OFF."""
    for rules in ({"refusal": {"on": True}}, {"refusal": {"on": False}, "prediction_sets_marginal": {"on": False}}):
        made = records.image_records(outputs_with_every_field(), rules)
        path = write_predictions(tmp_path / "predictions.csv", made, CLASSES)
        read, class_names = records.read_predictions(path)
        assert class_names == CLASSES
        assert [stringified(record.row(CLASSES)) for record in read] == [stringified(r.row(CLASSES)) for r in made]
        assert [record.refused for record in read] == [record.refused for record in made]
        with path.open() as handle:
            assert [row["id"] for row in csv.DictReader(handle)] == ["4", "7", "9"]


def stringified(row: dict) -> dict:
    """A row as the CSV file holds it."""
    return {key: str(value) for key, value in row.items()}
