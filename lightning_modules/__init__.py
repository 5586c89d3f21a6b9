from .baseline_classifier import BaselineClassifier
from .diffusion_classifier import DiffusionClassifier

__all__ = ["BaselineClassifier", "DiffusionClassifier"]
