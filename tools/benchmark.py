"""`make bench`: speed and early-exit numbers of the classification engine.

    python -m tools.benchmark [--ckpt runs/demo/checkpoints/last.ckpt] [--images 96]
    python -m tools.benchmark --device cuda --bf16 --forward-batch 256     # on a GPU

1. Engine overhead at the paper's model input (12 x 128 x 128, N = 501, 2 classes): seconds per
   image for everything but the network (noise, diffusion, errors, votes), with a stand-in
   denoiser that costs nothing (it returns its input).
2. Efficiency: the time of the same number of raw denoiser forwards at the same batch over the
   time of classification (= classification images/s over the images/s raw forwards allow). The
   gap is the engine's overhead at the model's own size. Measured on the trained demo UNet and a
   small random DiT; on a GPU also on the paper-size UNet and DiT-B/4 (random weights, bf16).
3. Early exit on the trained demo model at N = 501: the fraction of full-N forwards that exact and
   sequential (alpha = 0.01) early exit use, and how often they agree with full N.
Prints a table and writes bench.json at the repo root.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from diffusion.engine import ClassifierSettings, classify_images
from diffusion.schedule import ShiftedCosineSchedule
from diffusion.voting import summarize
from experiment.user_errors import tool_main
from networks import ClassConditionalUNet, DiT
from tools.experiments import load_experiment

ROOT = Path(__file__).resolve().parents[1]
PAPER_INPUT = (12, 128, 128)  # 3 x 256 x 256 images after the Haar wavelet
PAPER_NETWORKS = {"UNet": ("unet_paper.yaml", ClassConditionalUNet), "DiT-B/4": ("dit_b4.yaml", DiT)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device):
    """(result, seconds) of function(), the device synchronised on both ends."""
    _sync(device)
    started = time.perf_counter()
    result = function()
    _sync(device)
    return result, time.perf_counter() - started


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def raw_forward_seconds(denoiser, shape, num_classes, batch, forwards, device) -> float:
    """Seconds for `forwards` denoiser calls at a fixed batch, nothing else."""
    z = torch.randn(batch, *shape, device=device)
    t = torch.rand(batch, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    return timed(lambda: [denoiser(z, t, labels) for _ in range(forwards)], device)[1]


def efficiency(denoiser, x, ids, num_classes, schedule, settings, device, repeats=2) -> dict:
    """Classification vs the same number of raw forwards at the same batch, interleaved and
    best-of-`repeats`, so a busy machine slows both sides alike. Every forward is full when
    C * images * N is a multiple of max_forward_batch."""
    forwards = math.ceil(num_classes * len(x) * settings.num_steps / settings.max_forward_batch)
    shape = tuple(x.shape[1:])
    raw_forward_seconds(denoiser, shape, num_classes, settings.max_forward_batch, 2, device)  # warm-up
    classify_times, raw_times = [], []
    for _ in range(repeats):
        run = lambda: classify_images(denoiser, x, ids, num_classes, schedule, settings)  # noqa: E731
        classify_times.append(timed(run, device)[1])
        raw_times.append(
            raw_forward_seconds(denoiser, shape, num_classes, settings.max_forward_batch, forwards, device)
        )
    return {
        "classify_images_per_s": len(x) / min(classify_times),
        "raw_images_per_s": len(x) / min(raw_times),
        "efficiency": min(raw_times) / min(classify_times),
    }


def engine_overhead(device, images: int = 2, steps: int = 501, forward_batch: int = 256, dtype=torch.float32) -> float:
    """Seconds per image of the engine alone at the paper's model input: a stand-in denoiser that
    returns its input, so what is timed is noise, diffusion, errors and votes."""
    x = torch.randn(images, *PAPER_INPUT, device=device, dtype=dtype)
    settings = ClassifierSettings(num_steps=steps, max_forward_batch=forward_batch)
    schedule = ShiftedCosineSchedule(PAPER_INPUT[-1])

    def run():
        return summarize(
            classify_images(lambda z, t, labels: z, x, torch.arange(images), 2, schedule, settings)["errors"]
        )

    timed(run, device)  # warm-up
    return timed(run, device)[1] / images


def paper_network(name: str, device) -> torch.nn.Module:
    """The paper-size network of configs/networks/ (random weights), for 2 classes at 12 x 128 x 128."""
    file, network_class = PAPER_NETWORKS[name]
    options = yaml.safe_load((ROOT / "configs" / "networks" / file).read_text())["init_args"]
    return network_class(2, PAPER_INPUT[0], PAPER_INPUT[-1], **options).to(device).eval()


def paper_size_numbers(device, images: int, steps: int, forward_batch: int) -> dict:
    """Efficiency and images per second of the paper-size UNet and DiT-B/4 (GPU, bf16 autocast)."""
    x, ids = torch.randn(images, *PAPER_INPUT, device=device), torch.arange(images)
    settings = ClassifierSettings(num_steps=steps, max_forward_batch=forward_batch)
    schedule, results = ShiftedCosineSchedule(PAPER_INPUT[-1]), {}
    for name in PAPER_NETWORKS:
        print(f"paper-size {name}: {images} images x N = {steps} ...", flush=True)
        network = paper_network(name, device)
        result = efficiency(network, x, ids, 2, schedule, settings, device, repeats=1)
        results[name] = result | {"seconds_per_image": 1.0 / result["classify_images_per_s"]}
        del network
    return results


def early_exit_numbers(denoiser, x, ids, labels, num_classes, schedule, full: ClassifierSettings, device) -> dict:
    (run, full_seconds) = timed(lambda: classify_images(denoiser, x, ids, num_classes, schedule, full), device)
    reference = summarize(run["errors"])["prediction"]
    rows = {"full": {"seconds": full_seconds, "accuracy": float((reference.cpu() == labels).float().mean())}}
    for rule, extra in (("exact", {}), ("sequential", {"alpha": 0.01})):
        print(f"{rule} early exit ...", flush=True)
        settings = dataclasses.replace(full, early_exit=rule, **extra)
        run, seconds = timed(lambda s=settings: classify_images(denoiser, x, ids, num_classes, schedule, s), device)
        prediction = summarize(run["errors"])["prediction"]
        rows[rule] = {
            "forward_fraction": float(run["forwards"].sum()) / (num_classes * full.num_steps * len(x)),
            "agreement": float((prediction == reference).float().mean()),
            "seconds": seconds,
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    parser.add_argument("--ckpt", default=str(ROOT / "runs/demo/checkpoints/last.ckpt"), help="trained demo checkpoint")
    parser.add_argument(
        "--images", type=int, default=96, help="test images; C * images should divide by --forward-batch"
    )
    parser.add_argument("--steps", type=int, default=501, help="N")
    parser.add_argument("--efficiency-steps", type=int, default=51, help="N of the timed efficiency runs")
    parser.add_argument("--forward-batch", type=int, default=64, help="denoiser inputs per forward (CPU: 64)")
    parser.add_argument("--overhead-images", type=int, default=2, help="images of the paper-size engine overhead")
    parser.add_argument("--paper-images", type=int, default=4, help="images of the paper-size network runs (GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    parser.add_argument("--output", default=str(ROOT / "bench.json"))
    args = parser.parse_args()
    if not Path(args.ckpt).is_file():
        raise SystemExit(f"no checkpoint at {args.ckpt}: run `make demo` first (or pass --ckpt)")
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    print(f"engine overhead at {PAPER_INPUT}, N = 501, 2 classes, {args.overhead_images} images ...", flush=True)
    overhead = engine_overhead(device, args.overhead_images)
    model = load_experiment(args.config, args.ckpt).model.to(device).eval()
    data = load_experiment(args.config).datamodule
    data.setup("test")
    batch = next(iter(torch.utils.data.DataLoader(data.test_dataloader().dataset, batch_size=args.images)))
    x, ids, labels = model.encode(batch["image"].to(device)), batch["id"], batch["label"]
    denoiser = torch.compile(model.network) if args.compile else model.network
    num_classes = model.hparams.num_classes
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    full = ClassifierSettings(num_steps=args.steps, max_forward_batch=args.forward_batch)
    short = dataclasses.replace(full, num_steps=args.efficiency_steps)

    with autocast:
        print(f"efficiency: classification vs raw forwards, N = {args.efficiency_steps}, twice each ...", flush=True)
        unet = efficiency(denoiser, x, ids, num_classes, model.schedule, short, device)
        print(f"full N = {args.steps} on {args.images} images ({num_classes * args.steps * args.images} forwards) ...")
        rows = early_exit_numbers(denoiser, x, ids, labels, num_classes, model.schedule, full, device)
        print("small DiT (random weights) ...", flush=True)
        dit = DiT(num_classes, x.shape[1], x.shape[2], patch_size=2, hidden_size=128, depth=4, num_heads=4)
        dit_result = efficiency(dit.to(device).eval(), x[:32], ids[:32], num_classes, model.schedule, short, device)
        paper = paper_size_numbers(device, args.paper_images, 501, 256) if device.type == "cuda" else None

    result = {
        "device": device_name(device),
        "engine_overhead_s_per_image_paper_size": overhead,
        "classify_efficiency": unet["efficiency"],
        "dit_classify_efficiency": dit_result["efficiency"],
        "exact_forward_fraction": rows["exact"]["forward_fraction"],
        "exact_agreement": rows["exact"]["agreement"],
        "sequential_forward_fraction": rows["sequential"]["forward_fraction"],
        "sequential_agreement": rows["sequential"]["agreement"],
        "full_accuracy": rows["full"]["accuracy"],
        "images": args.images, "n_steps": args.steps, "forward_batch": args.forward_batch,
        "unet_classify_images_per_s": unet["classify_images_per_s"], "unet_raw_images_per_s": unet["raw_images_per_s"],
        "efficiency_steps": args.efficiency_steps,
        "seconds": {rule: row["seconds"] for rule, row in rows.items()},
        "bf16": args.bf16, "compile": args.compile,
    }  # fmt: skip
    if paper is not None:
        result["paper_size"] = paper
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nBenchmark on {result['device']} (written to {args.output}):")
    print(f"  engine overhead at the paper's input   {overhead:.3f} s per image (N = 501, 2 classes)")
    print(f"  classification efficiency, demo UNet   {unet['efficiency']:.3f}  "
          f"({unet['classify_images_per_s']:.3f} vs {unet['raw_images_per_s']:.3f} images/s)")  # fmt: skip
    print(f"  classification efficiency, small DiT   {dit_result['efficiency']:.3f}")
    print(f"  full N accuracy                        {result['full_accuracy']:.3f}")
    for rule in ("exact", "sequential"):
        print(f"  {rule:<10} early exit: forwards {rows[rule]['forward_fraction']:.3f} of full N, "
              f"agreement {rows[rule]['agreement']:.3f}")  # fmt: skip
    for name, numbers in (paper or {}).items():
        speed = f"{numbers['classify_images_per_s']:.2f} images/s ({numbers['seconds_per_image']:.3f} s per image)"
        print(f"  paper-size {name}: efficiency {numbers['efficiency']:.3f}, {speed}")


if __name__ == "__main__":
    tool_main(main, "python -m tools.benchmark ...")
