from datamodules.synthetic import SyntheticDataModule

__all__ = ["SyntheticDataModule"]
