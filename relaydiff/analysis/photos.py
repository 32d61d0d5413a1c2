"""Photos -> batches for the frequency study: centre square crop, antialiased resize."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from relaydiff.images import center_square


def photo_batch(images, size: int) -> torch.Tensor:
    """An iterable of uint8 ``[H, W, 3]`` photos -> float64 ``[B, 3, size, size]`` in [-1, 1]."""
    squares = [center_square(np.asarray(im), size) for im in images]
    if not squares:
        raise ValueError("no images given")
    return _to_batch(squares)


def _to_batch(squares: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(squares)).permute(0, 3, 1, 2).to(torch.float64) / 127.5 - 1.0


def photo_batches(images, size: int, batch_size: int = 64) -> Iterator[torch.Tensor]:
    """:func:`photo_batch` in pieces: yields float64 ``[b, 3, size, size]`` batches of at most
    ``batch_size`` photos, reading ``images`` (any iterable, e.g. a generator of decoded files)
    only as far as the next batch needs, so at most one batch is held at a time. Their
    concatenation equals ``photo_batch(images, size)``. Raises ``ValueError`` when there are no
    images (after the iterable is exhausted)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    return _batches(images, size, batch_size)


def _batches(images, size: int, batch_size: int) -> Iterator[torch.Tensor]:
    squares, any_image = [], False
    for im in images:
        squares.append(center_square(np.asarray(im), size))
        if len(squares) == batch_size:
            yield _to_batch(squares)
            squares, any_image = [], True
    if squares:
        yield _to_batch(squares)
    elif not any_image:
        raise ValueError("no images given")
