"""Sample grids written while training, to watch a run: small, fixed settings of the
library's samplers (``relaydiff.sampling``).

Base stage: a deterministic 18-step Heun EDM sampler (SPEC 7 without churn) from fixed
noise of the run's kind (white or block noise). Relay stage: the relay sampler (SPEC 6,
``s = 0``) on a 20-level grid truncated at the relay schedule's top, started from
box-downsampled real images. Noise comes from fixed seeds, so successive grids show the
same samples improving, and torch's global RNG is not touched (a resumed run stays
identical to an uninterrupted one).
"""
from __future__ import annotations

import math
import pathlib

import torch
import torch.nn.functional as F

from relaydiff.config import NoiseConfig, RelayConfig
from relaydiff.images import image_grid, save_png
from relaydiff.sampling import (karras_sigmas, nearest_upsample, relay_init, sample_edm, sample_relay,
                                truncate_sigmas)


@torch.no_grad()
def base_samples(net, n: int, labels: torch.Tensor | None, seed: int = 0, steps: int = 18,
                 noise: NoiseConfig | None = None) -> torch.Tensor:
    """Deterministic Heun EDM samples ``[n, C, R, R]`` from noise of ``seed``, of the kind
    ``noise`` the model was trained with (``None``: white)."""
    noise = NoiseConfig.of(noise)
    shape = (n, net.img_channels, net.img_resolution, net.img_resolution)
    dev = next(net.parameters()).device
    sig = karras_sigmas(steps, 0.002, 80.0)
    x = (noise.draw(torch.empty(shape, dtype=torch.float64), seed) * sig[0]).float().to(dev)
    return sample_edm(net, x, sig, class_labels=labels, noise=noise, seed=seed, disable=True)


@torch.no_grad()
def relay_samples(net, high: torch.Tensor, labels: torch.Tensor | None, relay: RelayConfig, seed: int = 0,
                  steps: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Relay (stage 2) samples conditioned on ``high`` ``[n, C, R, R]`` box-downsampled by
    the patch size. Returns ``(nearest-upsampled low-res, samples)``, both ``[n, C, R, R]``."""
    p = relay.patch_size
    low = F.avg_pool2d(high, p)
    sig = truncate_sigmas(karras_sigmas(steps, 0.002, 80.0), relay.sigma_max)
    x = relay_init(low, float(sig[0]), relay, seed=seed)
    out = sample_relay(net, x, sig, relay, class_labels=labels, s_noise=0.0, seed=seed + 1, disable=True)
    return nearest_upsample(low, p), out


def save_grid(path: pathlib.Path, rows: list[torch.Tensor]) -> None:
    """Write images ``[n, C, H, W]`` in [-1, 1] as a PNG; each tensor of ``rows`` is one or more
    rows of ``ceil(sqrt(n))`` (one row per tensor when several are given)."""
    cols = rows[0].shape[0] if len(rows) > 1 else math.ceil(math.sqrt(rows[0].shape[0]))
    save_png(image_grid(torch.cat(rows).cpu(), nrow=cols, pad=0), path)
