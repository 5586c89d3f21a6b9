"""Images per second from the decoded-image cache vs from JPEG decoding, through the real datasets.

    python -m tools.bench_data                 # 200 ISIC-like 1024x768 colour JPEGs -> 256x256
    python -m tools.bench_data --mode L --width 390 --height 320   # CheXpert-small-like films

Writes the JPEGs to a temporary folder, lists them for `CSVDataModule`, then times
`dataset[i]` (what each loader worker does per image: file -> float32 (3, 256, 256) tensor in
[-1, 1]) in one process, once decoding every JPEG (`cache_dir=None`, the first epoch) and once
reading the uint8 memmap (every later epoch). Both read from the OS page cache.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from datamodules.csv_folder import CSVDataModule
from experiment.user_errors import tool_main


def make_jpegs(folder: Path, n: int, size: tuple[int, int], mode: str) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        # smooth noise compresses like a photograph, unlike white noise
        noise = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        image = Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        image.convert(mode).save(folder / f"{i:05d}.jpg", quality=90)
        rows.append([f"{i:05d}.jpg", str(i % 2)])
    with open(folder / "images.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], *rows])


def images_per_second(dataset, repeats: int = 1) -> float:
    torch.set_num_threads(1)  # as in a DataLoader worker (Lightning / torch set 1 thread per worker)
    started = time.perf_counter()
    for _ in range(repeats):
        for i in range(len(dataset)):
            dataset[i]
    return repeats * len(dataset) / (time.perf_counter() - started)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="number of JPEGs")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--mode", default="RGB", choices=["RGB", "L"])
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_jpegs(folder, args.n, (args.width, args.height), args.mode)
        common = dict(
            root=tmp,
            csv="images.csv",
            image_size=args.image_size,
            num_workers=0,
            splits_file=str(folder / "splits.csv"),
        )
        started = time.perf_counter()
        cached = CSVDataModule(**common, cache_dir=str(folder / "cache"))
        cached.setup("fit")  # decodes every image once into the cache
        build = time.perf_counter() - started
        direct = CSVDataModule(**common, cache_dir=None)
        direct.setup("fit")
        data_cached, data_direct = cached.datasets["train"], direct.datasets["train"]
        result = {
            "images": len(data_cached),
            "source": f"{args.width}x{args.height} {args.mode} JPEG",
            "image_size": args.image_size,
            "decode_images_per_s": round(images_per_second(data_direct), 1),
            "cache_images_per_s": round(images_per_second(data_cached, repeats=5), 1),
            "cache_build_s": round(build, 2),
        }
    result["speedup"] = round(result["cache_images_per_s"] / result["decode_images_per_s"], 1)
    print(result)
    return result


if __name__ == "__main__":
    tool_main(main, "python -m tools.bench_data ...")
