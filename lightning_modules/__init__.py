from .baseline_classifier import BaselineClassifier
from .diffusion_classifier import DiffusionClassifier
from .stable_diffusion import StableDiffusionClassifier

__all__ = ["BaselineClassifier", "DiffusionClassifier", "StableDiffusionClassifier"]
