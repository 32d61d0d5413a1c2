"""Photos -> a batch for the frequency study: centre square crop, antialiased resize."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def center_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> its centre ``min(H, W)`` square resized to ``size x size``
    (Lanczos: the resize itself should add no aliasing to the spectrum)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3]; got {image.dtype} {list(image.shape)}")
    h, w = image.shape[:2]
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    crop = Image.fromarray(np.ascontiguousarray(image[top:top + m, left:left + m]))
    return np.asarray(crop.resize((size, size), Image.LANCZOS))


def photo_batch(images, size: int) -> torch.Tensor:
    """An iterable of uint8 ``[H, W, 3]`` photos -> float64 ``[B, 3, size, size]`` in [-1, 1]."""
    squares = [center_square(np.asarray(im), size) for im in images]
    if not squares:
        raise ValueError("no images given")
    return torch.from_numpy(np.stack(squares)).permute(0, 3, 1, 2).to(torch.float64) / 127.5 - 1.0
