"""Procedural two-class medical-like images, generated in memory: the default data set of the demo.

No files and no download. Every image is drawn from its own generator seeded by
(seed, split, index), so a split is reproducible item by item whatever its size, the order of
access or the number of workers, and the three splits never share an image. The class signal is
deliberately large and always in the same anatomical place, so that a tiny class-conditional
diffusion model trained for minutes on a CPU can classify it; shapes, intensities, textures and
noise vary within each class so that the task is not a lookup.

Each image comes with the ground truth of its finding, drawn by the same renderer from the same
random draws: `mask`, a (1, H, W) map in [0, 1] of what makes the positive class (the pleural
effusion's fluid, the melanoma's lesion), all zeros for the negative class. Explanations are scored
against it (diffusion/explain.py `localisation`): does the difference map point at the finding?
"""

import functools
import hashlib
import math

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datamodules.loaders import SplitLoaders

KINDS = {"chest": ["no_finding", "pleural_effusion"], "skin": ["benign", "melanoma"]}
SPLITS = ("train", "val", "test")
PREGENERATE_MAX_SIZE = 64  # above this a split of a few thousand images (and masks) would take GBs of RAM


def _stable_seed(*parts) -> int:
    # Python's hash() is salted per process; blake2b gives the same seed in every worker and run.
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@functools.lru_cache(maxsize=8)
def _grid(size: int):
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    return torch.meshgrid(c, c, indexing="ij")  # (y, x) in [-1, 1], y grows downwards


def _smooth_field(g, size, cells, channels=1):
    """Random field in about [-1, 1] whose spatial frequency does not depend on the resolution."""
    low = torch.rand(1, channels, cells, cells, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=True)[0]


def _inside(dist, width):
    """Soft indicator of `dist < 0` with an edge `width` wide (antialiased at any size)."""
    return torch.sigmoid(-dist / width)


def _chest(g, size, label):
    """(image (3, H, W) in [-1, 1], finding (1, H, W) in [0, 1]): the finding is the effusion's fluid."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
    y, x = _grid(size)
    s = u(0.9, 1.05)  # patient size and position in the field of view
    X, Y = (x - u(-0.06, 0.06)) / s, (y - u(-0.06, 0.06)) / s
    edge = max(0.02, 1.5 / size)

    body = _inside(torch.sqrt((X / u(0.86, 0.96)) ** 2 + ((Y - 0.4) / 1.3) ** 2) - 1, 0.06)
    heart = _inside(torch.sqrt(((X - u(0.06, 0.12)) / u(0.27, 0.32)) ** 2 + ((Y - u(0.3, 0.36)) / 0.25) ** 2) - 1, 0.05)
    spine = _inside(X.abs() - 0.07, 0.03)
    trachea = _inside(X.abs() - 0.035, 0.015) * _inside(Y + 0.3, 0.05)
    clavicles = _inside((Y + 0.58 + 0.12 * X.abs()).abs() - 0.025, edge) * _inside(X.abs() - 0.5, 0.05)
    lungs, fluid = [], torch.zeros_like(X)
    effusion = [[-1], [1], [-1, 1]][int(torch.randint(3, (), generator=g))] if label else []
    for side in (-1, 1):  # -1: patient's right (image left)
        cx, cy, rx, ry = side * u(0.34, 0.39), u(-0.08, 0.0), u(0.22, 0.26), u(0.5, 0.56)
        v = ((Y - cy) / ry).clamp(-1.2, 1.2)
        width = rx * (0.85 + 0.2 * v)  # narrow apex, wide base
        lung = _inside(torch.sqrt(((X - cx) / width) ** 2 + v**2) - 1, edge / rx)
        t = side * (X - cx) / rx  # > 0 laterally
        dome = cy + ry * (0.82 + 0.25 * (t + 0.3).clamp(min=0) ** 2)  # diaphragm, deep lateral angle
        lung = lung * _inside(Y - dome, edge) * (1 - heart)
        if side in effusion:  # fluid at the base, its meniscus climbing the lateral wall
            top = cy + 0.9 * ry - 1.9 * ry * u(0.3, 0.6)
            meniscus = top - u(0.25, 0.45) * ry * ((t.clamp(-1, 1) + 1) / 2) ** 2
            fluid_i = _inside(meniscus - Y, max(0.03, edge))
            fluid = torch.maximum(fluid, lung * fluid_i)
            lung = lung * (1 - fluid_i)
        lungs.append(lung)
    lung = torch.maximum(*lungs)

    phase, period = u(0, 1), u(0.15, 0.19)  # posterior ribs: faint arcs, convex upwards
    ribs = torch.cos(math.pi * ((Y - 1.1 * (X.abs() - 0.3) ** 2) / period + phase)) ** 8
    img = body * (0.52 + 0.05 * heart + 0.08 * spine - 0.12 * trachea + 0.08 * clavicles)
    img = img + body * lung * (-0.36 + 0.04 * ribs + 0.04 * _smooth_field(g, size, 6))
    img = img + body * fluid * u(0.03, 0.08)  # fluid is a little denser than the chest wall
    img = (img - 0.3) * u(0.85, 1.15) + 0.3 + u(0.02, 0.08)  # exposure and contrast
    img = img + 0.04 * _smooth_field(g, size, 3) + u(0.01, 0.03) * torch.randn(size, size, generator=g)
    return img.clamp(0, 1).mul(2).sub(1).expand(3, size, size).contiguous(), fluid.unsqueeze(0)


def _skin(g, size, label):
    """(image (3, H, W) in [-1, 1], finding (1, H, W) in [0, 1]): the finding is the melanoma's lesion.

    A benign naevus gets an empty mask, although it is a lesion too: the finding is what makes the
    class, as the effusion does for the chest (whose healthy images have no mask either), and a
    counterfactual toward melanoma changes the skin around a naevus as well (it grows the lesion),
    so the naevus's outline would not be the ground truth of that change."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
    y, x = _grid(size)
    tone = torch.tensor([u(0.78, 0.92), u(0.56, 0.7), u(0.46, 0.58)])[:, None, None]
    skin = tone * (1 + 0.07 * _smooth_field(g, size, 5) + 0.04 * _smooth_field(g, size, 24))

    cx, cy = u(-0.12, 0.12), u(-0.12, 0.12)
    r, theta = torch.hypot(x - cx, y - cy), torch.atan2(y - cy, x - cx)
    if label == 0:  # benign naevus: small, round, symmetric, one shade of brown
        radius = u(0.22, 0.34) * (1 + 0.05 * torch.cos(2 * theta + u(0, 6.3)))
        mask = _inside(r - radius, 0.03)
        brown = torch.tensor([0.52, 0.33, 0.2])[:, None, None] * u(0.75, 1.05)
        colour = brown * (1 - 0.12 * (1 - r / radius).clamp(0, 1) + 0.04 * _smooth_field(g, size, 8))
    else:  # melanoma: large, asymmetric, notched border, several colours
        wobble = sum(u(0.04, 0.14) / k**0.5 * torch.cos(k * theta + u(0, 6.3)) for k in range(1, 6))
        radius = u(0.42, 0.56) * (1 + wobble).clamp(min=0.4) + 0.1 * _smooth_field(g, size, 9)
        mask = _inside(r - radius, 0.008 + 0.006 * (1 + _smooth_field(g, size, 4)))  # partly blurred
        palette = torch.tensor(
            [[0.33, 0.19, 0.11], [0.12, 0.08, 0.08], [0.4, 0.43, 0.5], [0.66, 0.35, 0.33], [0.56, 0.38, 0.26]]
        ).T[:, :, None, None]
        prior = torch.tensor([1.5, 0.5, -1.0, -1.0, 1.0])[:, None, None]  # mostly browns
        weights = torch.softmax(4 * _smooth_field(g, size, 5, channels=5) + prior, dim=0)
        colour = (palette * weights).sum(1) * (1 + 0.06 * _smooth_field(g, size, 16))
    img = skin * (1 - mask) + colour * mask

    fov = _inside(torch.hypot(x, y) - u(1.05, 1.35), 0.05)  # dermatoscope's round field of view
    img = img * fov + u(0.01, 0.025) * torch.randn(3, size, size, generator=g)
    finding = mask * fov if label else torch.zeros_like(x)  # the lesion as far as the dermatoscope shows it
    return img.clamp(0, 1).mul(2).sub(1), finding.reshape(1, size, size)


RENDERERS = {"chest": _chest, "skin": _skin}


class SyntheticSplit(Dataset):
    """One split; image `i` and its finding mask depend only on (seed, split, i), whether cached or
    rendered lazily. Items: {image (3, H, W), label, id, mask (1, H, W) in [0, 1], zeros without a finding}."""

    def __init__(self, kind, image_size, n, seed, split, id_offset, pregenerate):
        self.kind, self.image_size, self.n, self.seed, self.split = kind, image_size, n, seed, split
        self.id_offset = id_offset
        # Labels by pairs: items 2j and 2j+1 get one class each, which one is a coin flip. This
        # keeps every split exactly balanced, a prefix of a split balanced too, and the label
        # unrelated to the parity of the id (from which a classifier seeds its noise).
        flips = [_stable_seed(seed, split, "pair", j) & 1 for j in range((n + 1) // 2)]
        self.labels = torch.tensor([flips[i // 2] ^ (i & 1) for i in range(n)], dtype=torch.long)
        rendered = [self.render(i) for i in range(n)] if pregenerate else []
        self.images = torch.stack([image for image, _ in rendered]) if rendered else None
        self.masks = torch.stack([mask for _, mask in rendered]) if rendered else None

    def render(self, i) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, finding mask) of item i, drawn from its own generator."""
        g = torch.Generator().manual_seed(_stable_seed(self.seed, self.split, i))
        return RENDERERS[self.kind](g, self.image_size, int(self.labels[i]))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        i = int(i) + self.n if int(i) < 0 else int(i)
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for a split of {self.n} images")
        image, mask = (self.images[i], self.masks[i]) if self.images is not None else self.render(i)
        return {"image": image, "label": self.labels[i], "id": torch.tensor(self.id_offset + i), "mask": mask}


class SyntheticDataModule(SplitLoaders, L.LightningDataModule):
    """Procedural two-class medical-like images (no files, no download), reproducible per seed.

    Args:
        kind: "chest" for frontal chest-X-ray-like grayscale images, classes no_finding and
            pleural_effusion (a bright fluid opacity with a curved upper border filling the base
            of one or both lungs); "skin" for dermoscopy-like colour images, classes benign
            (small, round, uniformly brown lesion) and melanoma (large, asymmetric, irregular,
            multicoloured lesion). Every item also has a `mask`, (1, H, W) in [0, 1]: where the
            finding is (the fluid, the melanoma), all zeros for no_finding and benign images.
        image_size: side of the square images in pixels; even and at least 8. Images up to 64
            pixels are generated once in `setup`, larger ones on the fly in `__getitem__`.
        num_train: number of training images (half of them per class).
        num_val: number of validation images (half of them per class).
        num_test: number of test images (half of them per class); predict uses the test split.
        batch_size: images per batch in every loader, per process; None (the default): from the
            CLI's global_batch_size, or DEFAULT_BATCH_SIZE.
        num_workers: dataloader worker processes (0 loads in the main process).
        seed: seed of the whole data set; image i of a split depends only on (seed, split, i).
    """

    def __init__(
        self,
        kind: str = "chest",
        image_size: int = 32,
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 200,
        batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        if not isinstance(image_size, int) or image_size < 8 or image_size % 2:
            raise ValueError(f"image_size must be an even integer >= 8, got {image_size!r}")
        for name, value in [
            ("num_train", num_train),
            ("num_val", num_val),
            ("num_test", num_test),
            ("num_workers", num_workers),
        ]:
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or null, got {batch_size!r}")
        self.save_hyperparameters()
        self.kind, self.image_size, self.seed = kind, image_size, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.splits: dict[str, SyntheticSplit] = {}

    class_names = property(lambda self: list(KINDS[self.kind]))

    def split(self, name: str) -> SyntheticSplit:
        """The dataset of split `name` ("train", "val" or "test"), built on first use."""
        if name not in self.splits:
            offset = sum(self.sizes[s] for s in SPLITS[: SPLITS.index(name)])
            self.splits[name] = SyntheticSplit(
                self.kind,
                self.image_size,
                self.sizes[name],
                self.seed,
                name,
                offset,
                pregenerate=self.image_size <= PREGENERATE_MAX_SIZE,
            )
        return self.splits[name]

    def setup(self, stage: str | None = None):
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}
        for name in wanted.get(stage, SPLITS):
            self.split(name)

    def split_dataset(self, split: str) -> SyntheticSplit:
        return self.split(split)

    def preview(self, split: str = "train", n: int = 16) -> torch.Tensor:
        """Grid in [0, 1] of the first n // 2 images of each class: one row per class."""
        from torchvision.utils import make_grid

        data, per_class = self.split(split), n // 2
        rows = [[i for i in range(len(data)) if data.labels[i] == c][:per_class] for c in (0, 1)]
        images = torch.stack([data[i]["image"] for row in rows for i in row])
        return make_grid((images + 1) / 2, nrow=per_class, padding=1, pad_value=1.0)
