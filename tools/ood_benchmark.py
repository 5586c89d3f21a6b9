"""`make ood-bench`: how well each model knows when not to answer, on shifted sets anyone can make.

    python -m tools.ood_benchmark runs/demo/checkpoints/last.ckpt runs/baseline_demo/checkpoints/last.ckpt
    python -m tools.ood_benchmark CKPT --ood-data configs/data/pneumoniamnist.yaml --max-images 300

For each checkpoint, its own data (from the config it was trained with) gives the validation split,
which calibrates the refusal as `validate` does, and the test split, the in-distribution images.
The shifted sets, nothing downloaded:
  (a) the other synthetic kind: skin images for a chest model and the reverse (both kinds for a
      model of real data);
  (b) every corruption of datamodules/corruptions.py at every severity, applied to the test images;
  (c) PneumoniaMNIST's test split from ../shared (real chest X-rays), for a model not trained on it;
  (d) the test split of every datamodule file given with --ood-data.
For every score the model can give (decisions/ood_scores.py; diffusion classifiers also the vote
entropy, and with --null-label the typicality of the unconditional error, one more denoiser input
per step) and every set: the AUROC against the test images, the false-positive rate at 95 % true
positives, and the fraction refused at the model's ood_alpha; per model the false-refusal rate on
its test images and the seconds per image. Prints the tables and writes ood_benchmark.json
(--markdown FILE: the tables as markdown).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from lightning import LightningDataModule

from datamodules import MedMNISTDataModule, SyntheticDataModule
from datamodules.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from decisions.ood_scores import NEEDS_PROFILE, TimeProfile, ood_score
from decisions.referral_and_sets import binomial_cdf
from decisions.refusal import calibrate_refusal, conformal_pvalues, detection_report
from diffusion.engine import segment_errors
from diffusion.noise import image_keys
from experiment.run_folders import RunFolder
from experiment.user_errors import tool_main
from tools.experiments import classify_tensors, load_trained

ROOT = Path(__file__).resolve().parents[1]
PNEUMONIAMNIST = ROOT.parent / "shared" / "data" / "pneumoniamnist"
OTHER_KIND = {"chest": ["skin"], "skin": ["chest"]}
NULL_SCORE = "unconditional_typicality"
REFUSAL_COLUMNS = (
    "model", "score", "ood_alpha", "test images refused", "binomial p of that many at alpha",
    "classification s/image", "scoring us/image", "refused, corruptions at severity 3", "FPR at 95 % TPR, severity 3",
)  # fmt: skip


def images_of(dataset, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `limit` images of a dataset and their ids."""
    items = [dataset[i] for i in range(len(dataset) if limit is None else min(limit, len(dataset)))]
    return torch.stack([item["image"] for item in items]), torch.stack([torch.as_tensor(item["id"]) for item in items])


def classify_all(model, images, ids, batch_size: int, null_label: bool) -> tuple[dict, float]:
    """Per-image outputs over all images and the seconds classification took (the unconditional errors of
    --null-label, when asked for, are timed apart and not counted)."""
    extra = (lambda model, batch: {"null_step_errors": unconditional_step_errors(model, batch)}) if null_label else None
    return classify_tensors(model, images, ids, batch_size, extra)


def unconditional_step_errors(model, batch: dict) -> torch.Tensor:
    """(B, N) errors of the null label at the classification's own (eps, t) pairs."""
    settings = model.classification
    x = model.encode(batch["image"])
    classes = torch.full((len(x), 1), model.null_label, device=x.device)
    steps = torch.arange(settings.num_steps, device=x.device)
    if settings.stratified:
        raise ValueError("--null-label supports unstratified classification only")
    keys = image_keys(batch["image"]).to(x.device)  # the classification's own pairs: keyed by the image
    return segment_errors(model.denoiser(), x, keys, steps, classes, model.schedule, settings)[:, 0]


def score_names(model, null_label: bool) -> list[str]:
    extra = ["entropy"] if "typicality" in model.ood_scores else []  # the paper's vote entropy, for comparison
    return list(model.ood_scores) + extra + ([NULL_SCORE] if null_label else [])


def scored_outputs(name: str, outputs: dict) -> tuple[str, dict]:
    """(score as ood_scores names it, the outputs it reads): the unconditional score is the typicality
    of the null label's errors."""
    if name == NULL_SCORE:
        return "typicality", outputs | {"step_errors": outputs["null_step_errors"]}
    return name, outputs


def shifted_sets(data, image_size: int, test: tuple, limit: int | None, extra_files: list[str]) -> dict:
    """Name -> (images, ids) of every shifted set (see the module docstring)."""
    sets = {}
    kind = getattr(data, "kind", None)
    for other in OTHER_KIND.get(kind, ["chest", "skin"]):
        synthetic = SyntheticDataModule(kind=other, image_size=image_size, num_train=0, num_val=0,
                                        num_test=limit or 200)  # fmt: skip
        sets[f"synthetic {other}"] = images_of(synthetic.split("test"), limit)
    images, ids = test
    for corruption in CORRUPTIONS:
        for severity in SEVERITIES:
            sets[f"{corruption} {severity}"] = (corrupt(images, corruption, severity), ids)
    trained_on_it = isinstance(data, MedMNISTDataModule) and data.flag == "pneumoniamnist"
    if (PNEUMONIAMNIST / "pneumoniamnist.npz").is_file() and not trained_on_it:
        pneumonia = MedMNISTDataModule(str(PNEUMONIAMNIST), "pneumoniamnist", 28, image_size, num_workers=0)
        pneumonia.setup("test")
        sets["PneumoniaMNIST"] = images_of(pneumonia.split_dataset("test"), limit)
    for file in extra_files:
        sets[Path(file).stem] = images_of(datamodule_from_file(file, image_size), limit)
    return sets


def datamodule_from_file(file: str, image_size: int):
    """The test split of a datamodule config file (e.g. configs/data/*.yaml) at the model's image size."""
    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    config = parser.parse_args(["--data", file, f"--data.init_args.image_size={image_size}"])
    data = parser.instantiate_classes(config).data
    data.setup("test")
    return data.split_dataset("test")


def refusal_consistent(refused: int, n: int, alpha: float) -> float:
    """P(at least `refused` of n | each refused with probability alpha): small = more than alpha refused."""
    return 1.0 if refused == 0 else 1.0 - binomial_cdf(refused - 1, n, alpha)


def benchmark_model(checkpoint: str, args) -> dict:
    cli = load_trained(checkpoint)
    model, data = cli.model.eval(), cli.datamodule
    image_size = data.image_size
    data.setup("validate")
    data.setup("test")
    null_label = args.null_label and "typicality" in model.ood_scores
    settings = model.calibration
    print(f"{checkpoint}: {type(model).__name__}, {image_size} px, calibrating on the validation split", flush=True)
    val_outputs, _ = classify_all(model, *images_of(data.split_dataset("val"), None), args.batch_size, null_label)
    test = images_of(data.split_dataset("test"), args.max_images)
    test_outputs, seconds = classify_all(model, *test, args.batch_size, null_label)
    names = score_names(model, null_label)
    blocks = {}
    for name in names:
        score, outputs = scored_outputs(name, val_outputs)
        blocks[name] = calibrate_refusal(outputs, score, settings.ood_alpha, settings.shift_level, settings.ood_bins)

    def scores(name: str, outputs: dict) -> torch.Tensor:
        score, outputs = scored_outputs(name, outputs)
        profile = TimeProfile(**blocks[name]["profile"]) if score in NEEDS_PROFILE else None
        return ood_score(score, outputs, profile)

    started = time.perf_counter()
    inside = {name: scores(name, test_outputs) for name in names}
    scoring = (time.perf_counter() - started) / len(names) / len(test[1])
    alpha = settings.ood_alpha
    result = {
        "checkpoint": checkpoint,
        "model": type(model).__name__,
        "default_score": model.ood_score_name(),
        "scores": names,
        "ood_alpha": alpha,
        "n_reference": blocks[names[0]]["n_reference"],
        "n_calibration": {name: block["n_calibration"] for name, block in blocks.items()},
        "n_test": len(test[1]),
        "seconds_per_image": seconds / len(test[1]),
        "scoring_seconds_per_image": scoring,
        "false_refusal": {},
        "sets": {},
    }
    for name in names:
        refused = int((conformal_pvalues(blocks[name]["calibration_scores"], inside[name]) < alpha).sum())
        n = len(test[1])
        result["false_refusal"][name] = {"refused": refused, "n": n, "rate": refused / n,
                                         "binomial_pvalue": refusal_consistent(refused, n, alpha)}  # fmt: skip
    for set_name, (images, ids) in shifted_sets(data, image_size, test, args.max_images, args.ood_data).items():
        outputs, _ = classify_all(model, images, ids, args.batch_size, null_label)
        row = {}
        for name in names:
            outside = scores(name, outputs)
            refused = conformal_pvalues(blocks[name]["calibration_scores"], outside) < alpha
            row[name] = detection_report(inside[name], outside) | {"refused": float(refused.double().mean())}
        result["sets"][set_name] = row | {"n_images": len(ids)}
        print(f"  {set_name:20s} " + "  ".join(f"{n} {row[n]['auroc']:.3f}" for n in names), flush=True)
    return result


def summary_rows(sets: dict) -> dict[str, list[str]]:
    """Group names -> the sets they average: each severity of the corruptions."""
    groups = {}
    for severity in SEVERITIES:
        groups[f"mean of the corruptions at severity {severity}"] = [f"{c} {severity}" for c in CORRUPTIONS]
    return {name: [s for s in members if s in sets] for name, members in groups.items()}


def tables(results: list[dict]) -> str:
    """Markdown: AUROC per set and score for every model side by side, then refusals and cost."""
    columns = [(r, name) for r in results for name in r["scores"]]
    label = lambda r: RunFolder.around(r["checkpoint"]).root.name or r["model"]  # noqa: E731
    header = "| set | " + " | ".join(f"{label(r)}: {name}" + (" *" if name == r["default_score"] else "")
                                     for r, name in columns) + " |"  # fmt: skip
    lines = ["AUROC (shifted set vs the in-distribution test images; * = the model's default score)", "",
             header, "| --- |" + " --- |" * len(columns)]  # fmt: skip
    sets = list(results[0]["sets"])
    for set_name in sets:
        cells = [r["sets"].get(set_name, {}).get(name, {}).get("auroc", math.nan) for r, name in columns]
        lines.append(f"| {set_name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    for group, members in summary_rows(results[0]["sets"]).items():
        cells = [sum(r["sets"][m][name]["auroc"] for m in members) / len(members) for r, name in columns]
        lines.append(f"| **{group}** | " + " | ".join(f"**{c:.3f}**" for c in cells) + " |")
    lines += ["", "Each model's default score: false refusals of its test images, cost, refusals of shifted images",
              "", "| " + " | ".join(REFUSAL_COLUMNS) + " |", "|" + " --- |" * len(REFUSAL_COLUMNS)]  # fmt: skip
    for r in results:
        name = r["default_score"]
        refusal = r["false_refusal"][name]
        severe = [s for s in r["sets"] if s.endswith(" 3")]
        refused = sum(r["sets"][s][name]["refused"] for s in severe) / max(1, len(severe))
        fpr = sum(r["sets"][s][name]["fpr_at_95_tpr"] for s in severe) / max(1, len(severe))
        cells = [label(r), name, str(r["ood_alpha"]), f"{refusal['refused']} / {refusal['n']} ({refusal['rate']:.3f})",
                 f"{refusal['binomial_pvalue']:.2f}", f"{r['seconds_per_image']:.3f}",
                 f"{r['scoring_seconds_per_image'] * 1e6:.0f}", f"{refused:.3f}", f"{fpr:.3f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoints of runs of this suite (diffusion or baseline)")
    parser.add_argument(
        "--ood-data", nargs="*", default=[], help="datamodule config files whose test split is a shifted set"
    )
    parser.add_argument("--max-images", type=int, default=200, help="images per test and shifted set (default 200)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per classification batch (default 64)")
    parser.add_argument(
        "--null-label",
        action="store_true",
        help="also the unconditional error's typicality (diffusion; 1/C more forwards)",
    )
    parser.add_argument(
        "--output", default="ood_benchmark.json", help="where the numbers go (default ood_benchmark.json)"
    )
    parser.add_argument("--markdown", default=None, help="also write the tables as markdown to this file")
    args = parser.parse_args(argv)  # fmt: skip
    started = time.perf_counter()
    results = [benchmark_model(checkpoint, args) for checkpoint in args.checkpoints]
    text = tables(results)
    print("\n" + text + f"\n\n{time.perf_counter() - started:.0f} s in all")
    Path(args.output).write_text(json.dumps({"results": results}, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    print(f"numbers written to {args.output}")


if __name__ == "__main__":
    tool_main(main, "python -m tools.ood_benchmark ...")
