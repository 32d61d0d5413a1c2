"""Noise-level grids for the samplers (SPEC 4, last bullet).

A grid is a float64 tensor ``[N + 1]`` of strictly decreasing noise levels, usually
ending with a 0 (the clean image). Samplers walk it pairwise.
"""
from __future__ import annotations

import math

import torch


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                  device=None) -> torch.Tensor:
    """The EDM grid (Karras et al. 2022, eq. 5) with a final 0, float64 ``[n + 1]``:

    ``sigma_i = (smax^(1/rho) + i/(n-1) * (smin^(1/rho) - smax^(1/rho)))^rho``, ``i = 0..n-1``.

    ``n = 1`` gives ``[sigma_max, 0]``. Larger ``rho`` puts more levels at low noise.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer; got {n!r}")
    if not (0.0 < sigma_min <= sigma_max < math.inf):
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf; got sigma_min={sigma_min!r}, "
                         f"sigma_max={sigma_max!r}")
    if not (rho > 0.0 and math.isfinite(rho)):
        raise ValueError(f"rho must be positive and finite; got {rho!r}")
    ramp = torch.arange(n, dtype=torch.float64, device=device) / max(n - 1, 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def truncate_sigmas(sigmas: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Drop the leading levels ``>= sigma_max`` (the relay stage starts below the
    truncation, SPEC 4): ``karras_sigmas(200, 0.008, 80, rho=100)`` cut at 0.9 keeps 100
    levels plus the final 0. Raises if nothing but the final 0 would remain."""
    sigmas = check_sigmas(sigmas)
    keep = int((sigmas >= sigma_max).sum())
    out = sigmas[keep:]
    if out.numel() == 0 or float(out[0]) == 0.0:
        raise ValueError(f"truncating at sigma_max={sigma_max} leaves no noise level of the grid "
                         f"(largest level {float(sigmas[0]):.4g})")
    return out


def check_sigmas(sigmas, strict: bool = True) -> torch.Tensor:
    """A 1-D grid of at least two finite, non-negative, strictly decreasing levels as float64.
    ``strict=False`` also admits repeated levels (non-increasing, 0 only as the last level):
    EDM's grids rounded to a model's discrete levels (iDDPM) repeat some."""
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 levels; got shape {tuple(sigmas.shape)}")
    s = sigmas.detach().to(torch.float64)
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError(f"sigmas must be finite and non-negative; got {s.tolist()}")
    if strict and not bool((s[1:] < s[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing")
    if not strict and (not bool((s[1:] <= s[:-1]).all()) or bool((s[:-1] == 0).any())):
        raise ValueError("sigmas must be non-increasing, with 0 only as the last level")
    return s
