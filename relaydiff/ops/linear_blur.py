"""CogView3's linear relay blur (SPEC 2b) as pure-PyTorch compositions.

``Blur_w(x) = x + (1 - m) w (L(x) - x)`` with ``L(x)`` the patch mean (``p x p`` box
downsample, nearest upsample) and ``w in [0, 1]`` the blur weight: in the patch-DCT basis the
factor is 1 on every patch's DC coefficient and ``(1 - m)(1 - w) + m`` on the others, so the
relay corruption and sampler step of SPEC 5/6 only need patch means, no transform.
:func:`linear_relay_corrupt` and :func:`linear_relay_step` have the signatures of
:func:`relaydiff.ops.relay_corrupt` and :func:`relaydiff.ops.relay_step` with the blur weight
``w`` in the place of the blur time ``tau``, and draw the same mixed noise (SPEC 3) from the
same seed. Images ``[B, C, H, W]`` (H, W multiples of ``patch_size``); half types are computed
in float32, float64 in float64; ``sigma``/``weight`` floats or per-sample ``[B]`` tensors.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _drawn
from . import _validate as V
from . import reference as R
from .api import _drawn_seed, mixed_noise   # _drawn_seed: seed=None while torch.compile traces


def _patches(x: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p)


def _patch_mean(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, C, H/p, 1, W/p, 1]``: broadcast against the patch view it is ``L(x)``
    (``avg_pool2d`` is several times faster than a mean over the view's patch axes)."""
    b, c, h, w = x.shape
    if x.numel() == 0:      # avg_pool2d refuses empty channel/spatial dimensions
        return x.new_zeros(b, c, h // p, 1, w // p, 1)
    return F.avg_pool2d(x, p).reshape(b, c, h // p, 1, w // p, 1)


def _col(v: torch.Tensor, dtype) -> torch.Tensor:
    """Per-sample ``[B]`` -> ``[B, 1, 1, 1, 1, 1]`` against the patch view."""
    return v.to(dtype).reshape(-1, 1, 1, 1, 1, 1)


def _check_at_most_one(w: torch.Tensor, weight, name: str) -> None:
    """``w``: the float64 ``[B]`` of ``weight``, already checked finite and non-negative."""
    if not V._tracing() and w.numel() and bool((w > 1).any()):
        got = weight.tolist() if isinstance(weight, torch.Tensor) else weight
        raise ValueError(f"{name} must be in [0, 1]; got {got}")


def _noise(x: torch.Tensor, cd, alpha, block_size, normalize, seed) -> torch.Tensor:
    # drawn in the compute dtype like the fused ops (a half-type draw would round the noise)
    return mixed_noise(x.new_empty(x.shape, dtype=cd), alpha, block_size, normalize, seed)


def _unused_draw(x: torch.Tensor, cd) -> torch.Tensor:
    """``0 * n`` for one normal ``n`` of a drawn seed, ``[1, 1, 1, 1, 1, 1]`` in ``cd``: a step
    without noise under torch.compile with ``seed=None``. Eager code draws (and ignores) a seed
    there too, so the compiled step must draw one, or every later draw from torch's generator
    differs; the product enters the result (exactly, ``n`` is finite) so that no compiler pass
    drops the draw as dead code."""
    n = _drawn.mixed_noise_drawn(x.new_empty((1, 1, 1, 1), dtype=cd), 0.0, 1, True)
    return (n * 0).reshape(1, 1, 1, 1, 1, 1)


def linear_blur(x: torch.Tensor, weight, patch_size: int = 4, min_scale: float = 1e-3) -> torch.Tensor:
    """``Blur_w(x) = x + (1 - m) w (L(x) - x)`` (SPEC 2b); ``weight = 1``, ``min_scale = 0`` give
    the nearest upsample of the box downsample. Differentiable in ``x``."""
    x, w, p, m = R.prep_blur(x, weight, patch_size, min_scale, blur_name="weight")
    _check_at_most_one(w, weight, "weight")
    cd = R.compute_dtype(x.dtype)
    xc = x.to(cd).contiguous()
    xp = _patches(xc, p)
    out = torch.lerp(xp, _patch_mean(xc, p).expand_as(xp), _col((1.0 - m) * w, cd))
    return out.reshape(x.shape).to(x.dtype)


def linear_relay_corrupt(x0: torch.Tensor, sigma, weight, patch_size: int = 4, alpha: float = 0.15,
                         block_size: int = 4, min_scale: float = 1e-3, normalize: bool = True,
                         seed: int | None = None) -> torch.Tensor:
    """The relay corruption with the linear blur (SPEC 2b, 5): ``x_t = Blur_w(x0) + sigma n``,
    ``n`` the mixed noise of ``seed`` (the noise :func:`relaydiff.ops.relay_corrupt` adds).
    ``weight`` ``w`` in [0, 1] stands where ``relay_corrupt`` takes ``tau``. Differentiable in ``x0``."""
    drawn = _drawn_seed(seed)
    x0, sig, w, p, a, s, m, nrm, sd = R.prep_corrupt(x0, sigma, weight, patch_size, alpha, block_size,
                                                     min_scale, normalize, 0 if drawn else seed,
                                                     blur_name="weight")
    sd = None if drawn else sd
    _check_at_most_one(w, weight, "weight")
    cd = R.compute_dtype(x0.dtype)
    xc = x0.to(cd).contiguous()
    c = (1.0 - m) * w
    # (1 - c) x0 + c L(x0) + sigma n, accumulated into the noise's buffer (no other full-size temporary)
    out = _patches(_noise(x0, cd, a, s, nrm, sd), p).mul_(_col(sig, cd))
    out.addcmul_(_patches(xc, p), _col(1.0 - c, cd)).addcmul_(_patch_mean(xc, p), _col(c, cd))
    return out.reshape(x0.shape).to(x0.dtype)


def linear_relay_step(x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next, weight, weight_next, *,
                      x_prop: torch.Tensor | None = None, denoised_prop: torch.Tensor | None = None,
                      s_noise: float = 0.2, patch_size: int = 4, alpha: float = 0.15, block_size: int = 4,
                      min_scale: float = 1e-3, normalize: bool = True, seed: int | None = None) -> torch.Tensor:
    """One relay sampler step (SPEC 6) with the linear blur's factors (SPEC 2b):

    ``x_n = A_h x + B_h y + L((1 - A_h) x + (gamma - 1 - B_h) y) + eta n`` with
    ``A_h = b_n + gamma (1 - b_c)``, ``B_h = gamma b_c - b_n``, ``b = (1 - m)(1 - w) + m`` the
    non-DC factor at ``weight``/``weight_next``, ``gamma = sqrt(1 - s^2) sigma_next / sigma``,
    ``eta = s sigma_next`` and ``y = x - denoised`` (Euler) or, with ``x_prop``/``denoised_prop``,
    ``y = sigma ((x - denoised)/sigma + (x_prop - denoised_prop)/sigma_next) / 2`` (Heun). The DC
    coefficients take ``A = 1``, ``B = gamma - 1``. ``n`` is the mixed noise of ``seed``, added
    only when ``s_noise > 0``, as in :func:`relaydiff.ops.relay_step`."""
    drawn = _drawn_seed(seed)
    (x, denoised, x_prop, denoised_prop, sig, sig_n, w_c, w_n, sn, p, a, s, m, nrm, sd) = R.prep_step(
        x, denoised, sigma, sigma_next, weight, weight_next, x_prop, denoised_prop, s_noise, patch_size,
        alpha, block_size, min_scale, normalize, 0 if drawn else seed, blur_names=("weight", "weight_next"))
    sd = None if drawn else sd
    _check_at_most_one(w_c, weight, "weight")
    _check_at_most_one(w_n, weight_next, "weight_next")

    # step factors in float64, as the fused op computes them
    gamma = math.sqrt(1.0 - sn * sn) * sig_n / sig
    b_c, b_n = 1.0 - (1.0 - m) * w_c, 1.0 - (1.0 - m) * w_n
    a_h, b_h = b_n + gamma * (1.0 - b_c), gamma * b_c - b_n

    cd = R.compute_dtype(x.dtype)
    xc = x.to(cd).contiguous()
    y = xc - denoised.to(cd)                                     # sigma * d
    if x_prop is not None:
        # sigma (d + d') / 2 = (y + (sigma / sigma_next) (x_prop - denoised_prop)) / 2
        r = (sig / sig_n).to(cd).reshape(-1, 1, 1, 1)
        y = 0.5 * torch.addcmul(y, x_prop.to(cd) - denoised_prop.to(cd), r)
    # the DC part as one small [B, C, H/p, 1, W/p, 1] term: L((1 - A_h) x + (gamma - 1 - B_h) y)
    mean = _col(1.0 - a_h, cd) * _patch_mean(xc, p) + _col(gamma - 1.0 - b_h, cd) * _patch_mean(y, p)
    xp = _patches(xc, p)
    if sn != 0.0:   # accumulate into the noise's buffer: one full-size allocation fewer
        out = _patches(_noise(x, cd, a, s, nrm, sd), p).mul_(_col(sn * sig_n, cd)).addcmul_(xp, _col(a_h, cd))
    elif drawn:
        out = xp * (_col(a_h, cd) + _unused_draw(x, cd))
    else:
        out = xp * _col(a_h, cd)
    out.addcmul_(_patches(y, p), _col(b_h, cd)).add_(mean)
    return out.reshape(x.shape).to(x.dtype)
