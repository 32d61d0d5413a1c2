"""Photos -> a batch for the frequency study: centre square crop, antialiased resize."""
from __future__ import annotations

import numpy as np
import torch

from relaydiff.images import center_square


def photo_batch(images, size: int) -> torch.Tensor:
    """An iterable of uint8 ``[H, W, 3]`` photos -> float64 ``[B, 3, size, size]`` in [-1, 1]."""
    squares = [center_square(np.asarray(im), size) for im in images]
    if not squares:
        raise ValueError("no images given")
    return torch.from_numpy(np.stack(squares)).permute(0, 3, 1, 2).to(torch.float64) / 127.5 - 1.0
