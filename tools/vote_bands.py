"""Where along t a diffusion classifier's votes decide: per t-band vote accuracy and class error gap, on validation.

    python -m tools.vote_bands runs/unet_pneumoniamnist/checkpoints/last.ckpt              # validation split, N = 100
    python -m tools.vote_bands CKPT --steps 200 --bands 5 --output bands.json
    python -m tools.vote_bands CKPT -- --model.init_args.classification.error_norm=l1      # any classification option

The validation split is classified with N stratified pairs (one t per stratum of [0, 1], so every band gets its
share), keeping every step's errors. Per band of t:
  vote accuracy   the share of (image, step) pairs whose lowest error is the true class's: how often a single
                  step of that band votes right (0.5 is a coin for two classes);
  error gap       the mean over images of (mean error of the other classes - the true class's) / the true class's,
                  in that band: how far apart the classes' reconstructions are;
  band accuracy   the majority vote of that band's steps alone.
Plus the majority-vote accuracy with every step. The recipe study (docs/results.md) reads these to choose a t
band for training (`model.init_args.train_t_range`) and for the vote (`classification.t_range`): on validation,
never on test. The numbers go to --output (JSON) and the table is printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffusion.voting import first_argmax, vote_counts
from experiment.user_errors import tool_main
from tools.experiments import load_trained


def band_table(errors: torch.Tensor, times: torch.Tensor, labels: torch.Tensor, bands: int) -> list[dict]:
    """Per band of t (equal widths on [0, 1]): vote accuracy, error gap and band accuracy (module docstring).
    errors (B, C, N), times (B, N), labels (B,)."""
    winners = errors.argmin(dim=1)  # (B, N)
    true_error = errors.gather(1, labels[:, None, None].expand(-1, 1, errors.shape[2])).squeeze(1)
    others = (errors.sum(dim=1) - true_error) / max(1, errors.shape[1] - 1)
    rows = []
    for band in range(bands):
        low, high = band / bands, (band + 1) / bands
        inside = (times >= low) & ((times < high) if band < bands - 1 else (times <= high))
        if not inside.any():
            continue
        masked = errors.masked_fill(~inside[:, None, :], float("nan"))
        gap = torch.nanmean(((others - true_error) / true_error).masked_fill(~inside, float("nan")), dim=1)
        rows.append(
            {
                "t_low": low,
                "t_high": high,
                "steps": int(inside.sum()),
                "vote_accuracy": float((winners == labels[:, None])[inside].float().mean()),
                "error_gap": float(torch.nanmean(gap)),
                "band_accuracy": float((first_argmax(vote_counts(masked)) == labels).float().mean()),
            }
        )
    return rows


def split_errors(model, dataset, settings, batch_size: int) -> dict[str, torch.Tensor]:
    """Every step's errors (B, C, N), t (B, N) and the labels (B,) of a split classified with `settings`."""
    parts = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {
                key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in ("image", "id", "label")
            }
            outputs = model.classify(batch, settings)
            parts.append({"errors": outputs["errors"], "times": outputs["step_times"], "labels": batch["label"]})
    return {key: torch.cat([part[key] for part in parts]) for key in ("errors", "times", "labels")}


def load_diffusion_classifier(checkpoint: str, overrides: list[str]):
    """(model, datamodule) of a diffusion classifier's checkpoint with classification `overrides`; a checkpoint
    of another kind is refused with its path."""
    cli = load_trained(checkpoint, overrides)
    if not hasattr(cli.model, "classify"):
        raise ValueError(f"{checkpoint} is not a diffusion classifier: it has no votes to measure")
    return cli.model.eval(), cli.datamodule


def measure(checkpoint: str, steps: int, bands: int, batch_size: int, overrides: list[str]) -> dict:
    """The validation split classified with N stratified pairs, every step kept: the overall accuracy and band_table."""
    model, data = load_diffusion_classifier(
        checkpoint,
        [f"--model.init_args.classification.num_steps={steps}", "--model.init_args.classification.stratified=true",
         "--model.init_args.classification.early_exit=none", *overrides],
    )  # fmt: skip
    data.setup("validate")
    found = split_errors(model, data.split_dataset("val"), model.classification, batch_size)
    errors, times, labels = found["errors"], found["times"], found["labels"]
    overall = float((first_argmax(vote_counts(errors)) == labels).float().mean())
    return {
        "checkpoint": checkpoint,
        "images": len(labels),
        "steps": steps,
        "overrides": overrides,
        "accuracy": overall,
        "bands": band_table(errors, times, labels, bands),
    }


def markdown(result: dict) -> str:
    lines = [f"{result['checkpoint']}: {result['images']} validation images, N = {result['steps']} stratified, "
             f"majority-vote accuracy {100 * result['accuracy']:.1f} %", "",
             "| t band | steps | vote accuracy | error gap | band accuracy |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in result["bands"]:
        cells = [f"[{row['t_low']:.2f}, {row['t_high']:.2f})", str(row["steps"]), f"{100 * row['vote_accuracy']:.1f} %",
                 f"{100 * row['error_gap']:+.1f} %", f"{100 * row['band_accuracy']:.1f} %"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a diffusion classifier's checkpoint (its run's config is read from it)")
    parser.add_argument("--steps", type=int, default=100, help="N stratified (eps, t) pairs per image (default 100)")
    parser.add_argument("--bands", type=int, default=10, help="t bands of equal width on [0, 1] (default 10)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per classification batch (default 64)")
    parser.add_argument("--output", default=None, help="write the numbers as JSON to this file")
    parser.add_argument("overrides", nargs="*", help="after --: options of the experiment, e.g. classification ones")
    args = parser.parse_args(argv)
    if args.steps < args.bands:
        parser.error(f"--steps {args.steps} must be at least --bands {args.bands}: every band needs a step")
    result = measure(args.checkpoint, args.steps, args.bands, args.batch_size, args.overrides)
    print(markdown(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"numbers written to {args.output}")


if __name__ == "__main__":
    tool_main(main, "python -m tools.vote_bands ...")
