"""Image tensors <-> uint8 <-> PNG files (docs/CONTRACTS.md, "Images"): the library's one
implementation of the conversion (``relaydiff.data`` and ``relaydiff.metrics`` use it).

Floats are ``[B, C, H, W]`` in [-1, 1]; ``u8 = clamp(round((x + 1) * 127.5), 0, 255)`` and
``x = u8 / 127.5 - 1``. C is 1 (grey) or 3 (RGB).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def float_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``u8 = clamp(round((x + 1) * 127.5), 0, 255)``: floats in [-1, 1] -> uint8, same layout."""
    return ((x.detach().to(torch.float32) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def uint8_to_float(u8: torch.Tensor) -> torch.Tensor:
    """``x = u8 / 127.5 - 1``: uint8 -> float32 in [-1, 1], same layout."""
    return u8.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[B, C, H, W]`` floats in [-1, 1] -> ``[B, H, W, C]`` uint8 (for PIL)."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, C, H, W] with C = 1 or 3; got shape {tuple(x.shape)}")
    return float_to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(a: np.ndarray) -> torch.Tensor:
    """``[H, W, C]`` or ``[B, H, W, C]`` uint8 -> float32 ``[B, C, H, W]`` in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if t.dim() == 3:
        t = t[None]
    return uint8_to_float(t.permute(0, 3, 1, 2))


def save_png(image: np.ndarray, path) -> None:
    """Write one ``[H, W, C]`` uint8 image; the file appears complete or not at all."""
    from relaydiff.models.checkpoint import atomic_write
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image, "L" if image.shape[2] == 1 else "RGB")
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


def center_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> its centre ``min(H, W)`` square resized to ``size x size``
    (Lanczos: the resize itself should add no aliasing to the spectrum)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3]; got {image.dtype} {list(image.shape)}")
    h, w = image.shape[:2]
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    crop = Image.fromarray(np.ascontiguousarray(image[top:top + m, left:left + m]))
    return np.asarray(crop if m == size else crop.resize((size, size), Image.LANCZOS))


def load_image(path: str, channels: int = 3, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image file as ``[H, W, channels]`` uint8 (grey or RGB; alpha is dropped),
    resized to ``size = (H, W)`` with a Lanczos filter if given."""
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if size is not None and (im.height, im.width) != tuple(size):
            im = im.resize((size[1], size[0]), Image.LANCZOS)
        a = np.asarray(im)
    return a[:, :, None] if a.ndim == 2 else a


def list_images(folder: str) -> list[str]:
    """The image files directly inside ``folder``, sorted by name."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, f)))


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile ``[B, C, H, W]`` images into one ``[rows*(H+pad)+pad, ...]`` uint8 image, ``nrow``
    per row (default about square), separated by black ``pad``-pixel borders."""
    imgs = to_uint8(x)
    b, h, w, c = imgs.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = max(1, math.ceil(b / nrow))
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(b):
        r, q = divmod(i, nrow)
        y, xx = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, xx:xx + w] = imgs[i]
    return grid
