"""relaydiff.training: ``TrainConfig`` and ``train(cfg)`` for the base and relay stages."""
from .augment import AUGMENT_DIM, GeometricAugment
from .config import ConfigError, TrainConfig
from .loop import train

__all__ = ["AUGMENT_DIM", "ConfigError", "GeometricAugment", "TrainConfig", "train"]
