"""Studies (tools/study.py, evaluation/studies.py): a study file is checked before anything runs; its runs are
ordinary run folders; a rerun repeats no finished run or stage; a failed run is listed with its log; the summary
has one row per run and Table 1 with intervals and paired tests against the reference."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.helpers.runs import tiny_args, tiny_baseline_args
from tools import study as study_tool

ROOT_OPTIONS = ("--config=", "--trainer.default_root_dir=")


def overrides(args: list[str]) -> list[str]:
    return [arg for arg in args if not arg.startswith(ROOT_OPTIONS)] + ["--trainer.max_steps=2"]


def write_study(folder: Path, **changes) -> Path:
    spec = {
        "name": "tiny",
        "root": str(folder / "runs"),
        "reference": "resnet",
        "seeds": [0],
        "experiments": {
            "unet": {"config": "configs/demo.yaml", "overrides": overrides(tiny_args("x"))},
            "resnet": {"config": "configs/baseline_demo.yaml", "overrides": overrides(tiny_baseline_args("x"))},
        },
    } | changes
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seedz": [0]}, "unknown key 'seedz' (did you mean 'seeds'?)"),
        ({"experiments": {"a": {"config": "configs/nope.yaml"}}}, "config 'configs/nope.yaml' does not exist"),
        ({"experiments": {"a": {"config": "configs/demo.yaml", "overide": []}}}, "did you mean 'overrides'?"),
        ({"folds": 1}, "folds must be an integer >= 2"),
        ({"reference": "vgg"}, "reference 'vgg' is not one of the experiments"),
    ],
)
def test_a_study_file_with_a_mistake_is_refused_before_anything_runs(tmp_path, capsys, change, message):
    assert study_tool.main([str(write_study(tmp_path, **change))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # 100 s: eight cli.py processes of tiny runs; make test stays under 9 minutes (make test-all runs it)
def test_a_study_runs_resumes_without_repeating_and_lists_a_failed_run(tmp_path, capsys):
    broken = write_study(tmp_path)
    spec = yaml.safe_load(broken.read_text())
    spec["experiments"]["resnet"]["overrides"].append("--model.init_args.backbone=no_such_net")
    broken.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert study_tool.main([str(broken)]) == 1  # the baseline fails: the study says so, the unet run is kept
    unet, resnet = tmp_path / "runs/tiny/unet/seed0", tmp_path / "runs/tiny/resnet/seed0"
    assert (unet / "study_run.json").is_file() and not (resnet / "study_run.json").is_file()
    table = (tmp_path / "runs/tiny/study.md").read_text()
    assert f"resnet seed 0: failed, log {resnet / 'study.log'}" in table
    unet_log = (unet / "study.log").read_text()

    # fixed and rerun: the finished run is skipped, the failed one runs; a killed run resumes after its last stage
    study_file = write_study(tmp_path)
    assert study_tool.main([str(study_file)]) == 0
    assert (unet / "study.log").read_text() == unet_log
    assert "unet/seed0: finished, skipped" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "runs/tiny/study.csv").open()))
    assert [(row["experiment"], row["status"]) for row in rows] == [("unet", "done"), ("resnet", "done")]
    assert all(float(row["accuracy_low"]) <= float(row["accuracy"]) <= float(row["accuracy_high"]) for row in rows)
    result = json.loads((tmp_path / "runs/tiny/study.json").read_text())
    (pair,) = result["paired"]["unet"]
    assert 0.0 <= pair["mcnemar"]["pvalue"] <= 1.0 and pair["n"] == 7
    assert (tmp_path / "runs/tiny/report.html").read_text().count("data:image/png;base64,") == 1

    (unet / "study_run.json").unlink()
    (unet / "study_stages.txt").write_text("fit\nvalidate\n")  # killed during test
    before = (unet / "study.log").read_text()
    assert study_tool.main([str(study_file), "--no-summary"]) == 0
    added = (unet / "study.log").read_text()[len(before) :]
    assert "cli.py test" in added and "cli.py fit" not in added and "cli.py validate" not in added


def test_the_slurm_array_has_one_task_a_run(tmp_path, capsys):
    study_file = write_study(tmp_path, seeds=[0, 1], folds=3)
    assert study_tool.main([str(study_file), "--slurm", "--time", "01:00:00"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-11" in script and "--only ${SLURM_ARRAY_TASK_ID} --no-summary" in script
    runs = study_tool.load_study(study_file).runs()
    assert len(runs) == 12 and runs[-1].name == "resnet/seed1/fold2"
    assert "--data.init_args.num_folds=3" in runs[-1].options() and "--data.init_args.fold=2" in runs[-1].options()
    assert study_tool.main([str(study_file), "--only", "12"]) == 2


def write_finished_run(folder: Path, rows: list[dict]) -> None:
    """A run folder as a finished study run leaves it: study_run.json, and a test's metrics.json + predictions.csv."""
    test = folder / "tensorboard" / "version_0"
    test.mkdir(parents=True)
    (test / "metrics.json").write_text("{}\n")
    with (test / "predictions.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / study_tool.DONE_FILE).write_text("{}\n")


def prediction_rows(labels, leading, refused) -> list[dict]:
    """predictions.csv rows as the results writer makes them: a refused image has prediction -1 and no class."""
    names = ("normal", "pneumonia")
    return [
        {
            "id": i,
            "label": label,
            "prediction": -1 if no else lead,
            "predicted_class": "" if no else names[lead],
            "leading_class": names[lead],
            "prob_normal": 0.3 if lead else 0.7,
            "prob_pneumonia": 0.7 if lead else 0.3,
            "out_of_distribution": str(no).lower(),
        }  # fmt: skip
        for i, (label, lead, no) in enumerate(zip(labels, leading, refused))
    ]


def test_a_study_whose_runs_refuse_images_counts_them_with_their_leading_class(tmp_path, capsys):
    """Issue 40, point 14: refused rows (prediction -1) crashed the summary in torchmetrics' F1. A refused image counts
    with the class the model leads with, and the share answered stands beside."""
    labels = [0, 0, 0, 1, 1, 1]
    runs = {  # experiment -> seed -> (leading class per image, refused per image)
        "resnet": {0: ([0, 0, 1, 1, 1, 0], [0, 0, 1, 0, 0, 1]), 1: ([0, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0])},
        "unet": {0: ([0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]), 1: ([0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0])},
    }
    path = write_study(tmp_path, seeds=[0, 1])
    for experiment, seeds in runs.items():
        for seed, (leading, refused) in seeds.items():
            folder = tmp_path / "runs" / "tiny" / experiment / f"seed{seed}"
            write_finished_run(folder, prediction_rows(labels, leading, refused))
    assert study_tool.main([str(path), "--summarize"]) == 0
    result = json.loads((tmp_path / "runs" / "tiny" / "study.json").read_text())
    by_run = {(row["experiment"], row["seed"]): row for row in result["runs"]}
    # by hand: resnet leads right on 4 of 6 at both seeds (seed 0's refused images 2 and 5 lead wrongly, seed 1's
    # refused image 0 rightly); the unet on 5 and 6 of 6
    assert by_run["resnet", 0]["accuracy"] == pytest.approx(4 / 6)
    assert by_run["resnet", 1]["accuracy"] == pytest.approx(4 / 6)
    assert by_run["resnet", 0]["n_refused"] == 2 and by_run["resnet", 0]["coverage"] == pytest.approx(4 / 6)
    assert by_run["unet", 1]["coverage"] == 1.0
    differences = result["summary"]["unet"]["accuracy_difference"]["differences"]
    assert differences == pytest.approx([5 / 6 - 4 / 6, 1 - 4 / 6])
    table = (tmp_path / "runs" / "tiny" / "study.md").read_text()
    assert "answered" in table and "75.0 %" in table  # resnet: 4/6 and 5/6 answered
