"""Explanation outputs: the per-batch explanation record, its PNGs, .npz files, explain.json and
TensorBoard images (the maths is in diffusion/explain.py and diffusion/sampler.py).

    python cli.py predict --config configs/demo.yaml --ckpt_path last --model.init_args.explain true

writes, beside predictions.csv (the logger's version folder):
  explanations/image_<id>.png    input | factual | counterfactual(s) | difference map with colour bar
  explanations/summary.png       the same rows for the first `summary_images` images (by id)
  explanations/ids_<a>-<b>.npz   the raw tensors of a batch (pixels in [-1, 1])
  explain.json                   faithfulness numbers (flip rate, concentration, L1/L2)
Each rank writes the images of its own batches (predict's sampler gives every image to one rank
only), and the numbers are gathered over ranks and made unique by id before rank 0 writes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from .diffusion.explain import (  # noqa: E402
    ExplainSettings,
    concentration,
    difference_maps,
    distances,
    explanation_noise,
    reconstruct_all_classes,
    signed_for,
)
from .diffusion.sampler import ddim_sample  # noqa: E402
from .evaluation import concat_outputs, gather_unique  # noqa: E402

EXPLAIN_FILE = "explain.json"
EXPLANATIONS_DIR = "explanations"
PER_IMAGE_KEYS = ("id", "label", "factual", "flip", "flip_prediction", "l1", "l2", "inside", "outside")


def explain_batch(
    denoiser, transform, schedule, images: Tensor, ids: Tensor, factual: Tensor, num_classes: int, null_label: int,
    settings: ExplainSettings, classify: Callable[[Tensor, Tensor], Tensor] | None = None, max_batch: int = 256,
) -> dict[str, Tensor]:
    """Reconstructions toward every class, difference maps and faithfulness numbers for a batch.

    `images` are pixels in [-1, 1]; `transform` the model's wavelet (encode/decode); `classify`
    maps (pixel images, ids) to predicted classes and is used for the flip check (None skips it).
    Per-(image, class) entries at the factual class compare r_f with itself (zero change, flip = 1).
    """
    model_space = reconstruct_all_classes(
        denoiser, transform.encode(images), ids, num_classes, schedule, settings, null_label, max_batch
    )
    pixels = transform.decode(model_space.flatten(0, 1)).clamp(-1, 1).view(len(images), num_classes, *images.shape[1:])
    signed = signed_for(images, settings.difference)
    maps = difference_maps(pixels, factual, signed)
    change = (pixels - images.unsqueeze(1)).abs().mean(dim=2)
    inside, outside = concentration(change, maps, settings.top_fraction)
    l1, l2 = distances(images, pixels)
    record = {
        "id": ids, "factual": factual, "images": images, "reconstructions": pixels, "maps": maps, "signed": signed,
        "l1": l1, "l2": l2, "inside": inside, "outside": outside,
    }
    if classify is not None and settings.flip_steps > 0:
        predicted = classify(pixels.flatten(0, 1), ids.repeat_interleave(num_classes)).view(len(images), num_classes)
        record["flip_prediction"] = predicted
        record["flip"] = (predicted == torch.arange(num_classes, device=predicted.device)).float()
    return record


class ExplanationOutputs:
    """Writes each explained batch's files as it comes and, at the end, explain.json and the summary."""

    def __init__(self, class_names: list[str], settings: ExplainSettings):
        self.class_names, self.settings = class_names, settings
        self.rows: list[dict] = []
        self.summary: list[dict] = []

    def add(self, record: dict, directory: Path, labels: Tensor | None = None) -> None:
        record = {k: v.detach().cpu() for k, v in record.items()} | ({"label": labels.cpu()} if labels is not None else {})
        folder = Path(directory) / EXPLANATIONS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        ids = record["id"].tolist()
        np.savez_compressed(folder / f"ids_{min(ids)}-{max(ids)}.npz", **{k: v.numpy() for k, v in record.items()})
        rows = explanation_rows(record)
        for image_id, row in zip(ids, rows):
            figure = plot_explanations([row], self.class_names)
            figure.savefig(folder / f"image_{image_id}.png", dpi=100, bbox_inches="tight")
            plt.close(figure)
        self.rows.append({k: record[k] for k in PER_IMAGE_KEYS if k in record})
        self.summary += rows
        self.summary = sorted(self.summary, key=lambda row: row["id"])[: self.settings.summary_images]

    def finish(self, trainer, directory: Path) -> dict | None:
        """Gathers the numbers over ranks; rank 0 writes explain.json and summary.png. Returns the summary numbers."""
        rows = gather_unique(concat_outputs(self.rows), trainer) if self.rows or trainer.world_size > 1 else {}
        summary = self.summary
        if trainer.world_size > 1:
            parts = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, summary)
            summary = sorted([row for part in parts for row in part], key=lambda row: row["id"])[: self.settings.summary_images]
        self.rows, self.summary = [], []
        if not trainer.is_global_zero or not rows:
            return None
        numbers = faithfulness(rows, self.class_names) | {"settings": vars(self.settings)}
        folder = Path(directory) / EXPLANATIONS_DIR
        (Path(directory) / EXPLAIN_FILE).write_text(json.dumps(numbers, indent=2) + "\n")
        figure = plot_explanations(summary, self.class_names)
        figure.savefig(folder / "summary.png", dpi=100, bbox_inches="tight")
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure("explain/summary", figure, global_step=trainer.global_step)
        plt.close(figure)
        print(f"explanations of {numbers['n_images']} images written to {folder} (open summary.png); numbers in {Path(directory) / EXPLAIN_FILE}")
        return numbers


class ExplainsPredictions:
    """Predict-time explanations for a diffusion LightningModule with `hparams.explain`,
    `explanation` (ExplainSettings), `explanation_outputs` (ExplanationOutputs) and
    `explain(batch, predictions, settings) -> record`: its predict_step calls
    `explain_predictions(batch, predictions)`; the epoch hooks are here."""

    def explain_predictions(self, batch: dict, predictions: Tensor) -> None:
        if self.hparams.explain:
            record = self.explain(batch, predictions, self.explanation)
            self.explanation_outputs.add(record, self.output_dir, batch.get("label"))

    def on_predict_epoch_start(self) -> None:
        # trainer.log_dir is a collective under DDP (a broadcast from rank 0): ask once, on every
        # rank, here; ranks can hold different numbers of predict batches
        self.output_dir = self.trainer.log_dir or self.trainer.default_root_dir

    def on_predict_epoch_end(self) -> None:
        if self.hparams.explain:
            self.explanation_outputs.finish(self.trainer, self.output_dir)


def faithfulness(rows: dict, class_names: list[str]) -> dict:
    """explain.json's numbers from the per-image rows (means over images and counterfactual classes)."""
    factual = rows["factual"]
    num_classes = len(class_names)
    counterfactual = torch.ones(len(factual), num_classes, dtype=torch.bool).scatter(1, factual.view(-1, 1), False)
    at_factual = lambda values: values.gather(1, factual.view(-1, 1)).squeeze(1)  # noqa: E731
    ratio = rows["inside"] / rows["outside"].clamp(min=1e-12)
    closer = at_factual(rows["l2"]).unsqueeze(1) < rows["l2"]
    numbers = {
        "n_images": len(factual),
        "n_counterfactuals": int(counterfactual.sum()),
        "l1_input_factual": float(at_factual(rows["l1"]).mean()),
        "l2_input_factual": float(at_factual(rows["l2"]).mean()),
        "l1_input_counterfactual": float(rows["l1"][counterfactual].mean()),
        "l2_input_counterfactual": float(rows["l2"][counterfactual].mean()),
        "factual_closer_rate": float(closer[counterfactual].float().mean()),
        "change_inside_top": float(rows["inside"][counterfactual].mean()),
        "change_outside_top": float(rows["outside"][counterfactual].mean()),
        "concentration_ratio": float(ratio[counterfactual].mean()),
    }
    if "flip" in rows:
        numbers["flip_rate"] = float(rows["flip"][counterfactual].mean())
        numbers["factual_kept_rate"] = float(at_factual(rows["flip"]).mean())
        numbers["flip_rate_by_target"] = {
            name: float(rows["flip"][:, c][counterfactual[:, c]].mean()) if counterfactual[:, c].any() else None
            for c, name in enumerate(class_names)
        }
    return numbers


def explanation_rows(record: dict) -> list[dict]:
    """One dict per image of a batch record, on the CPU, with what `plot_explanations` draws."""
    keys = ("id", "factual", "images", "reconstructions", "maps", "signed", "label", "flip_prediction")
    present = {k: record[k].detach().cpu() for k in keys if k in record}
    return [{k: v[i] for k, v in present.items()} for i in range(len(record["id"]))]


def _show_image(axis, image: Tensor) -> None:
    picture = ((image.float() + 1) / 2).clamp(0, 1)
    if picture.shape[0] == 1 or bool((picture == picture[:1]).all()):
        axis.imshow(picture[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        axis.imshow(picture.permute(1, 2, 0).numpy())


def plot_explanations(rows: list[dict], class_names: list[str]):
    """One row per image: input | factual | (counterfactual | difference with colour bar) per other class."""
    num_classes = len(class_names)
    columns = 2 + 2 * (num_classes - 1)
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.2 * columns, 2.3 * len(rows)), squeeze=False)
    for axis_row, row in zip(axes, rows):
        factual = int(row["factual"])
        label = f", label {class_names[int(row['label'])]}" if "label" in row else ""
        _show_image(axis_row[0], row["images"])
        axis_row[0].set_title(f"input #{int(row['id'])}{label}", fontsize=8)
        _show_image(axis_row[1], row["reconstructions"][factual])
        axis_row[1].set_title(f"factual: {class_names[factual]}", fontsize=8)
        others = [c for c in range(num_classes) if c != factual]
        for k, target in enumerate(others):
            image_axis, map_axis = axis_row[2 + 2 * k], axis_row[3 + 2 * k]
            _show_image(image_axis, row["reconstructions"][target])
            flipped = ""
            if "flip_prediction" in row:
                flipped = " (flipped)" if int(row["flip_prediction"][target]) == target else " (not flipped)"
            image_axis.set_title(f"counterfactual: {class_names[target]}{flipped}", fontsize=8)
            difference = row["maps"][target].float().numpy()
            if bool(row["signed"]):
                limit = max(float(np.abs(difference).max()), 1e-6)
                shown = map_axis.imshow(difference, cmap="RdBu_r", vmin=-limit, vmax=limit)
                map_axis.set_title("difference (signed)", fontsize=8)
            else:
                shown = map_axis.imshow(difference, cmap="magma", vmin=0)
                map_axis.set_title("|difference| (channel sum)", fontsize=8)
            figure.colorbar(shown, ax=map_axis, fraction=0.046, pad=0.04)
    for axis in axes.flat:
        axis.axis("off")
    figure.tight_layout()
    return figure


@torch.no_grad()
def sample_grid(denoiser, transform, schedule, image_shape: tuple[int, ...], num_classes: int, null_label: int,
                settings: ExplainSettings, per_class: int = 4) -> Tensor:
    """A (3, H', W') image grid in [0, 1] of class-conditional samples from pure noise (t = 1), one row
    per class, with the guidance of `settings` and `monitor_steps` DDIM steps; the noise is seeded,
    so successive grids show the same draws as the model learns."""
    device = next(denoiser.parameters()).device
    ids = torch.arange(per_class).repeat(num_classes) - 1_000_000  # a noise stream no data id uses
    z = explanation_noise(ids, image_shape, settings.seed).to(device)
    labels = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    samples = ddim_sample(denoiser, z, labels, schedule, 1.0, settings.monitor_steps, settings.guidance_scale, null_label)
    pixels = ((transform.decode(samples).clamp(-1, 1) + 1) / 2).float().cpu()
    return make_grid(pixels, nrow=per_class, padding=1, pad_value=1.0)


def main(argv: list[str] | None = None) -> None:
    """Prints where the newest explanations under a run folder are, and their faithfulness numbers."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run_dir", help="a run's default_root_dir, e.g. runs/demo")
    args = parser.parse_args(argv)
    found = sorted(Path(args.run_dir).rglob(EXPLAIN_FILE), key=lambda path: path.stat().st_mtime)
    if not found:
        raise SystemExit(f"no {EXPLAIN_FILE} under {args.run_dir}: run `python cli.py predict ... --model.init_args.explain true` first")
    numbers = json.loads(found[-1].read_text())
    folder = found[-1].parent / EXPLANATIONS_DIR
    shown = ["flip_rate", "factual_kept_rate", "factual_closer_rate", "l2_input_factual", "l2_input_counterfactual", "concentration_ratio"]
    lines = [f"  {key:<24} {numbers[key]:.3f}" for key in shown if key in numbers]
    print(f"\nExplanations of {numbers['n_images']} images (t0 = {numbers['settings']['t0']}, w = "
          f"{numbers['settings']['guidance_scale']}, {numbers['settings']['sampling_steps']} DDIM steps):\n" + "\n".join(lines))
    print(f"  open {folder / 'summary.png'} (one row per image) and {folder}/image_<id>.png\n")


if __name__ == "__main__":
    main()
