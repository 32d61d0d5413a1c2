"""relaydiff.data: image datasets and the resumable sample order used for training."""
from relaydiff.images import float_to_uint8, uint8_to_float

from .dataset import IMAGE_EXTENSIONS, ImageDataset, InfiniteSampler

__all__ = ["IMAGE_EXTENSIONS", "ImageDataset", "InfiniteSampler", "float_to_uint8", "uint8_to_float"]
