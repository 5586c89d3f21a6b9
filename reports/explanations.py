"""Explanation files: each explained batch's PNGs and .npz, explain.json and the TensorBoard figures
(the maths, explain_batch included, is in diffusion/explain.py and diffusion/sampler.py).

    python cli.py predict --config configs/demo.yaml --ckpt_path last --model.init_args.explain true

writes, beside predictions.csv (the logger's version folder):
  explanations/image_<id>.png    input | factual | counterfactual(s) | difference map with colour bar
  explanations/summary.png       the same rows for the first `summary_images` images (by id)
  explanations/ids_<a>-<b>.npz   the raw tensors of a batch (pixels in [-1, 1])
  explain.json                   faithfulness numbers (flip rate, concentration, L1/L2; where the data
                                 mark the finding: pointing game, map mass inside the mask, chance level)
Where an image has a finding mask, its outline is drawn on the input and on the difference maps.
Each rank writes the images of its own batches (predict's sampler gives every image to one rank
only), and the numbers are gathered over ranks and made unique by id before rank 0 writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.utils import make_grid

from diffusion.explain import ExplainSettings
from reports.figures import new_canvas
from reports.results import concat_outputs, gather_unique

EXPLAIN_FILE = "explain.json"
EXPLANATIONS_DIR = "explanations"
PER_IMAGE_KEYS = ("id", "label", "factual", "flip", "flip_prediction", "l1", "l2", "inside", "outside")
LOCALISATION_KEYS = ("hit", "mass_inside", "mask_share")
MASK_COLOUR = "lime"  # the finding's outline: visible on grey images and on both colour maps


class ExplanationOutputs:
    """Writes each explained batch's files as it comes and, at the end, explain.json and the summary."""

    def __init__(self, class_names: list[str], settings: ExplainSettings):
        self.class_names, self.settings = class_names, settings
        self.rows: list[dict] = []
        self.summary: list[dict] = []

    def add(self, record: dict, directory: Path, labels: Tensor | None = None) -> None:
        record = {k: v.detach().cpu() for k, v in record.items()} | (
            {"label": labels.cpu()} if labels is not None else {}
        )
        folder = Path(directory) / EXPLANATIONS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        ids = record["id"].tolist()
        np.savez_compressed(folder / f"ids_{min(ids)}-{max(ids)}.npz", **{k: v.numpy() for k, v in record.items()})
        rows = explanation_rows(record)
        for image_id, row in zip(ids, rows):
            figure = plot_explanations([row], self.class_names)
            figure.savefig(folder / f"image_{image_id}.png", dpi=100, bbox_inches="tight")
        self.rows.append({k: record[k] for k in PER_IMAGE_KEYS + LOCALISATION_KEYS if k in record})
        self.summary += rows
        self.summary = sorted(self.summary, key=lambda row: row["id"])[: self.settings.summary_images]

    def finish(self, trainer, directory: Path) -> dict | None:
        """Gathers the numbers over ranks; rank 0 writes explain.json and summary.png. Returns the summary numbers."""
        rows = gather_unique(concat_outputs(self.rows), trainer) if self.rows or trainer.world_size > 1 else {}
        summary = self.summary
        if trainer.world_size > 1:
            parts = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, summary)
            summary = sorted([row for part in parts for row in part], key=lambda row: row["id"])[
                : self.settings.summary_images
            ]
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
        print(
            f"explanations of {numbers['n_images']} images written to {folder} (open summary.png); "
            f"numbers in {Path(directory) / EXPLAIN_FILE}"
        )
        return numbers


def faithfulness(rows: dict, class_names: list[str]) -> dict:
    """explain.json's numbers from the per-image rows (means over images and counterfactual classes)."""
    factual = rows["factual"]
    counterfactual = counterfactuals(factual, len(class_names))
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
    if "hit" in rows:
        numbers |= localisation_numbers(rows, counterfactual)
    return numbers


def counterfactuals(factual: Tensor, num_classes: int) -> Tensor:
    """(B, C) True at every class but each image's factual one."""
    return torch.ones(len(factual), num_classes, dtype=torch.bool).scatter(1, factual.view(-1, 1).cpu(), False)


def localisation_numbers(rows: dict, counterfactual: Tensor) -> dict:
    """Means over the counterfactuals of the images with a finding (a non-empty mask): pointing_game (hit
    rate), mass_inside_mask (share of |map| inside the mask), chance_mass (mean mask share: what an evenly
    spread map gets), n_localised (how many counterfactuals; None for the means when there are none)."""
    scored = counterfactual.to(rows["mask_share"].device) & (rows["mask_share"] > 0)
    mean = lambda key: float(rows[key][scored].float().mean()) if scored.any() else None  # noqa: E731
    return {
        "pointing_game": mean("hit"),
        "mass_inside_mask": mean("mass_inside"),
        "chance_mass": mean("mask_share"),
        "n_localised": int(scored.sum()),
    }


def explanation_rows(record: dict) -> list[dict]:
    """One dict per image of a batch record, on the CPU, with what `plot_explanations` draws."""
    keys = ("id", "factual", "images", "reconstructions", "maps", "signed", "label", "flip_prediction", "mask")
    present = {k: record[k].detach().cpu() for k in keys if k in record}
    return [{k: v[i] for k, v in present.items()} for i in range(len(record["id"]))]


def _show_image(axis, image: Tensor) -> None:
    picture = ((image.float() + 1) / 2).clamp(0, 1)
    if picture.shape[0] == 1 or bool((picture == picture[:1]).all()):
        axis.imshow(picture[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        axis.imshow(picture.permute(1, 2, 0).numpy())


def _outline(axis, row: dict) -> None:
    """The outline of the image's finding mask, if it has a non-empty one: where the map should point."""
    if "mask" in row and bool(row["mask"].any()):
        axis.contour(row["mask"].float().numpy(), levels=[0.5], colors=MASK_COLOUR, linewidths=0.8)


def plot_explanations(rows: list[dict], class_names: list[str]):
    """One row per image: input | factual | (counterfactual | difference with colour bar) per other class;
    the outline of the finding, where the data mark it, on the input and on every difference map."""
    num_classes = len(class_names)
    columns = 2 + 2 * (num_classes - 1)
    figure = new_canvas((2.2 * columns, 2.3 * len(rows)))
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for axis_row, row in zip(axes, rows):
        factual = int(row["factual"])
        label = f", label {class_names[int(row['label'])]}" if "label" in row else ""
        _show_image(axis_row[0], row["images"])
        _outline(axis_row[0], row)
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
            _outline(map_axis, row)
    for axis in axes.flat:
        axis.axis("off")
    figure.tight_layout()
    return figure


def noise_sample_grid(pixels: Tensor, per_class: int) -> Tensor:
    """A (3, H', W') grid in [0, 1] of class-major samples (pixels in [-1, 1]), one row per class."""
    return make_grid(((pixels.float().cpu() + 1) / 2), nrow=per_class, padding=1, pad_value=1.0)
