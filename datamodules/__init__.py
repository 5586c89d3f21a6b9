"""Data: each publisher's table read into images, labels and patient-level splits (base.py), new images
to classify (images.py), DICOM reading (dicom.py) and the baselines' training augmentations."""

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
