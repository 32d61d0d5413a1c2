"""Sliced Wasserstein distance on Laplacian-pyramid patches: the weight-free metric of ProGAN
(Karras et al. 2018, App. D), for quick checks and CI.

Per pyramid level (full resolution down to 16 px): ``nhoods`` random 7 x 7 x 3 patches per
image (or all of them) become 147-d descriptors; each set's descriptors are normalised per colour channel
(its own mean and std); the distance between the two sets is the mean over ``repeats x
directions`` random unit directions of the 1-d Wasserstein-1 distance between the projected
descriptors (sorted and compared). Reported x 1e3 per level, and their mean.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MIN_LEVEL_SIZE = 16
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _gauss(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """5 x 5 binomial filter, mirrored borders (``d c b | a b c d``), per channel."""
    k = (torch.outer(_BINOMIAL, _BINOMIAL) * gain).to(x)
    c = x.shape[1]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k.expand(c, 1, 5, 5), groups=c)


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    return _gauss(x)[:, :, ::2, ::2]


def pyr_up(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    up = x.new_zeros(b, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return _gauss(up, gain=4.0)


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """``[x - up(down(x)), ..., coarsest]``: ``levels`` tensors, the first at the input size."""
    pyramid = [x]
    for _ in range(1, levels):
        pyramid.append(pyr_down(pyramid[-1]))
        pyramid[-2] = pyramid[-2] - pyr_up(pyramid[-1])
    return pyramid


def num_levels(size: int) -> int:
    """Levels from ``size`` halving down to 16 px (ProGAN's resolutions list)."""
    n = 0
    while size >= MIN_LEVEL_SIZE:
        n, size = n + 1, size // 2
    return n


def patch_descriptors(level: torch.Tensor, nhoods: int | None, generator: torch.Generator,
                      size: int = 7) -> torch.Tensor:
    """``nhoods`` random ``size x size`` patches per image of ``level [B, C, H, W]`` ->
    ``[B * nhoods, C, size, size]``; ``nhoods=None``: every patch that fits, in raster order
    (no randomness: the set does not depend on the images' order or on ``generator``)."""
    b, c, h, w = level.shape
    r = size // 2
    if nhoods is None:
        cols = F.unfold(level.cpu(), size)                                  # [B, C*size*size, L]
        return cols.transpose(1, 2).reshape(-1, c, size, size).contiguous()
    y = torch.randint(r, h - r, (b * nhoods,), generator=generator)
    x = torch.randint(r, w - r, (b * nhoods,), generator=generator)
    img = torch.arange(b).repeat_interleave(nhoods)
    off = torch.arange(-r, r + 1)
    rows = (y[:, None] + off)[:, :, None]               # [N, size, 1]
    cols = (x[:, None] + off)[:, None, :]               # [N, 1, size]
    patches = level.cpu()[img[:, None, None], :, rows, cols]   # [N, size, size, C]
    return patches.permute(0, 3, 1, 2).contiguous()


def normalize_descriptors(desc: torch.Tensor) -> torch.Tensor:
    """``[N, C, s, s]`` -> ``[N, C*s*s]`` with zero mean and unit std per channel over the set."""
    desc = desc - desc.mean(dim=(0, 2, 3), keepdim=True)
    desc = desc / desc.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
    return desc.reshape(desc.shape[0], -1)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, repeats: int = 4, directions: int = 128,
                       generator: torch.Generator | None = None) -> float:
    """Mean over random unit directions ``d`` of ``W1(a.d, b.d)`` for point sets ``a``, ``b``
    ``[N, D]`` of equal size (sorted projections compared one to one)."""
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must be [N, D] of the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    results = []
    for _ in range(repeats):
        d = torch.randn(a.shape[1], directions, generator=generator, dtype=torch.float64)
        d = (d / d.norm(dim=0, keepdim=True)).to(a.dtype)
        # numpy's sort is several times faster than torch's along a strided CPU axis
        pa = np.sort((a @ d).cpu().numpy(), axis=0)
        pb = np.sort((b @ d).cpu().numpy(), axis=0)
        results.append(np.abs(pa - pb).mean(dtype=np.float64))
    return float(np.mean(results))


def _as_float(images: torch.Tensor, name: str) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be [N, 3, H, W]; got shape {tuple(images.shape)}")
    return images.float()


def swd(images_a, images_b, *, nhoods: int | None = 128, repeats: int = 4, directions: int = 128,
        seed: int = 0, batch_size: int = 64) -> dict[str, float]:
    """SWD x 1e3 between two image sets, per pyramid level and their mean.

    ``images_*``: tensors ``[N, 3, H, W]`` (any value range: each set is normalised) or
    iterables of such batches; both sets need the same size ``H, W >= 16`` and the same N
    (the sorted-projection comparison matches descriptors one to one). ``nhoods``: random
    neighbourhoods per image and level (ProGAN's 128), or ``None`` for every neighbourhood:
    for small sets (a few dozen images), where 128 random ones leave the score with a
    sampling spread of several units and a floor well above 0 between a set and itself
    reordered; ``None`` gives exactly 0 there and does not depend on the images' order.
    Returns ``{"swd_<size>": ..., "swd_mean": ...}``. Deterministic for a given ``seed``."""
    if nhoods is not None and (isinstance(nhoods, bool) or not isinstance(nhoods, int) or nhoods < 1):
        raise ValueError(f"nhoods must be a positive int or None (every neighbourhood); got {nhoods!r}")
    gen = torch.Generator().manual_seed(seed)
    descs = []
    for name, images in (("images_a", images_a), ("images_b", images_b)):
        batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)] \
            if isinstance(images, torch.Tensor) else images
        per_level: list[list[torch.Tensor]] = []
        shape, count = None, 0
        for batch in batches:
            batch = _as_float(batch, name)
            count += batch.shape[0]
            if shape is None:
                shape = tuple(batch.shape[2:])
                if min(shape) < MIN_LEVEL_SIZE:
                    raise ValueError(f"{name}: images must be at least {MIN_LEVEL_SIZE} px; got {shape}")
                per_level = [[] for _ in range(num_levels(min(shape)))]
                step = 1 << (len(per_level) - 1)
                if shape[0] % step or shape[1] % step:
                    raise ValueError(f"{name}: H and W must be multiples of {step} for a "
                                     f"{len(per_level)}-level pyramid; got {shape}")
            elif tuple(batch.shape[2:]) != shape:
                raise ValueError(f"{name}: all images must have one size; got {shape} and {tuple(batch.shape[2:])}")
            for lvl, level in enumerate(laplacian_pyramid(batch, len(per_level))):
                per_level[lvl].append(patch_descriptors(level, nhoods, gen))
        if shape is None:
            raise ValueError(f"{name} holds no images")
        descs.append((shape, count, [normalize_descriptors(torch.cat(d)) for d in per_level]))
    (shape_a, count_a, da), (shape_b, count_b, db) = descs
    if shape_a != shape_b:
        raise ValueError(f"images_a and images_b must have the same size; got {shape_a} and {shape_b}")
    if count_a != count_b:
        raise ValueError(f"images_a and images_b must hold the same number of images; got {count_a} and {count_b}")
    out = {}
    for lvl, (a, b) in enumerate(zip(da, db)):
        out[f"swd_{min(shape_a) >> lvl}"] = 1e3 * sliced_wasserstein(a, b, repeats, directions, gen)
    out["swd_mean"] = sum(out.values()) / len(out)
    return out
