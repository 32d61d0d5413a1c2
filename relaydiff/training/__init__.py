"""relaydiff.training: ``TrainConfig`` and ``train(cfg)`` for the base and relay stages."""
from .config import ConfigError, TrainConfig
from .loop import train

__all__ = ["ConfigError", "TrainConfig", "train"]
