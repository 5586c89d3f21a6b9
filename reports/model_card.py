"""The model card of an exported classifier (README.md of tools/export.py's folder), after the Hugging Face
model-card convention: a YAML header a hub or a script can read (library, tags, classes, metrics), then the
sections a reader needs before trusting the model, written from the run's own files."""

from __future__ import annotations

from huggingface_hub import ModelCardData

from decisions.calibration import calibration_lines, rule_status

CITATION = """@article{favero2025conditional,
  title   = {Conditional diffusion models are medical image classifiers that provide explainability and
             uncertainty for free},
  author  = {Favero, Gian Mario and Saremi, Parham and Kaczmarek, Emily and Nichyporuk, Brennan and Arbel, Tal},
  journal = {arXiv preprint arXiv:2502.03687},
  year    = {2025}
}"""
HEADLINE_METRICS = ("accuracy", "f1", "auroc", "ece", "n_images")


def card_header(config: dict, metrics: dict | None) -> str:
    model = config["model"]
    kind = "diffusion-classifier" if "Diffusion" in model["class_path"] else "image-classification"
    data = ModelCardData(
        library_name="pytorch-lightning",
        tags=["medical-imaging", kind, "safetensors"],
        classes=model["init_args"]["class_names"],
        metrics={key: metrics[key] for key in HEADLINE_METRICS if metrics and key in metrics} or None,
        model_class=model["class_path"],
    )
    return data.to_yaml()


def calibration_section(calibration: dict | None, reason: str | None) -> str:
    if not calibration:
        return f"No calibration is exported ({reason}): refusal, referral and prediction sets are OFF for this model."
    status = rule_status(calibration)
    lines = [f"Calibrated by `validate` on {calibration['n_calibration']} validation images:", ""]
    lines += [f"- {line}" for rule, line in calibration_lines(calibration).items() if status[rule]["on"]]
    lines += [f"- {rule.replace('_', ' ')} OFF: {s['reason']}" for rule, s in status.items() if not s["on"]]
    return "\n".join(lines)


def metrics_section(metrics: dict | None, source: str | None) -> str:
    if not metrics:
        return "No test run of these weights was found: run `python cli.py test` on held-out data before use."
    rows = [f"| {key} | {metrics[key]:.4g} |" for key in HEADLINE_METRICS if key in metrics]
    return "\n".join([f"From `{source}` (one run; no interval: a study over seeds gives one).", "",
                      "| metric | value |", "| --- | --- |", *rows])  # fmt: skip


def model_card(config: dict, metrics: dict | None, metrics_source: str | None, calibration: dict | None,
               calibration_reason: str | None) -> str:  # fmt: skip
    """README.md of an exported folder."""
    init = config["model"]["init_args"]
    data = config.get("training_data", {})
    settings = init.get("classification")
    wavelet = "; a single-stage Haar wavelet turns them into 12 bands of half the side" if init.get("wavelet") else ""
    how = (f"majority vote of N = {settings['num_steps']} shared (noise, t) pairs, {settings['rule']} rule"
           if settings else "the softmax of the network")  # fmt: skip
    return f"""---
{card_header(config, metrics)}
---

# {config["model"]["class_path"].rsplit(".", 1)[-1]}: {" vs ".join(init["class_names"])}

A classifier exported by the diffusion-classifier suite: `model.safetensors` (the classifying weights, digest
`{config["weights"]}`), `config.yaml` (everything that rebuilds it), `calibration.json` (its decision rules, bound to
those weights). Load it without running code from it: `ClassifierModule.from_pretrained("this folder")`, or
`python -m tools.classify <this folder> images/`.

## Intended use

Research on classifiers of medical images, and their uncertainty and explanations. **Not for diagnostic use**: no
regulatory review, trained on the data below only. Recalibrate (`validate`) on images of the site and scanner where
it is used.

## Training data and splits

`{data.get("class_path", "unknown")}` with {_options(data.get("init_args", {}))}; trained from
`{config.get("source", {}).get("checkpoint")}` (step {config.get("source", {}).get("global_step")}).

## Preprocessing

Images decoded to {init.get("image_channels", 3)} channels, resized to {init.get("image_size")} x
{init.get("image_size")} pixels, scaled to [-1, 1]{wavelet}. Classified by {how}.

## Test metrics

{metrics_section(metrics, metrics_source)}

## What the calibrated rules did on validation

{calibration_section(calibration, calibration_reason)}

## What refusal can and cannot see

Refusal compares each image's out-of-distribution score with the validation images' (conformal p-value below
`ood_alpha`): it sees images unlike the training data (another modality, heavy corruption). It can miss a second
site whose images look *as typical* to the model, which is why every test and predict run also checks the whole
set (two-sided score test, predicted-class mix, class scores; the suite's README, "What refusal and the warnings
can and cannot see").

## Limitations

One training run on one data set; the numbers above are for its test split only. Guarantees of referral, prediction
sets and refusal hold for images exchangeable with the validation images, and for these weights and settings only.

## How to cite

```bibtex
{CITATION}
```
"""


def _options(options: dict) -> str:
    shown = ", ".join(f"`{key}: {value}`" for key, value in options.items() if key not in ("num_workers",))
    return shown or "its defaults"
