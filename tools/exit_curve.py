"""Forwards against agreement: sequential early exit in random order and in a step order learned on validation.

    python -m tools.exit_curve runs/demo/checkpoints/last.ckpt                         # make bench runs this
    python -m tools.exit_curve runs/unet_pneumoniamnist/checkpoints/last.ckpt --output-dir docs/exit_curve_pneumonia

The validation and test splits are classified once with N = 501 pairs per image and no exit (the model's own
classification settings otherwise: its t range, its seed): the reference answer. Sequential exit is then replayed
on those errors (`replayed_exit`): an image's pair k depends on (seed, image, k) alone, never on whether other
pairs ran, so the votes an exit would have seen are the first columns of the full matrix. The replay uses the
engine's own decision points and test (diffusion.engine, diffusion.early_exit); a test checks it against the
engine's exit forward for forward.

Two step orders, each at every alpha of ALPHAS:
  random   the pairs as drawn (the engine's order today);
  plan     the same 501 pairs, the t bands whose single votes were most often right on validation first
           (`band_ranking`, bands of tools.vote_bands), the drawn order within a band.
For each: the share of N = 501's forwards used, the agreement with N = 501's answer, the accuracy. The plan is
fitted on validation and measured on test (the held-out check), and also shown on validation.

What alpha still bounds under the plan: the sign test's p-value assumes each vote a fair coin under H0. In random
order the votes are exchangeable; in the plan's order they are not (the informative band votes first), but given
the band every vote is still one draw of that band, so at a given look the test still bounds the chance that the
leader of the votes seen so far is a coin's favourite (one look at a time, like the engine's exit, with no
correction for repeated looks). What it no longer bounds is the agreement with N = 501: the first votes come from
one band, whose majority can differ from that of all bands. That is measured here, not assumed.

Writes exit_curve.json, exit_curve.md and exit_curve.png under --output-dir.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffusion.early_exit import sequential_decided
from diffusion.engine import ClassifierSettings
from diffusion.voting import first_argmax, vote_counts
from experiment.user_errors import tool_main
from reports.figures import new_canvas, save_figure
from tools.vote_bands import band_table, load_diffusion_classifier, split_errors

ALPHAS = (0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0001)
ORDERS = ("random", "plan")
AGREEMENT_GOAL = 0.99


def replayed_exit(errors: torch.Tensor, order: torch.Tensor, settings: ClassifierSettings) -> dict[str, torch.Tensor]:
    """Sequential exit replayed on full errors (B, C, N) taken in `order` (B, N) of step indices: the prediction
    and the forwards (B,) of each image, as the engine's exit would give them had it drawn the pairs in that order.
    Same decision points (settings.decision_points), same test (sequential_decided), same vote (lowest error, the
    lowest class on ties), no pruning."""
    batch, classes, total = errors.shape
    ordered = errors.gather(2, order[:, None, :].expand(-1, classes, -1))
    votes = torch.nn.functional.one_hot(ordered.argmin(dim=1), classes).cumsum(dim=1)  # (B, N, C) after k + 1 steps
    stopped = torch.full((batch,), total, dtype=torch.long)
    for point in settings.decision_points(classes):
        running = stopped == total
        decided = sequential_decided(votes[:, point - 1], settings.alpha, settings.min_steps)
        stopped[running & decided] = point
    counts = votes[torch.arange(batch), stopped - 1]
    return {"prediction": first_argmax(counts), "forwards": classes * stopped}


def band_of(times: torch.Tensor, bands: int) -> torch.Tensor:
    """The band index of each t, bands of equal width on [0, 1] (tools.vote_bands' bands; t = 1 in the last)."""
    return (times * bands).long().clamp(max=bands - 1)


def band_ranking(errors: torch.Tensor, times: torch.Tensor, labels: torch.Tensor, bands: int) -> list[int]:
    """The bands (indices), those whose single steps voted right most often first (validation: fit the plan here).
    Bands with no step go last, in index order."""
    rows = band_table(errors, times, labels, bands)
    measured = sorted(rows, key=lambda row: -row["vote_accuracy"])
    ranked = [round(row["t_low"] * bands) for row in measured]
    return ranked + [band for band in range(bands) if band not in ranked]


def planned_order(times: torch.Tensor, ranking: list[int], bands: int) -> torch.Tensor:
    """(B, N) the steps of each image, the ranking's first band first; the drawn order within a band."""
    position = torch.empty(bands, dtype=torch.long)
    position[torch.tensor(ranking)] = torch.arange(bands)
    steps = times.shape[1]
    key = position[band_of(times, bands)] * steps + torch.arange(steps)
    return key.argsort(dim=1)


def full_answer(errors: torch.Tensor) -> torch.Tensor:
    """The majority vote over every step: the reference an exit is measured against."""
    return first_argmax(vote_counts(errors))


def curve(found: dict, order: torch.Tensor, settings: ClassifierSettings) -> list[dict]:
    """Per alpha: the share of full-N forwards, the agreement with the full-N answer and the accuracy."""
    errors, labels = found["errors"], found["labels"]
    full = full_answer(errors)
    rows = []
    for alpha in ALPHAS:
        exit_settings = ClassifierSettings(
            num_steps=errors.shape[2], early_exit="sequential", alpha=alpha, min_steps=settings.min_steps,
            check_every=settings.check_every,
        )  # fmt: skip
        run = replayed_exit(errors, order, exit_settings)
        rows.append(
            {
                "alpha": alpha,
                "forward_fraction": float(run["forwards"].sum()) / errors.numel(),
                "agreement": float((run["prediction"] == full).float().mean()),
                "accuracy": float((run["prediction"] == labels).float().mean()),
            }
        )
    return rows


def goal_point(rows: list[dict], full_accuracy: float) -> dict | None:
    """The fewest forwards with agreement >= 99 % and accuracy no lower than full N's; None if no alpha gets there."""
    good = [row for row in rows if row["agreement"] >= AGREEMENT_GOAL and row["accuracy"] >= full_accuracy]
    return min(good, key=lambda row: row["forward_fraction"]) if good else None


def sample(dataset, images: int | None):
    """The whole split, or `images` of it drawn at random (seed 0): N = 501 costs 1002 forwards an image."""
    if images is None or images >= len(dataset):
        return dataset
    return torch.utils.data.Subset(
        dataset, torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:images].tolist()
    )


def measure(
    checkpoint: str, steps: int, bands: int, batch_size: int, overrides: list[str], images: int | None = None
) -> dict:
    model, data = load_diffusion_classifier(
        checkpoint,
        [f"--model.init_args.classification.num_steps={steps}", "--model.init_args.classification.early_exit=none",
         *overrides],
    )  # fmt: skip
    settings = model.classification
    data.setup("validate")
    data.setup("test")
    found = {
        split: split_errors(model, sample(data.split_dataset(split), images), settings, batch_size)
        for split in ("val", "test")
    }
    ranking = band_ranking(found["val"]["errors"], found["val"]["times"], found["val"]["labels"], bands)
    result = {"checkpoint": checkpoint, "steps": steps, "bands": bands, "plan_band_ranking": ranking,
              "t_range": list(settings.t_range), "min_steps": settings.min_steps,
              "check_every": settings.check_every, "splits": {}}  # fmt: skip
    for split, values in found.items():
        full_accuracy = float((full_answer(values["errors"]) == values["labels"]).float().mean())
        orders = {"random": torch.arange(steps).expand(len(values["labels"]), steps),
                  "plan": planned_order(values["times"], ranking, bands)}  # fmt: skip
        rows = {name: curve(values, order, settings) for name, order in orders.items()}
        result["splits"][split] = {
            "images": len(values["labels"]),
            "full_n_accuracy": full_accuracy,
            "curves": rows,
            "goal": {name: goal_point(rows[name], full_accuracy) for name in ORDERS},
        }
    return result


def goal_text(goal: dict | None) -> str:
    if goal is None:
        return "is not reached at any alpha"
    numbers = ", ".join(f"{key} {100 * goal[key]:.1f} %" for key in ("forward_fraction", "agreement", "accuracy"))
    return f"at alpha {goal['alpha']:g}: {numbers}"


def markdown(result: dict) -> str:
    lines = [f"{result['checkpoint']}: N = {result['steps']} (t in {result['t_range']}), sequential exit every "
             f"{result['check_every']} steps from {result['min_steps']}; the plan's band order (fitted on validation, "
             f"bands of width 1/{result['bands']}): {result['plan_band_ranking']}", ""]  # fmt: skip
    for split in ("test", "val"):
        part = result["splits"][split]
        lines += [f"**{'test (plan fitted on validation)' if split == 'test' else 'validation'}**: "
                  f"{part['images']} images, N = {result['steps']} accuracy {100 * part['full_n_accuracy']:.1f} %", "",
                  "| alpha | " + " | ".join(f"{name}: forwards / agreement / accuracy" for name in ORDERS) + " |",
                  "| --- | " + " | ".join("---" for _ in ORDERS) + " |"]  # fmt: skip
        for index, alpha in enumerate(ALPHAS):
            rows = (part["curves"][name][index] for name in ORDERS)
            cells = [" / ".join(f"{100 * row[key]:.1f} %" for key in ("forward_fraction", "agreement", "accuracy"))
                     for row in rows]  # fmt: skip
            lines.append(f"| {alpha:g} | " + " | ".join(cells) + " |")
        for name in ORDERS:
            lines.append(f"\n{name}: the goal point (agreement >= 99 %, accuracy >= N = {result['steps']}'s) "
                         + goal_text(part["goal"][name]))  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    """Forwards (share of N = 501's, log) against agreement with N = 501 and against accuracy, test split."""
    fig = new_canvas((10.0, 4.0))
    part = result["splits"]["test"]
    for column, (key, label) in enumerate((("agreement", "agreement with N = 501"), ("accuracy", "accuracy"))):
        ax = fig.add_subplot(1, 2, column + 1)
        for name in ORDERS:
            rows = part["curves"][name]
            ax.plot([row["forward_fraction"] for row in rows], [row[key] for row in rows], marker="o", label=name)
        if key == "accuracy":
            ax.axhline(part["full_n_accuracy"], color="grey", linestyle="--", label="N = 501, no exit")
        else:
            ax.axhline(AGREEMENT_GOAL, color="grey", linestyle="--", label="99 %")
        ax.axvline(0.05, color="grey", linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("share of N = 501's forwards (one point per alpha)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"Sequential exit on the test split: {result['checkpoint']}")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a diffusion classifier's checkpoint (its run's config is read from it)")
    parser.add_argument("--steps", type=int, default=501, help="N of the reference answer (default 501)")
    parser.add_argument("--bands", type=int, default=10, help="t bands of equal width on [0, 1] (default 10)")
    parser.add_argument("--images", type=int, help="images per split, drawn at random (default: every image)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per classification batch (default 64)")
    parser.add_argument("--output-dir", default=".", help="where exit_curve.json, .md and .png go (default: here)")
    parser.add_argument("overrides", nargs="*", help="after --: options of the experiment, e.g. classification ones")
    args = parser.parse_args(argv)
    result = measure(args.checkpoint, args.steps, args.bands, args.batch_size, args.overrides, args.images)
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "exit_curve.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / "exit_curve.md").write_text(markdown(result) + "\n")
    plot(result, folder / "exit_curve.png")
    print(markdown(result))
    print(f"written: {folder / 'exit_curve.json'}, {folder / 'exit_curve.md'}, {folder / 'exit_curve.png'}")
    return result


if __name__ == "__main__":
    tool_main(main, "python -m tools.exit_curve ...")
