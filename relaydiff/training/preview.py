"""Sample grids written while training, to watch a run: deliberately small samplers.

These are previews, not the library's samplers (``relaydiff.sampling`` has the full EDM and
relay samplers with churn, CFG and Heun corrections): a deterministic 18-step Heun EDM
sampler for the base stage (SPEC 7 without churn), and for the relay stage the Euler relay
step (SPEC 6, ``s = 0``) started from box-downsampled real images. Noise comes from fixed
seeds, so successive grids show the same samples improving, and torch's global RNG is not
touched (a resumed run stays identical to an uninterrupted one).
"""
from __future__ import annotations

import math
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

from relaydiff import ops
from relaydiff.config import RelayConfig
from relaydiff.data import float_to_uint8
from relaydiff.models.checkpoint import atomic_write


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """``sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho`` then 0 (SPEC 4), float64."""
    i = torch.arange(n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + i / max(n - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


@torch.no_grad()
def base_samples(net, n: int, labels: torch.Tensor | None, seed: int = 0, steps: int = 18) -> torch.Tensor:
    """Deterministic Heun EDM samples ``[n, C, R, R]`` from noise of ``seed``."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, net.img_channels, net.img_resolution, net.img_resolution)
    dev = next(net.parameters()).device
    sig = karras_sigmas(steps, 0.002, 80.0)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dev) * sig[0]
    denoise = lambda x, s: net(x.float(), torch.full((n,), float(s), device=dev), labels).double()  # noqa: E731
    for s, s_next in zip(sig[:-1], sig[1:]):
        d = (x - denoise(x, s)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            x_next = x + (s_next - s) * 0.5 * (d + (x_next - denoise(x_next, s_next)) / s_next)
        x = x_next
    return x.float()


@torch.no_grad()
def relay_samples(net, high: torch.Tensor, labels: torch.Tensor | None, relay: RelayConfig, seed: int = 0,
                  steps: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Relay (stage 2) samples conditioned on ``high`` ``[n, C, R, R]`` box-downsampled by
    the patch size. Returns ``(nearest-upsampled low-res, samples)``, both ``[n, C, R, R]``."""
    p, n = relay.patch_size, high.shape[0]
    low_up = F.interpolate(F.avg_pool2d(high, p), scale_factor=p, mode="nearest")
    sig = karras_sigmas(steps, 0.002, 80.0)
    sig = torch.cat([sig[:-1][sig[:-1] < relay.sigma_max], sig[-1:]])
    kw = relay.op_kwargs()
    x = low_up + float(sig[0]) * ops.mixed_noise(low_up, alpha=kw["alpha"], block_size=kw["block_size"],
                                                  normalize=kw["normalize"], seed=seed)
    for i, (s, s_next) in enumerate(zip(sig[:-1].tolist(), sig[1:].tolist())):
        denoised = net(x, torch.full((n,), s, device=x.device), labels)
        if s_next == 0:
            x = denoised
        else:
            x = ops.relay_step(x, denoised, s, s_next, float(relay.tau_of_sigma(s)), float(relay.tau_of_sigma(s_next)),
                               s_noise=0.0, seed=seed + 1 + i, **kw)
    return low_up, x


def save_grid(path: pathlib.Path, rows: list[torch.Tensor]) -> None:
    """Write images ``[n, C, H, W]`` in [-1, 1] as a PNG; each tensor of ``rows`` is one or more
    rows of ``ceil(sqrt(n))`` (one row per tensor when several are given)."""
    from PIL import Image
    cols = rows[0].shape[0] if len(rows) > 1 else math.ceil(math.sqrt(rows[0].shape[0]))
    imgs = float_to_uint8(torch.cat(rows).cpu())
    n, c, h, w = imgs.shape
    grid = torch.zeros(math.ceil(n / cols) * cols, c, h, w, dtype=torch.uint8)
    grid[:n] = imgs
    grid = grid.reshape(-1, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(-1, cols * w, c)
    arr = np.ascontiguousarray(grid.numpy())
    image = Image.fromarray(arr[:, :, 0] if c == 1 else arr)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
