from .diffusion_classifier import DiffusionClassifier

__all__ = ["DiffusionClassifier"]
