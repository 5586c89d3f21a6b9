"""`make gpu-check`: the classification engine's GPU path, in one command a lent GPU runs as it is.

    python -m tools.gpu_check                       # a GPU machine: paper sizes, N = 501 -> gpu_check.json
    python -m tools.gpu_check --dry                 # any CPU: tiny sizes, N = 21, the same code (make test runs it)
    python -m tools.gpu_check --estimate            # any CPU: paper sizes, FLOPs, roofline and memory only, no timing

For the paper-size UNet (configs/networks/unet_paper.yaml) and DiT-B/4 (dit_b4.yaml) on the paper's model input
(12 x 128 x 128, 2 classes), random weights:

1. FLOPs of one denoiser input, counted by torch.utils.flop_counter on the meta device (no memory, no compute), and
   the roofline seconds per image at N = 501 on an H100 and an H200: the larger of the compute time at the card's
   dense bf16 peak and the time to read the weights once per forward (activations not counted: a lower bound).
2. Peak memory of one engine segment (diffusion.engine.segment_errors) with every class of an image side by side in
   one forward: torch.cuda.max_memory_allocated on a GPU; on the CPU an estimate by torch's MemTracker on fake
   tensors (weights, inputs, activations; no compute, no memory, no allocator slack).
3. Seconds per image at N with bf16 autocast, early exit off and sequential (alpha 0.01), with the forward fraction
   exit used and its agreement with the full N (GPU; in the dry run on the CPU at tiny sizes).

Random weights: the layers that DiT and diffusers initialise to zero are drawn too (normal, std 0.02), or every
class would predict the same and every vote would tie. So the exit's forward fraction here says nothing about a
trained model's (make bench measures that); the seconds per forward are the point.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker  # private, but torch's own peak-memory estimator
from torch.utils.flop_counter import FlopCounterMode

from diffusion.engine import ClassifierSettings, classify_images, segment_errors
from diffusion.schedule import ShiftedCosineSchedule
from diffusion.voting import summarize
from experiment.user_errors import tool_main
from networks import ClassConditionalUNet, DiT

ROOT = Path(__file__).resolve().parents[1]
NETWORKS = {"UNet": ("unet_paper.yaml", ClassConditionalUNet), "DiT-B/4": ("dit_b4.yaml", DiT)}
# the dry run's stand-ins: the same classes, a few channels, so the CPU runs every step in seconds
DRY_OPTIONS = {
    "UNet": {"block_out_channels": [16, 32], "layers_per_block": 1, "cross_attention_resolution": 8,
             "cross_attention_dim": 32, "attention_heads": 2, "norm_num_groups": 8},
    "DiT-B/4": {"patch_size": 4, "hidden_size": 64, "depth": 2, "num_heads": 2},
}  # fmt: skip
PAPER_INPUT, DRY_INPUT = (12, 128, 128), (12, 16, 16)
NUM_CLASSES = 2
# dense bf16 tensor-core peak (FLOP/s) and memory bandwidth (bytes/s), SXM cards, from NVIDIA's data sheets
CARDS = {"H100": {"bf16_flops": 989.4e12, "bandwidth": 3.35e12}, "H200": {"bf16_flops": 989.4e12, "bandwidth": 4.8e12}}


def build(name: str, shape: tuple[int, int, int], options: dict, device="cpu", draw: bool = True) -> torch.nn.Module:
    """The network `name` for NUM_CLASSES classes at `shape`; with `draw`, its zero-initialised layers drawn (see
    the docstring). Without: for the meta device and fake tensors, whose values are never read."""
    network = NETWORKS[name][1](NUM_CLASSES, shape[0], shape[-1], **options)
    if torch.device(device).type not in ("cpu", "meta"):  # meta: built under torch.device("meta"); fake: no move
        network = network.to(device)
    if draw:
        with torch.no_grad():
            for parameter in network.parameters():
                if parameter.ndim > 1 and not parameter.any():
                    parameter.normal_(0.0, 0.02)
    return network.eval()


def network_options(name: str, dry: bool) -> dict:
    if dry:
        return DRY_OPTIONS[name]
    return yaml.safe_load((ROOT / "configs" / "networks" / NETWORKS[name][0]).read_text())["init_args"]


def flops_per_input(network: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs of one denoiser input (one noised image under one class), counted by torch.utils.flop_counter (a
    multiply-add counts 2) on whatever device the network is on; meta tensors cost nothing."""
    device = next(network.parameters()).device
    z, t, labels = torch.zeros(1, *shape, device=device), torch.zeros(1, device=device), torch.zeros(1, dtype=int)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        network(z, t, labels.to(device))
    return counter.get_total_flops()


def roofline_seconds_per_image(flops: int, parameters: int, steps: int, forward_batch: int) -> dict[str, float]:
    """Lower bound on seconds per image at N = steps (C x N denoiser inputs): per card, the larger of the compute
    time at its bf16 peak and the time to read the bf16 weights once per forward of forward_batch inputs."""
    inputs = NUM_CLASSES * steps
    return {
        card: max(inputs * flops / spec["bf16_flops"], inputs / forward_batch * 2 * parameters / spec["bandwidth"])
        for card, spec in CARDS.items()
    }


def one_batch(network, x: torch.Tensor, steps: int, forward_batch: int, exit_rule: str = "none") -> dict:
    """The engine (classify_images) on the images x, pairs cut into forwards of forward_batch inputs."""
    settings = ClassifierSettings(num_steps=steps, max_forward_batch=forward_batch, early_exit=exit_rule)
    schedule = ShiftedCosineSchedule(x.shape[-1])
    return classify_images(network, x, torch.arange(len(x), device=x.device), NUM_CLASSES, schedule, settings)


def one_segment(network, x: torch.Tensor) -> torch.Tensor:
    """The engine's unit of work (segment_errors) for one step of the images x, every class of an image side by
    side in one forward of NUM_CLASSES x len(x) inputs."""
    settings = ClassifierSettings(num_steps=1, max_forward_batch=NUM_CLASSES * len(x))
    classes = torch.arange(NUM_CLASSES, device=x.device).expand(len(x), NUM_CLASSES)
    steps, ids = torch.arange(1, device=x.device), torch.arange(len(x), device=x.device)
    return segment_errors(network, x, ids, steps, classes, ShiftedCosineSchedule(x.shape[-1]), settings)


def peak_memory(name: str, shape, options: dict, device: torch.device, forward_batch: int) -> dict:
    """Bytes at the peak of one engine segment of forward_batch inputs (all classes of an image side by side), bf16
    autocast: measured on a GPU; on the CPU estimated by torch's MemTracker on fake tensors (weights, inputs and
    activations, rounded to the CUDA allocator's 512-byte blocks; no allocator slack): no memory, no compute."""
    pairs = forward_batch // NUM_CLASSES
    if device.type == "cuda":
        network, x = build(name, shape, options, device), torch.randn(pairs, *shape, device=device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
            one_segment(network, x)
        return {"bytes": torch.cuda.max_memory_allocated(device), "method": "torch.cuda.max_memory_allocated"}
    with FakeTensorMode():
        network, x = build(name, shape, options, "cpu", draw=False), torch.zeros(pairs, *shape)
        tracker = MemTracker()
        tracker.track_external(network, x)
        with tracker, torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            one_segment(network, x)
    peak = sum(snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("peak").values())
    return {"bytes": peak, "method": "estimate: MemTracker, fake tensors"}


def synchronized(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_image(network, x, steps: int, forward_batch: int, device, bf16: bool) -> dict:
    """s/image at N = steps, exit off and sequential; the exit's forward fraction and agreement with full N."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    rows = {}
    with autocast, torch.no_grad():
        one_batch(network, x[:1], 1, forward_batch)  # warm-up: kernels, cuDNN's choices
        for exit_rule in ("none", "sequential"):
            synchronized(device)
            started = time.perf_counter()
            run = one_batch(network, x, steps, forward_batch, exit_rule)
            synchronized(device)
            rows[exit_rule] = {
                "s_per_image": (time.perf_counter() - started) / len(x),
                "forward_fraction": float(run["forwards"].sum()) / (NUM_CLASSES * steps * len(x)),
                "prediction": summarize(run["errors"])["prediction"].cpu(),
            }
    agreement = float((rows["sequential"].pop("prediction") == rows["none"].pop("prediction")).float().mean())
    return {"exit_off": rows["none"], "exit_sequential": rows["sequential"] | {"agreement_with_full_n": agreement}}


def check(
    name: str, dry: bool, device: torch.device, images: int, steps: int, forward_batch: int, timed: bool = True
) -> dict:
    shape, options = (DRY_INPUT if dry else PAPER_INPUT), network_options(name, dry)
    with torch.device("meta"):
        meta = build(name, shape, options, "meta", draw=False)
    parameters = sum(p.numel() for p in meta.parameters())
    flops = flops_per_input(meta, shape)
    print(f"{name}: {parameters / 1e6:.1f} M parameters, {flops / 1e9:.2f} GFLOP per input; memory ...", flush=True)
    memory = peak_memory(name, shape, options, device, forward_batch)
    timing = {}
    if timed:
        print(f"{name}: {images} images x N = {steps}, bf16, exit off and on ...", flush=True)
        network = build(name, shape, options, device)
        x = torch.randn(images, *shape, generator=torch.Generator().manual_seed(0)).to(device)
        timing = seconds_per_image(network, x, steps, forward_batch, device, bf16=True)
    return {
        "input": list(shape), "classes": NUM_CLASSES, "parameters": parameters, "flops_per_input": flops,
        "roofline_s_per_image_n501": roofline_seconds_per_image(flops, parameters, 501, forward_batch),
        "peak_memory": memory | {"forward_batch": forward_batch}, "n_steps": steps, "images": images, **timing,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="tiny sizes, N = 21, on any device (make test runs it)")
    parser.add_argument("--estimate", action="store_true",
                        help="paper sizes on any device: FLOPs, roofline and peak memory, no timing")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, help="images timed per network (default: 8; dry: 2)")
    parser.add_argument("--steps", type=int, help="N (default: 501; dry: 21)")
    parser.add_argument("--forward-batch", type=int, default=256, help="denoiser inputs per forward (classes x pairs)")
    parser.add_argument("--output", default="gpu_check.json", help="the JSON file written (default: gpu_check.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not (args.dry or args.estimate):
        parser.error(f"no GPU here (device {device}): timing the paper sizes at N = 501 is for a GPU; on a CPU add "
                     "--dry (tiny sizes, every step) or --estimate (paper sizes: FLOPs, roofline, memory)")  # fmt: skip
    if args.dry and args.estimate:
        parser.error("--dry (tiny sizes) and --estimate (paper sizes, no timing): choose one")
    if args.forward_batch % NUM_CLASSES:
        parser.error(f"--forward-batch {args.forward_batch} must be a multiple of the {NUM_CLASSES} classes")
    images, steps = args.images or (2 if args.dry else 8), args.steps or (21 if args.dry else 501)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()})",
        "dry": args.dry, "estimate_only": args.estimate, "bf16": True, "torch": torch.__version__, "cards": CARDS,
        "networks": {name: check(name, args.dry, device, images, steps, args.forward_batch, timed=not args.estimate)
                     for name in NETWORKS},
    }  # fmt: skip
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nGPU check on {result['device']}{' (dry: tiny sizes)' if args.dry else ''}, written to {args.output}:")
    for name, row in result["networks"].items():
        roof = ", ".join(f"{card} {s:.3f} s" for card, s in row["roofline_s_per_image_n501"].items())
        memory = row["peak_memory"]
        print(f"  {name}: {row['flops_per_input'] / 1e9:.2f} GFLOP/input; roofline at N = 501: {roof}; "
              f"peak memory {memory['bytes'] / 2**30:.2f} GiB ({memory['method']})")  # fmt: skip
        for rule in ("exit_off", "exit_sequential") if not args.estimate else ():
            print(f"    {rule}: {row[rule]['s_per_image']:.3f} s/image at N = {steps} "
                  f"({row[rule]['forward_fraction']:.3f} of the forwards)")  # fmt: skip
    return result


if __name__ == "__main__":
    tool_main(main, "python -m tools.gpu_check ...")
