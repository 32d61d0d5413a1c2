"""Full-reference image quality for super-resolution against ground truth: PSNR and SSIM.

SSIM is Wang et al. (2004) as scikit-image computes it with ``gaussian_weights=True``: an
11 x 11 Gaussian window (sigma 1.5), population (co)variances, ``C1 = (0.01 L)^2``,
``C2 = (0.03 L)^2`` with ``L`` the data range, the map averaged away from a 5-pixel border
(where the window would leave the image) and over channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a tensor [B, C, H, W]; got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape; got {tuple(x.shape)} and {tuple(y.shape)}")
    return x.double(), y.double()


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """``10 log10(L^2 / MSE)`` per image ``[B]`` (``inf`` where identical); ``L = 2`` for [-1, 1] images."""
    x, y = _pair(x, y)
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(sigma: float = 1.5, radius: int = 5) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-t * t / (2 * sigma * sigma))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per image ``[B]`` of ``x``, ``y`` ``[B, C, H, W]`` (H, W >= 11)."""
    x, y = _pair(x, y)
    radius = int(3.5 * sigma + 0.5)             # scikit-image's truncate = 3.5
    if min(x.shape[-2:]) < 2 * radius + 1:
        raise ValueError(f"images must be at least {2 * radius + 1} px for SSIM; got {tuple(x.shape[-2:])}")
    g = _gaussian_window(sigma, radius)
    c = x.shape[1]

    def blur(t):    # separable 'valid' filtering = the interior scikit-image keeps
        t = F.conv2d(t, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        return F.conv2d(t, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)
