"""The best plain-PyTorch compositions of the relay ops: the baseline the fused kernels
are measured against (einsum patch DCT, circular pad + avg_pool block noise, torch.randn).
They use torch's own generator, so their noise differs from relaydiff's; only their
speed is of interest here."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from relaydiff.ops.reference import blur_factors_impl, dct_matrix, step_factors


def _dct(x, m, p, inverse=False):
    b, c, h, w = x.shape
    xp = x.reshape(b, c, h // p, p, w // p, p)
    eq = "kn,bchkwl,lm->bchnwm" if inverse else "kn,bchnwm,lm->bchkwl"
    return torch.einsum(eq, m, xp, m).reshape(x.shape)


def _scale(u, f, p):
    b, c, h, w = u.shape
    return (u.reshape(b, c, h // p, p, w // p, p) * f[:, None, None, :, None, :]).reshape(u.shape)


def mixed_noise(x, alpha=0.15, s=4):
    e = torch.randn_like(x)
    g = torch.randn_like(x)
    block = F.avg_pool2d(F.pad(g, (s - 1, 0, s - 1, 0), mode="circular"), s, stride=1) * s
    return (e + alpha * block) / math.sqrt(1 + alpha * alpha)


def corrupt(x0, sigma, tau, p=4, alpha=0.15, s=4, m=1e-3):
    mat = dct_matrix(p, x0.dtype, x0.device)
    a = blur_factors_impl(tau, p, m).to(x0.dtype)
    blurred = _dct(_scale(_dct(x0, mat, p), a, p), mat, p, inverse=True)
    return blurred + sigma.to(x0.dtype)[:, None, None, None] * mixed_noise(x0, alpha, s)


def step(x, den, sigma, sigma_next, tau, tau_next, s_noise=0.2, p=4, alpha=0.15, s=4, m=1e-3,
         x_prop=None, den_prop=None):
    """Euler relay step; with ``x_prop, den_prop`` the Heun correction (slope averaged)."""
    mat = dct_matrix(p, x.dtype, x.device)
    A, B, eta = step_factors(sigma, sigma_next, tau, tau_next, s_noise, p, m)
    y = x - den
    if x_prop is not None:
        ratio = (sigma / sigma_next).to(x.dtype)[:, None, None, None]
        y = 0.5 * y + (0.5 * ratio) * (x_prop - den_prop)
    u = _scale(_dct(x, mat, p), A.to(x.dtype), p) + _scale(_dct(y, mat, p), B.to(x.dtype), p)
    return _dct(u, mat, p, inverse=True) + eta.to(x.dtype)[:, None, None, None] * mixed_noise(x, alpha, s)


def dct(x, p=4):
    return _dct(x, dct_matrix(p, x.dtype, x.device), p)
