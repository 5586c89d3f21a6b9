from datamodules.base import DataError
from datamodules.chexpert import CheXpertDataModule
from datamodules.csv_folder import CSVDataModule
from datamodules.isic import ISICDataModule
from datamodules.medmnist import MedMNISTDataModule
from datamodules.synthetic import SyntheticDataModule

__all__ = ["DataError", "CheXpertDataModule", "CSVDataModule", "ISICDataModule", "MedMNISTDataModule", "SyntheticDataModule"]
