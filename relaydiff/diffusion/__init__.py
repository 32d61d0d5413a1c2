"""relaydiff.diffusion: training losses (stage 1 EDM and the relay stage)."""
from .losses import EDMLoss, LowResEDMLoss, RelayLoss, drop_labels, loss_weight

__all__ = ["EDMLoss", "LowResEDMLoss", "RelayLoss", "drop_labels", "loss_weight"]
