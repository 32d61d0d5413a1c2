"""relaydiff.data: image datasets and the resumable sample order used for training."""
from .dataset import IMAGE_EXTENSIONS, ImageDataset, InfiniteSampler, float_to_uint8, uint8_to_float

__all__ = ["IMAGE_EXTENSIONS", "ImageDataset", "InfiniteSampler", "float_to_uint8", "uint8_to_float"]
