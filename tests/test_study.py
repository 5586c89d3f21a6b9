"""Studies (tools/study.py, reports/studies.py): a study file is checked before anything runs; its runs are
ordinary run folders; a rerun repeats no finished run or stage; a failed run is listed with its log; the summary
has one row per run and Table 1 with intervals and paired tests against the reference."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from reports.records import ImageRecord
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
    if isinstance(changes.get("experiments"), dict) and "reference" not in changes:
        spec["reference"] = next(iter(changes["experiments"]))
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
        ({"also_against": ["vgg"]}, "reference 'vgg' is not one of the experiments"),
        # issue 40, points 5, 9, 10 and 11: a study file that used to escape runs/, share folders or crash
        ({"name": "../../escape"}, "must be a plain folder name"),
        ({"seeds": [0, 0]}, "seeds [0] are listed twice"),
        (
            {"experiments": {"a": {"config": "configs/demo.yaml", "overrides": "--trainer.max_steps=2"}}},
            "overrides must be a list of options",
        ),
        ({"experiments": {"a": None}}, "experiment 'a' must be a mapping"),
        ({"experiments": ["configs/demo.yaml"]}, "experiments must be a mapping"),
        (
            {"experiments": {"a": {"config": "configs/demo.yaml", "overrides": ["--trainer.max_step=2"]}}},
            "--trainer.max_step",
        ),
        (
            {
                "experiments": {
                    "a": {
                        "config": "configs/demo.yaml",
                        "overrides": ["--model.init_args.network.init_args.layers_per_blok=1"],
                    }
                }
            },
            "layers_per_blok",
        ),
        (
            {
                "experiments": {
                    "a": {
                        "config": "configs/unet_pneumoniamnist.yaml",
                        "overrides": ["--data.init_args.root=no/such/folder"],
                    }
                }
            },
            "data root 'no/such/folder' is not a folder",
        ),
        (
            {
                "experiments": {
                    "a": {"config": "configs/demo.yaml", "weights_from": "b"},
                    "b": {"config": "configs/demo.yaml"},
                }
            },
            "weights_from 'b' must name an experiment listed before it",
        ),
    ],
)
def test_a_study_file_with_a_mistake_is_refused_before_anything_runs(tmp_path, capsys, change, message):
    assert study_tool.main([str(write_study(tmp_path, **change))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "escape").exists()


@pytest.mark.parametrize(
    "text, message",
    [("name: a\nseeds: [0\n", "line 3, column 1: not valid YAML"), ("- a\n- b\n", "a study file is a mapping")],
)
def test_a_study_file_that_is_no_mapping_is_one_line(tmp_path, capsys, text, message):
    (tmp_path / "study.yaml").write_text(text)
    assert study_tool.main([str(tmp_path / "study.yaml")]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_no_study_page_is_written_without_a_finished_run(tmp_path, capsys):
    path = write_study(tmp_path)
    assert study_tool.main([str(path), "--summarize"]) == 2
    assert "no run of study tiny has finished" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "tiny" / "study.md").exists()


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
    study_file = write_study(tmp_path, seeds=[0, 1, 2])
    assert study_tool.main([str(study_file), "--slurm", "--time", "01:00:00"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-5" in script and "--only ${SLURM_ARRAY_TASK_ID} --no-summary" in script
    # folds (the synthetic data have none, so the file is only loaded: main would refuse its command lines)
    study_file = write_study(tmp_path, seeds=[0, 1], folds=3)
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
    """predictions.csv rows as the results writer makes them (records.ImageRecord.row): a refused image has
    prediction -1 and no class."""
    names = ["normal", "pneumonia"]
    rows = []
    for i, (label, lead, no) in enumerate(zip(labels, leading, refused)):
        probs = [0.3, 0.7] if lead else [0.7, 0.3]
        record = ImageRecord(id=i, leading=int(lead), probs=probs, entropy=0.61, entropy_normalized=0.88,
                             score=probs[1], label=int(label), ood_score=1.0, ood_pvalue=0.5,
                             out_of_distribution=bool(no))  # fmt: skip
        rows.append(record.row(names))
    return rows


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


def test_a_test_time_arm_tests_another_runs_weights_and_is_compared_with_it_too(tmp_path):
    """weights_from: the arm validates and tests the kept checkpoint of the named experiment's run of the same seed,
    with its own options; also_against adds the paired differences to a second experiment."""
    labels = [0, 0, 0, 1, 1, 1]
    leading = {"resnet": ([0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]), "unet": ([0, 0, 0, 1, 0, 0], [0, 1, 0, 1, 1, 0]),
               "unet_flip": ([0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1])}  # fmt: skip
    experiments = {
        "unet": {"config": "configs/demo.yaml"},
        "unet_flip": {"config": "configs/demo.yaml", "weights_from": "unet", "overrides": ["--x=1"]},
        "resnet": {"config": "configs/baseline_demo.yaml"},
    }
    path = write_study(tmp_path, seeds=[0, 1], experiments=experiments, reference="resnet", also_against=["unet"])
    study = study_tool.load_study(path)
    arm = next(run for run in study.runs() if run.experiment == "unet_flip" and run.seed == 1)
    assert arm.weights_from == tmp_path / "runs" / "tiny" / "unet" / "seed1" and arm.stages == ("validate", "test")
    for experiment, per_seed in leading.items():
        for seed, predictions in enumerate(per_seed):
            folder = tmp_path / "runs" / "tiny" / experiment / f"seed{seed}"
            write_finished_run(folder, prediction_rows(labels, predictions, [0] * 6))
    assert study_tool.main([str(path), "--summarize"]) == 0
    result = json.loads((tmp_path / "runs" / "tiny" / "study.json").read_text())
    against_unet = result["summary"]["unet_flip"]["accuracy_difference_against"]["unet"]["differences"]
    assert against_unet == pytest.approx([5 / 6 - 4 / 6, 1 - 4 / 6])  # by hand, seed by seed
    against_resnet = result["summary"]["unet_flip"]["accuracy_difference"]["differences"]
    assert against_resnet == pytest.approx([5 / 6 - 4 / 6, 1 - 5 / 6])
    header = (tmp_path / "runs" / "tiny" / "study.md").read_text().splitlines()[4]
    assert "accuracy - resnet (pp)" in header and "accuracy - unet (pp)" in header
