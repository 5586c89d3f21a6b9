"""Tests of the procedural synthetic data set (datamodules/synthetic.py). CPU only, a few seconds."""

import hashlib

import pytest
import torch

from datamodules import SyntheticDataModule

KINDS = ["chest", "skin"]


def make(kind="chest", size=16, n=(20, 10, 10), **kwargs):
    return SyntheticDataModule(kind=kind, image_size=size, num_train=n[0], num_val=n[1], num_test=n[2], **kwargs)


def images(dm, split):
    data = dm.split(split)
    return torch.stack([data[i]["image"] for i in range(len(data))])


def coordinates(size):
    c = (torch.arange(size) + 0.5) / size * 2 - 1
    return torch.meshgrid(c, c, indexing="ij")  # y (downwards), x in [-1, 1]


def best_threshold(stat, labels):
    """Threshold t on `stat > t` that classifies best (fitted on one split, applied to another)."""
    accuracy = lambda t: ((stat > t).long() == labels).float().mean()  # noqa: E731
    return max(stat.unique().tolist(), key=accuracy)


@pytest.mark.parametrize("kind", KINDS)
def test_seed_reproduces_images_and_changes_them(kind):
    a, b, c = make(kind, seed=3), make(kind, seed=3), make(kind, seed=4)
    for split in ("train", "val", "test"):
        assert torch.equal(images(a, split), images(b, split))
        assert torch.equal(a.split(split).labels, b.split(split).labels)
        assert not torch.equal(images(a, split), images(c, split))


@pytest.mark.parametrize("kind", KINDS)
def test_item_depends_only_on_seed_split_and_index(kind):
    small, large = make(kind, n=(8, 4, 4)), make(kind, n=(40, 30, 30))
    for split in ("train", "val", "test"):
        assert torch.equal(images(small, split), images(large, split)[: len(small.split(split))])
        data = large.split(split)  # cached tensors equal what lazy rendering gives
        image, mask = data.render(7)
        assert torch.equal(data.images[7], image) and torch.equal(data.masks[7], mask)
    # splits never share an image
    everything = torch.cat([images(large, s) for s in ("train", "val", "test")]).flatten(1)
    assert torch.unique(everything, dim=0).shape[0] == everything.shape[0]


def test_ids_unique_across_splits_and_labels_balanced():
    dm = make(n=(30, 12, 16))
    ids = torch.cat([torch.stack([d["id"] for d in dm.split(s)]) for s in ("train", "val", "test")])
    assert torch.equal(ids, torch.arange(30 + 12 + 16))
    for split, n in [("train", 30), ("val", 12), ("test", 16)]:
        labels = dm.split(split).labels
        assert labels.dtype == torch.long and labels.sum().item() == n // 2
        assert labels.tolist() != [i % 2 for i in range(n)]  # label is not the parity of the id
    odd = make(n=(7, 3, 5)).split("train").labels
    assert odd.sum().item() in (3, 4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [16, 32, 64])
def test_shapes_range_and_dtypes(kind, size):
    dm = make(kind, size, n=(6, 2, 2))
    dm.setup("fit")
    assert set(dm.splits) == {"train", "val"}
    item = dm.split("train")[0]
    assert set(item) == {"image", "label", "id", "mask"}
    assert item["mask"].shape == (1, size, size) and item["mask"].dtype == torch.float32
    masks = torch.stack([m["mask"] for m in dm.split("train")])
    assert masks.min() >= 0 and masks.max() <= 1
    x = images(dm, "train")
    assert x.shape == (6, 3, size, size) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
    assert item["label"].dtype == torch.long and item["label"].dim() == 0
    assert item["id"].dtype == torch.long and item["id"].dim() == 0
    if kind == "chest":  # grayscale replicated
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert dm.num_classes == 2 and dm.image_channels == 3 and dm.image_size == size


@pytest.mark.parametrize("kind", KINDS)
def test_large_images_are_rendered_lazily(kind):
    dm = make(kind, 256, n=(1000, 10, 10))
    data = dm.split("train")  # would be 3 GB if pre-generated
    assert data.images is None
    first, last = data[0], data[-1]
    assert first["image"].shape == (3, 256, 256) and last["id"].item() == 999
    assert first["image"].min() >= -1 and first["image"].max() <= 1
    assert torch.equal(data[0]["image"], first["image"])
    with pytest.raises(IndexError):
        data[1000]


# sha256 (first 16 hex digits) of the float32 bytes of the first 6 training images, seed 0, computed
# with datamodules/synthetic.py as it was before the finding masks were added (renderers returning the
# image only): adding the masks must not change a single draw or pixel.
IMAGES_BEFORE_MASKS = {
    ("chest", 16): "443a55852420158f",
    ("chest", 32): "2cdda04330cb5057",
    ("skin", 16): "1c6a2608e7862241",
    ("skin", 32): "c6636f6a8116713d",
}


@pytest.mark.parametrize("kind,size", sorted(IMAGES_BEFORE_MASKS))
def test_images_are_those_rendered_before_the_masks(kind, size):
    data = make(kind, size, n=(6, 2, 2), seed=0).split("train")
    pixels = torch.stack([data[i]["image"] for i in range(6)]).contiguous().numpy().tobytes()
    assert hashlib.sha256(pixels).hexdigest()[:16] == IMAGES_BEFORE_MASKS[kind, size]


def test_chest_masks_mark_the_effusion_at_the_lung_bases():
    data = make("chest", 32, n=(40, 2, 2), seed=2).split("train")
    masks, positive = data.masks[:, 0], data.labels == 1
    assert torch.equal(masks[~positive], torch.zeros_like(masks[~positive]))  # no finding, no mask
    effusion = masks[positive]
    assert ((effusion > 0.5).flatten(1).sum(1) >= 5).all()  # every effusion has a region, at 0.5 too
    y, x = coordinates(32)
    weight = effusion.flatten(1).sum(1)
    centre_y = (effusion * y).flatten(1).sum(1) / weight  # image y grows downwards: > 0 is the lower half
    lateral = (effusion * x.abs()).flatten(1).sum(1) / weight  # inside a lung field, not the mediastinum
    assert (centre_y > 0).all() and (centre_y < 0.5).all()
    assert (lateral > 0.25).all() and (lateral < 0.65).all()
    assert not ((effusion > 0.5) & (y < -0.35)).any()  # nothing in the upper lung fields
    # the mask is where the image shows fluid: brighter than the same pixels in the healthy images (aerated lung)
    healthy = data.images[~positive, 0]
    for image, mask in zip(data.images[positive, 0], effusion > 0.5):
        assert image[mask].mean() > healthy[:, mask].mean() + 0.3


def test_skin_masks_mark_the_melanoma_only():
    data = make("skin", 32, n=(20, 2, 2), seed=2).split("train")
    masks, positive = data.masks[:, 0], data.labels == 1
    assert torch.equal(masks[~positive], torch.zeros_like(masks[~positive]))  # a benign naevus is no finding
    area = (masks[positive] > 0.5).flatten(1).float().mean(1)
    assert (area > 0.05).all() and (area < 0.8).all()
    # the lesion is darker than the skin around it
    brightness = data.images[positive].mean(1)
    for image, mask in zip(brightness, masks[positive]):
        assert image[mask > 0.5].mean() < image[mask < 0.05].mean()


def test_lazily_rendered_items_carry_their_mask():
    data = make("chest", 256, n=(4, 2, 2)).split("train")
    assert data.masks is None
    item = data[int(torch.nonzero(data.labels)[0])]
    assert item["mask"].shape == (1, 256, 256) and item["mask"].max() > 0.5


def test_class_names():
    assert make("chest").class_names == ["no_finding", "pleural_effusion"]
    assert make("skin").class_names == ["benign", "melanoma"]


@pytest.mark.parametrize("kind", KINDS)
def test_within_class_variation(kind):
    data = make(kind, 32).split("train")
    for c in (0, 1):
        x = data.images[data.labels == c]
        assert (x[0] - x[1]).abs().mean() > 0.02
        assert x.std(0).mean() > 0.03  # pixelwise spread across the class, not just noise


def chest_statistic(x):
    """Brightness of the lung bases: mean intensity in a box over the lower part of each lung
    field (y in [0.05, 0.3], |x| in [0.22, 0.5] in [-1, 1] coordinates), the brighter side."""
    y, xx = coordinates(x.shape[-1])
    side_means = [x[:, 0][:, (y > 0.05) & (y < 0.3) & (s * xx > 0.22) & (s * xx < 0.5)].mean(1) for s in (-1, 1)]
    return torch.maximum(*side_means)


def skin_statistic(x):
    """Lesion area: fraction of the pixels inside the dermatoscope's field (radius 0.9) darker than
    0.75 x the median brightness there (the median is skin, since lesions cover well under half)."""
    y, xx = coordinates(x.shape[-1])
    field = xx**2 + y**2 < 0.81
    brightness = (x + 1).mean(1)[:, field]
    return (brightness < 0.75 * brightness.median(1, keepdim=True).values).float().mean(1)


@pytest.mark.parametrize("kind,statistic", [("chest", chest_statistic), ("skin", skin_statistic)])
def test_classes_separable_by_simple_statistic(kind, statistic):
    dm = make(kind, 32, n=(200, 2, 400), seed=1)
    train, test = dm.split("train"), dm.split("test")
    threshold = best_threshold(statistic(train.images), train.labels)
    stat = statistic(test.images)
    accuracy = ((stat > threshold).long() == test.labels).float().mean().item()
    assert stat[test.labels == 1].mean() > stat[test.labels == 0].mean()
    assert accuracy > 0.95, f"{kind}: threshold on the reference statistic gives {accuracy:.3f}"


def test_bad_options_raise_naming_the_option():
    with pytest.raises(ValueError, match="kind.*chest.*skin"):
        SyntheticDataModule(kind="brain")
    for size in (6, 33, 32.0):
        with pytest.raises(ValueError, match="image_size"):
            SyntheticDataModule(image_size=size)
    with pytest.raises(ValueError, match="num_train"):
        SyntheticDataModule(num_train=-1)
    with pytest.raises(ValueError, match="batch_size"):
        SyntheticDataModule(batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        SyntheticDataModule(num_workers=-2)


def test_dataloaders():
    dm = make("skin", 16, n=(20, 6, 10), batch_size=8)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # drop_last: 20 images, batch 8
    batch = batches[0]
    assert batch["image"].shape == (8, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == torch.long
    assert batch["id"].dtype == torch.long and batch["id"].max() < 20
    assert sum(b["image"].shape[0] for b in dm.val_dataloader()) == 6
    predict_ids = torch.cat([b["id"] for b in dm.predict_dataloader()])
    assert torch.equal(predict_ids, torch.arange(26, 36))  # the test split, in order
    test_ids = torch.cat([b["id"] for b in dm.test_dataloader()])
    assert torch.equal(test_ids, predict_ids)
    # fewer images than a batch: keep them rather than an empty epoch
    assert len(make(n=(5, 2, 2), batch_size=8).train_dataloader()) == 1


def test_preview_grid():
    grid = make("chest", 16, n=(16, 2, 2)).preview("train", n=8)
    assert grid.shape[0] == 3 and grid.min() >= 0 and grid.max() <= 1
