"""Data: each publisher's table read into images, labels and patient-level splits (table_datamodule.py,
table_reading.py), image files decoded (decoding.py, dicom.py), the loaders every datamodule shares (loaders.py) and its
global batch (batch_plan.py), new images to classify (images.py), the embedded synthetic data, the
baselines' training augmentations and the corruptions of the out-of-distribution benchmark."""

from datamodules.chexpert import CheXpertDataModule
from datamodules.combined import CombinedDataModule
from datamodules.csv_folder import CSVDataModule
from datamodules.errors import DataError
from datamodules.images import ImagesDataModule
from datamodules.isic import ISICDataModule
from datamodules.medmnist import MedMNISTDataModule
from datamodules.synthetic import SyntheticDataModule

__all__ = [
    "DataError",
    "CheXpertDataModule",
    "CombinedDataModule",
    "CSVDataModule",
    "ImagesDataModule",
    "ISICDataModule",
    "MedMNISTDataModule",
    "SyntheticDataModule",
]
