"""The images a person should look at after a run: the most uncertain, the wrong (where labels exist) and
the refused ones, a few of each, kept as small uint8 thumbnails while the run goes.

Each process keeps at most `size` candidates per kind as it sees its batches, so the memory does not
grow with the data set; at the end the candidates of all processes are gathered and the best `size`
of each kind kept. Which are the best:
  uncertain  the highest entropy of the votes (or of the softmax);
  wrong      the predicted class is not the label, most confident first (the dangerous mistakes);
  refused    out of distribution, the highest out-of-distribution score first.
Ties go to the lower image id, so the gallery does not depend on batches or processes.
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from .records import from_every_rank

GALLERY_SIZE = 8
THUMBNAIL_SIDE = 128  # larger images are shrunk to this side; smaller ones kept as they are
KINDS = ("refused", "wrong", "uncertain")


def thumbnail(image: Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (h, w, 3) uint8, the longer side at most THUMBNAIL_SIDE."""
    image = image.detach().float().cpu()
    scale = THUMBNAIL_SIDE / max(image.shape[-2:])
    if scale < 1:
        size = [max(1, round(side * scale)) for side in image.shape[-2:]]
        image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    image = image.expand(3, *image.shape[-2:]) if image.shape[0] == 1 else image[:3]
    return ((image + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


class Gallery:
    """Bounded candidates per kind (see the module docstring); `add` per batch, `finish` once."""

    def __init__(self, class_names: list[str], size: int = GALLERY_SIZE):
        self.class_names, self.size = class_names, size
        self.heaps: dict[str, list] = {kind: [] for kind in KINDS}
        self.counter = itertools.count()  # breaks exact ties in the heap without comparing payloads

    def priorities(self, outputs: dict, i: int) -> dict[str, tuple]:
        """The kinds image i belongs to, each with its priority (larger = shown first)."""
        tie = -int(outputs["id"][i])
        found = {"uncertain": (float(outputs["entropy"][i]), tie)}
        if "label" in outputs and int(outputs["label"][i]) != int(outputs["prediction"][i]):
            found["wrong"] = (float(outputs["probs"][i].max()), tie)
        if "out_of_distribution" in outputs and bool(outputs["out_of_distribution"][i]):
            found["refused"] = (float(outputs["ood_score"][i]), tie)
        return found

    def add(self, images: Tensor, outputs: dict) -> None:
        """A batch's candidates: each its image id and thumbnail (the card reads the image's record at the end)."""
        for i in range(len(images)):
            for kind, priority in self.priorities(outputs, i).items():
                heap = self.heaps[kind]
                if len(heap) == self.size and priority <= heap[0][0]:
                    continue
                record = {"id": int(outputs["id"][i]), "thumbnail": thumbnail(images[i])}
                item = (priority, next(self.counter), record)
                (heapq.heapreplace if len(heap) == self.size else heapq.heappush)(heap, item)

    def finish(self, trainer) -> dict[str, list[dict]]:
        """The gallery of all processes, each kind best first ({"id", "thumbnail"} each). Call on every rank (it
        gathers)."""
        mine = {kind: [(priority, record) for priority, _, record in heap] for kind, heap in self.heaps.items()}
        self.heaps = {kind: [] for kind in KINDS}
        parts = from_every_rank(mine, trainer)
        merged = {}
        for kind in KINDS:
            candidates = [item for part in parts for item in part[kind]]
            unique = {record["id"]: (priority, record) for priority, record in candidates}  # DDP padding repeats
            best = heapq.nlargest(self.size, unique.values(), key=lambda item: item[0])
            merged[kind] = [record for _, record in best]
        return merged
