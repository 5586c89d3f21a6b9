"""`make bench`: speed and early-exit numbers of the classification engine.

    python -m tools.benchmark [--ckpt runs/demo/checkpoints/last.ckpt] [--images 96]

1. Efficiency: the time of the same number of raw denoiser forwards at the same batch over the
   time of classification (= classification images/s over the images/s raw forwards allow). The
   gap is the engine's overhead: noise generation, wavelet, errors, voting. Measured on the
   trained demo UNet and on a small random DiT.
2. Early exit on the trained demo model at N = 501: the fraction of full-N forwards that exact and
   sequential (alpha = 0.01) early exit use, and how often they agree with full N.
Prints a table and writes bench.json at the repo root. GPU-ready: `--device cuda --bf16 --compile`.
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

from cli import load_experiment
from diffusion.classify import ClassifierSettings, classify_images
from diffusion.voting import summarize
from networks import DiT

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_forward_seconds(denoiser, shape, num_classes, batch, forwards, device) -> float:
    """Seconds for `forwards` denoiser calls at a fixed batch, nothing else."""
    z = torch.randn(batch, *shape, device=device)
    t = torch.rand(batch, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    _sync(device)
    started = time.perf_counter()
    for _ in range(forwards):
        denoiser(z, t, labels)
    _sync(device)
    return time.perf_counter() - started


def timed_classification(denoiser, x, ids, num_classes, schedule, settings, device) -> tuple[dict, float]:
    _sync(device)
    started = time.perf_counter()
    run = classify_images(denoiser, x, ids, num_classes, schedule, settings)
    _sync(device)
    return run, time.perf_counter() - started


def efficiency(denoiser, x, ids, num_classes, schedule, settings, device, repeats=2) -> dict:
    """Classification vs the same number of raw forwards at the same batch, interleaved and
    best-of-`repeats`, so a busy machine slows both sides alike. Needs C * images to be a
    multiple of max_forward_batch for every forward to be full."""
    forwards = math.ceil(num_classes * len(x) * settings.num_steps / settings.max_forward_batch)
    raw_forward_seconds(denoiser, tuple(x.shape[1:]), num_classes, settings.max_forward_batch, 2, device)  # warm-up
    classify_times, raw_times = [], []
    for _ in range(repeats):
        classify_times.append(timed_classification(denoiser, x, ids, num_classes, schedule, settings, device)[1])
        raw_times.append(raw_forward_seconds(denoiser, tuple(x.shape[1:]), num_classes, settings.max_forward_batch, forwards, device))
    return {"classify_images_per_s": len(x) / min(classify_times), "raw_images_per_s": len(x) / min(raw_times),
            "efficiency": min(raw_times) / min(classify_times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    parser.add_argument("--ckpt", default=str(ROOT / "runs/demo/checkpoints/last.ckpt"), help="trained demo checkpoint (make demo)")
    parser.add_argument("--images", type=int, default=96, help="test images; C * images should divide by --forward-batch")
    parser.add_argument("--steps", type=int, default=501, help="N")
    parser.add_argument("--efficiency-steps", type=int, default=51, help="N of the timed efficiency runs")
    parser.add_argument("--forward-batch", type=int, default=64, help="denoiser inputs per forward (64 is fastest on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    parser.add_argument("--output", default=str(ROOT / "bench.json"))
    args = parser.parse_args()
    if not Path(args.ckpt).is_file():
        raise SystemExit(f"no checkpoint at {args.ckpt}: run `make demo` first (or pass --ckpt)")
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    model = load_experiment(args.config, args.ckpt).model.to(device).eval()
    data = load_experiment(args.config).datamodule
    data.setup("test")
    batch = next(iter(torch.utils.data.DataLoader(data.test_dataloader().dataset, batch_size=args.images)))
    x, ids, labels = model.transform.encode(batch["image"].to(device)), batch["id"], batch["label"]
    denoiser = torch.compile(model.network) if args.compile else model.network
    num_classes = model.hparams.num_classes
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    full = ClassifierSettings(num_steps=args.steps, max_forward_batch=args.forward_batch)

    with autocast:
        print(f"efficiency: classification vs raw forwards, N = {args.efficiency_steps}, twice each ...", flush=True)
        unet = efficiency(denoiser, x, ids, num_classes, model.schedule, dataclasses.replace(full, num_steps=args.efficiency_steps), device)
        print(f"full N = {args.steps} on {args.images} images ({num_classes * args.steps * args.images} forwards) ...", flush=True)
        run, full_seconds = timed_classification(denoiser, x, ids, num_classes, model.schedule, full, device)
        reference = summarize(run["errors"])["prediction"]
        rows = {}
        for rule, extra in (("exact", {}), ("sequential", {"alpha": 0.01})):
            print(f"{rule} early exit ...", flush=True)
            settings = dataclasses.replace(full, early_exit=rule, **extra)
            run, seconds = timed_classification(denoiser, x, ids, num_classes, model.schedule, settings, device)
            prediction = summarize(run["errors"])["prediction"]
            rows[rule] = {"forward_fraction": float(run["forwards"].sum()) / (num_classes * args.steps * args.images),
                          "agreement": float((prediction == reference).float().mean()), "seconds": seconds}
        print("small DiT (random weights) ...", flush=True)
        dit = DiT(num_classes, x.shape[1], x.shape[2], patch_size=2, hidden_size=128, depth=4, num_heads=4).to(device).eval()
        dit_result = efficiency(dit, x[:32], ids[:32], num_classes, model.schedule, dataclasses.replace(full, num_steps=args.efficiency_steps), device)

    result = {
        "classify_efficiency": unet["efficiency"],
        "dit_classify_efficiency": dit_result["efficiency"],
        "exact_forward_fraction": rows["exact"]["forward_fraction"],
        "exact_agreement": rows["exact"]["agreement"],
        "sequential_forward_fraction": rows["sequential"]["forward_fraction"],
        "sequential_agreement": rows["sequential"]["agreement"],
        "full_accuracy": float((reference.cpu() == labels).float().mean()),
        "images": args.images, "n_steps": args.steps, "forward_batch": args.forward_batch,
        "unet_classify_images_per_s": unet["classify_images_per_s"], "unet_raw_images_per_s": unet["raw_images_per_s"],
        "efficiency_steps": args.efficiency_steps,
        "seconds": {"full": full_seconds, "exact": rows["exact"]["seconds"], "sequential": rows["sequential"]["seconds"]},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "bf16": args.bf16, "compile": args.compile,
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nBenchmark on {result['device']} (written to {args.output}):")
    print(f"  classification efficiency, UNet   {result['classify_efficiency']:.3f}  ({unet['classify_images_per_s']:.3f} vs {unet['raw_images_per_s']:.3f} images/s)")
    print(f"  classification efficiency, DiT    {result['dit_classify_efficiency']:.3f}")
    print(f"  full N accuracy                   {result['full_accuracy']:.3f}")
    for rule in ("exact", "sequential"):
        print(f"  {rule:<10} early exit: forwards {rows[rule]['forward_fraction']:.3f} of full N, agreement {rows[rule]['agreement']:.3f}")


if __name__ == "__main__":
    main()
