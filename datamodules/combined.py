"""Several datamodules as one: the CheXpert + ISIC fine-tuning set of Stable Diffusion (paper App. D).

Design: the combined classes are the sources' classes one after the other (CheXpert's
no_finding, pleural_effusion, then ISIC's benign, melanoma), so a source's label l becomes
l + (classes of the sources before it). A model keyed by class name (the Stable Diffusion
classifier's `prompts`) thereby gives every item the prompt set of its own data set, and the
rest of the suite sees an ordinary C-class datamodule. Items also carry `source`, the index of
their datamodule. Ids become `source * ID_STRIDE + id`: unique across sources, and an image keeps
its id (hence its classification noise) whatever the other sources hold.

Splits stay those of each source, so a source's test images are never in the combined training
set when the source is later tested on its own. The sources see no Trainer: a file-based one
without `splits_file` keeps its split in runs/splits/<name>.csv (give the same `splits_file` to
the fine-tuning and the test configs, as configs/sd_*.yaml do).
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import ConcatDataset, Dataset

from datamodules.loaders import SplitLoaders

ID_STRIDE = 1_000_000_000
LOADERS = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}


class RelabeledDataset(Dataset):
    """A source's dataset with labels and ids moved into the combined ranges and a `source` key."""

    def __init__(self, dataset: Dataset, source: int, label_offset: int):
        self.dataset, self.source, self.label_offset = dataset, source, label_offset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = dict(self.dataset[index])
        if not 0 <= int(item["id"]) < ID_STRIDE:
            raise ValueError(f"source {self.source}: id {int(item['id'])} outside [0, {ID_STRIDE}); ids would collide")
        # every item gets a path ("" if its source has none) so that mixed sources still collate
        return item | {
            "label": item["label"] + self.label_offset,
            "id": item["id"] + self.source * ID_STRIDE,
            "source": self.source,
            "path": item.get("path", ""),
        }


class CombinedDataModule(SplitLoaders, L.LightningDataModule):
    """The concatenation of `datamodules`, every split, with the classes of all of them.

    Args:
        datamodules: the sources, in order (class_path / init_args each in a config); they must
            agree on image_size and have distinct class names.
        batch_size: images per batch in every loader, per process; None (the default): from the
            CLI's global_batch_size, or DEFAULT_BATCH_SIZE (the sources' own batch sizes are unused).
        num_workers: loader worker processes.
    """

    def __init__(self, datamodules: list[L.LightningDataModule], batch_size: int | None = None, num_workers: int = 8):
        super().__init__()
        if not datamodules:
            raise ValueError("CombinedDataModule needs at least one datamodule")
        sizes = {getattr(source, "image_size", None) for source in datamodules}
        if len(sizes) != 1:
            raise ValueError(
                f"the datamodules have different image sizes {sorted(map(str, sizes))}; give them one image_size"
            )
        names = [name for source in datamodules for name in source.class_names]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(
                f"class name(s) {repeated} appear in several datamodules; a class name must name one prompt set"
            )
        self.sources, self.batch_size, self.num_workers = list(datamodules), batch_size, num_workers
        self.datasets: dict[str, ConcatDataset] = {}

    class_names = property(lambda self: [name for source in self.sources for name in source.class_names])
    image_size = property(lambda self: self.sources[0].image_size)

    def label_offsets(self) -> list[int]:
        """Label offset of each source: the number of classes of the sources before it."""
        counts = [len(source.class_names) for source in self.sources]
        return [sum(counts[:k]) for k in range(len(counts))]

    def prepare_data(self):
        for source in self.sources:
            source.prepare_data()

    def setup(self, stage: str | None = None):
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}.get(
            stage, list(LOADERS)
        )
        for source in self.sources:
            source.setup(stage)
        for split in wanted:
            # a source's own loader is the one API every datamodule shares; only its dataset is kept
            self.datasets[split] = ConcatDataset(
                [
                    RelabeledDataset(getattr(source, LOADERS[split])().dataset, k, offset)
                    for k, (source, offset) in enumerate(zip(self.sources, self.label_offsets()))
                ]
            )

    def split_dataset(self, split: str) -> Dataset:
        return self.datasets[split]
