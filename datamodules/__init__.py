from datamodules.base import DataError
from datamodules.chexpert import CheXpertDataModule
from datamodules.combined import CombinedDataModule
from datamodules.csv_folder import CSVDataModule
from datamodules.isic import ISICDataModule
from datamodules.medmnist import MedMNISTDataModule
from datamodules.synthetic import SyntheticDataModule

__all__ = [
    "DataError",
    "CheXpertDataModule",
    "CombinedDataModule",
    "CSVDataModule",
    "ISICDataModule",
    "MedMNISTDataModule",
    "SyntheticDataModule",
]
