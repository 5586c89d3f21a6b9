"""`make shift-bench`: does refusal see a second hospital? Per-image scores and whole-set warnings on simulated site
shifts of real chest X-rays, and on PneumoniaMNIST's official test split, which was collected apart.

    python -m tools.shift_benchmark runs/unet_pneumoniamnist/checkpoints/last.ckpt \\
        --baseline runs/resnet18_pneumoniamnist/checkpoints/last.ckpt

Everything is chosen on validation images: the diffusion model (and the baseline) classify the validation split
once as it is and once under each site shift of datamodules/site_shifts.py at each severity, and the test split.

  per image   the validation split is halved as `validate` halves it (decisions/refusal.reference_half): the
              reference half fits each score, the other half is the in-distribution side of the AUROC, and the
              same images under a shift are the shifted side; the test split against that half too.
  whole set   `--splits` random splits of the validation images into a calibration part (all but `--set-size`,
              itself halved into reference and calibration scores as validate does) and a set of `--set-size`
              images: how often the checks of decisions/set_shift.py fire on that set as it is (at most the
              level, if they keep their promise), on the same images under each shift at its middle severity,
              and on `--set-size` random images of the test split.

Candidate per-image scores of the diffusion classifier, all from the errors classification computes anyway:
typicality (the default: mean z^2 of the best class's standardised log error), abs_mean_z (|mean z|, two-sided),
bins_mahalanobis (the best class's mean z in `--bins` t-bands, a full-covariance Gaussian fitted on the reference
half: multiscale score matching's density over noise levels, Mahalanobis et al. 2021), classes_mahalanobis (the
same over every class's own standardised errors), and the baseline's energy. Writes shift_benchmark.json and,
with --markdown, the tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from datamodules.site_shifts import SEVERITIES, SITE_SHIFTS, site_shift
from decisions.ood_scores import TimeProfile, band_offsets, ood_score
from decisions.refusal import detection_report, reference_half
from decisions.set_shift import reference_outputs, set_shift
from experiment.run_folders import RunFolder
from experiment.user_errors import tool_main
from tools.experiments import classify_tensors, load_trained
from tools.ood_benchmark import images_of

SHRINKAGE = 0.1  # of the covariance towards its diagonal: a few dozen reference images fit a 4-40 dimensional Gaussian
MIDDLE = 2
TEST_SPLIT = "official test split"


def labels_of(dataset) -> torch.Tensor:
    return torch.tensor([int(dataset[i]["label"]) for i in range(len(dataset))])


def select(outputs: dict, index) -> dict:
    return {key: value[index] for key, value in outputs.items()}


class Gaussian:
    """Mahalanobis distance under a Gaussian fitted to feature vectors, its covariance shrunk towards the diagonal."""

    def __init__(self, features: torch.Tensor):
        self.mean = features.mean(dim=0)
        covariance = torch.cov(features.T).reshape(features.shape[1], features.shape[1])
        covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * torch.diag(covariance.diagonal())
        self.precision = torch.linalg.pinv(covariance)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        centred = features - self.mean
        return ((centred @ self.precision) * centred).sum(dim=1)


class Candidates:
    """Every candidate score of the diffusion classifier, fitted on reference outputs."""

    def __init__(self, reference: dict, bins: int, profile_bins: int):
        self.bins = bins
        self.profile = TimeProfile.fit(reference["step_errors"], reference["step_times"], profile_bins)
        classes = reference["errors"].shape[1]
        self.class_profiles = [
            TimeProfile.fit(reference["errors"][:, c], reference["step_times"], profile_bins) for c in range(classes)
        ]
        self.best_bands = Gaussian(self.best_features(reference))
        self.class_bands = Gaussian(self.class_features(reference))

    def best_features(self, outputs: dict) -> torch.Tensor:
        return band_offsets(outputs, self.profile, self.bins)

    def class_features(self, outputs: dict) -> torch.Tensor:
        times = outputs["step_times"]
        per_class = [
            band_offsets({"step_errors": outputs["errors"][:, c], "step_times": times}, profile, self.bins)
            for c, profile in enumerate(self.class_profiles)
        ]
        return torch.cat(per_class, dim=1)

    def scores(self, outputs: dict) -> dict[str, torch.Tensor]:
        return {
            "typicality": ood_score("typicality", outputs, self.profile),
            "abs_mean_z": ood_score("excess_error", outputs, self.profile).abs(),
            "bins_mahalanobis": self.best_bands(self.best_features(outputs)),
            "classes_mahalanobis": self.class_bands(self.class_features(outputs)),
        }


def baseline_scores(outputs: dict) -> dict[str, torch.Tensor]:
    return {"energy": ood_score("energy", outputs)}


def per_image(model_sets: dict, ids: torch.Tensor, args, diffusion: bool) -> dict:
    """AUROC of every candidate: the non-reference validation half against the same images shifted, and against
    the test split."""
    reference = reference_half(ids)
    fit = Candidates(select(model_sets["validation"], reference), args.bins, args.profile_bins) if diffusion else None
    score = fit.scores if diffusion else baseline_scores
    inside = score(select(model_sets["validation"], ~reference))
    table = {}
    for name, outputs in model_sets.items():
        if name == "validation":
            continue
        outside = score(outputs if name == TEST_SPLIT else select(outputs, ~reference))
        table[name] = {key: detection_report(inside[key], outside[key])["auroc"] for key in inside}
    return table


def whole_set(model_sets: dict, ids: torch.Tensor, args, diffusion: bool, class_names: list[str]) -> dict:
    """How often the whole-set checks fire: on in-distribution sets, on each shift at its middle severity, on the
    test split, over random splits of the validation images."""
    rng = np.random.default_rng(args.seed)
    n, size = len(ids), args.set_size
    targets = ["in distribution"] + [f"{kind} {MIDDLE}" for kind in SITE_SHIFTS] + [TEST_SPLIT]
    fired = {target: [] for target in targets}
    by_test = {target: {} for target in targets}
    test = model_sets[TEST_SPLIT]
    for split in range(args.splits):
        order = torch.as_tensor(rng.permutation(n))
        held, calibrating = order[:size], order[size:]
        part = select(model_sets["validation"], calibrating)
        reference = reference_half(ids[calibrating])
        bands = None
        if diffusion:
            profile = TimeProfile.fit(part["step_errors"][reference], part["step_times"][reference], args.profile_bins)
            score = lambda outputs, profile=profile: ood_score("typicality", outputs, profile)  # noqa: E731
            bands = lambda outputs, profile=profile: band_offsets(outputs, profile)  # noqa: E731
        else:
            reference = torch.zeros(len(calibrating), dtype=torch.bool)
            score = lambda outputs: ood_score("energy", outputs)  # noqa: E731
        calibration_scores = score(select(part, ~reference))
        calibration_bands = bands(select(part, ~reference)) if bands else None
        kept = reference_outputs(part)
        sets = {"in distribution": select(model_sets["validation"], held)}
        if split < args.shifted_splits:
            sets |= {f"{kind} {MIDDLE}": select(model_sets[f"{kind} {MIDDLE}"], held) for kind in SITE_SHIFTS}
            sets[TEST_SPLIT] = select(test, torch.as_tensor(rng.choice(len(test["prediction"]), size, replace=False)))
        for target, outputs in sets.items():
            block = set_shift(kept, calibration_scores, outputs, score(outputs), args.level, class_names,
                              calibration_bands, bands(outputs) if bands else None)  # fmt: skip
            fired[target].append(block["shifted"])
            for name in block["fired"]:
                by_test[target][name] = by_test[target].get(name, 0) + 1
    return {target: {"fired": float(np.mean(fired[target])), "sets": len(fired[target]),
                     "fired_by_test": {k: v / len(fired[target]) for k, v in by_test[target].items()}}
            for target in targets}  # fmt: skip


def classify_sets(model, data, images, ids, batch_size: int) -> tuple[dict, float]:
    """Outputs of the validation images as they are, under every site shift and severity, and of the test split;
    and the seconds per image of the first."""
    validation, seconds = classify_tensors(model, images, ids, batch_size)
    sets = {"validation": validation}
    for kind in SITE_SHIFTS:
        for severity in SEVERITIES:
            sets[f"{kind} {severity}"] = classify_tensors(model, site_shift(images, kind, severity), ids, batch_size)[0]
        print(f"  {kind} classified", flush=True)
    sets[TEST_SPLIT] = classify_tensors(model, *images_of(data.split_dataset("test"), None), batch_size)[0]
    return sets, seconds / len(ids)


def benchmark(checkpoint: str, args, diffusion: bool) -> dict:
    cli = load_trained(checkpoint)
    model, data = cli.model.eval(), cli.datamodule
    data.setup("validate")
    data.setup("test")
    images, ids = images_of(data.split_dataset("val"), None)
    cache = Path(args.cache) / f"{RunFolder.around(checkpoint).root.name}.pt" if args.cache else None
    if cache and cache.is_file():  # the classifications of an earlier run of the benchmark on this checkpoint
        saved = torch.load(cache, weights_only=True)
        sets, seconds = saved["sets"], saved["seconds_per_image"]
        print(f"{checkpoint}: classifications read from {cache}", flush=True)
    else:
        sets, seconds = classify_sets(model, data, images, ids, args.batch_size)
        print(f"{checkpoint}: {len(ids)} validation images, {seconds:.3f} s/image", flush=True)
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"sets": sets, "seconds_per_image": seconds}, cache)
    labels = {"validation": labels_of(data.split_dataset("val")), TEST_SPLIT: labels_of(data.split_dataset("test"))}
    accuracy = {name: float((sets[name]["prediction"] == labels[name]).double().mean()) for name in labels}
    accuracy |= {f"{kind} {MIDDLE}": float((sets[f"{kind} {MIDDLE}"]["prediction"] == labels["validation"]).double()
                                            .mean()) for kind in SITE_SHIFTS}  # fmt: skip
    result = {"checkpoint": checkpoint, "model": type(model).__name__, "seconds_per_image": seconds,
              "n_validation": len(ids), "n_test": len(labels[TEST_SPLIT]), "accuracy": accuracy}  # fmt: skip
    result["per_image_auroc"] = per_image(sets, ids, args, diffusion)
    result["whole_set"] = whole_set(sets, ids, args, diffusion, list(model.class_names))
    return result


def tables(results: list[dict]) -> str:
    lines = []
    for result in results:
        auroc = result["per_image_auroc"]
        scores = list(next(iter(auroc.values())))
        lines += [f"Per-image AUROC, {RunFolder.around(result['checkpoint']).root.name} ({result['model']}): the "
                  "validation half not used to fit, against the same images shifted (and the test split)", "",
                  "| set | " + " | ".join(scores) + " |", "| --- |" + " --- |" * len(scores)]  # fmt: skip
        lines += [f"| {name} | " + " | ".join(f"{row[s]:.3f}" for s in scores) + " |" for name, row in auroc.items()]
        for severity in SEVERITIES:
            means = [np.mean([auroc[f"{kind} {severity}"][s] for kind in SITE_SHIFTS]) for s in scores]
            lines.append(f"| **mean of the site shifts at severity {severity}** | "
                         + " | ".join(f"**{m:.3f}**" for m in means) + " |")  # fmt: skip
        lines += ["", f"Whole-set checks (level {results[0]['level']}): fraction of sets of "
                  f"{results[0]['set_size']} images flagged", "", "| set | flagged | sets | by test |",
                  "| --- | --- | --- | --- |"]  # fmt: skip
        for target, row in result["whole_set"].items():
            tests = ", ".join(f"{k} {v:.2f}" for k, v in sorted(row["fired_by_test"].items()))
            lines.append(f"| {target} | {row['fired']:.3f} | {row['sets']} | {tests} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a diffusion classifier's checkpoint (trained on PneumoniaMNIST)")
    parser.add_argument("--baseline", default=None, help="a baseline's checkpoint on the same data (energy score)")
    parser.add_argument("--splits", type=int, default=500, help="random splits for in-distribution sets (500)")
    parser.add_argument("--shifted-splits", type=int, default=200, help="of them, splits that also test shifts (200)")
    parser.add_argument("--set-size", type=int, default=100, help="images per whole set (100)")
    parser.add_argument("--level", type=float, default=0.01, help="level of the whole-set checks (0.01)")
    parser.add_argument("--bins", type=int, default=4, help="t-bands of the Mahalanobis candidates (4)")
    parser.add_argument("--profile-bins", type=int, default=32, help="bins of the time profiles (32, as validate)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="shift_benchmark.json")
    parser.add_argument("--cache", default=None, help="a folder to keep the classifications in, for a rerun")
    parser.add_argument("--markdown", default=None, help="also write the tables as markdown to this file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = [benchmark(args.checkpoint, args, diffusion=True)]
    if args.baseline:
        results.append(benchmark(args.baseline, args, diffusion=False))
    for result in results:
        result |= {"level": args.level, "set_size": args.set_size}
    text = tables(results)
    print("\n" + text + f"\n{time.perf_counter() - started:.0f} s in all")
    Path(args.output).write_text(json.dumps({"results": results}, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    tool_main(main, "python -m tools.shift_benchmark ...")
