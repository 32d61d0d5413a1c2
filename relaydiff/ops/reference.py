"""Pure-PyTorch reference twins of every relaydiff op.

Each public function here has the signature of its counterpart in ``relaydiff.ops`` and
computes the same thing with plain PyTorch: it is the test oracle for the C++/CUDA
kernels and the fallback when the extension is not built. The ``*_impl`` functions take
the already-normalised arguments of the op schemas in ``csrc/ops.cpp`` (per-sample
``sigma``/``tau`` as float64 ``[B]`` tensors, an integer seed).

Math: ``shared/SPEC.md`` sections 1-3 and 6. Half-precision inputs are computed in
float32 and rounded once at the end, like the kernels.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import _validate as V
from ._philox import STREAM_BLOCK, STREAM_WHITE, philox_normal


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def _dct_matrix_cpu(p: int) -> torch.Tensor:
    k = torch.arange(p, dtype=torch.float64)[:, None]
    n = torch.arange(p, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * n + 1) * k / (2 * p)) * math.sqrt(2.0 / p)
    c[0] = math.sqrt(1.0 / p)
    return c


def dct_matrix(p: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``C[k, n] = s_k cos(pi (2n+1) k / (2p))`` (SPEC 1)."""
    return _dct_matrix_cpu(p).to(dtype=dtype, device=device)


def _patches(x: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p)


def _patch_transform(x: torch.Tensor, p: int, inverse: bool) -> torch.Tensor:
    cd = compute_dtype(x.dtype)
    m = dct_matrix(p, cd, x.device)
    xp = _patches(x.to(cd), p)
    if inverse:   # X = C^T U C
        y = torch.einsum("kn,bchkwl,lm->bchnwm", m, xp, m)
    else:         # U = C X C^T
        y = torch.einsum("kn,bchnwm,lm->bchkwl", m, xp, m)
    return y.reshape(x.shape).to(x.dtype)


def _scale_coefficients(u: torch.Tensor, factors: torch.Tensor, p: int) -> torch.Tensor:
    """Multiply coefficient (k, l) of every patch of sample b by ``factors[b, k, l]``."""
    return (_patches(u, p) * factors[:, None, None, :, None, :]).reshape(u.shape)


# ---------------------------------------------------------------- implementations

def blur_factors_impl(tau: torch.Tensor, patch_size: int, min_scale: float) -> torch.Tensor:
    p = patch_size
    k = torch.arange(p, dtype=tau.dtype, device=tau.device)
    freq = (k[:, None] ** 2 + k[None, :] ** 2) * (math.pi ** 2 / p ** 2)
    return (1.0 - min_scale) * torch.exp(-freq * tau[..., None, None]) + min_scale


def patch_dct_impl(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    return _patch_transform(x, patch_size, inverse=False)


def patch_idct_impl(u: torch.Tensor, patch_size: int) -> torch.Tensor:
    return _patch_transform(u, patch_size, inverse=True)


def patch_blur_impl(x, tau, patch_size, min_scale):
    cd = compute_dtype(x.dtype)
    a = blur_factors_impl(tau, patch_size, min_scale).to(cd)
    u = _patch_transform(x.to(cd), patch_size, inverse=False)
    return _patch_transform(_scale_coefficients(u, a, patch_size), patch_size, inverse=True).to(x.dtype)


def _normal_field(like: torch.Tensor, seed: int, stream: int, dtype) -> torch.Tensor:
    return philox_normal(like.numel(), seed, stream, like.device, dtype).reshape(like.shape)


def _box_sum(g: torch.Tensor, s: int) -> torch.Tensor:
    """``out[y, x] = sum_{a, b < s} g[(y - a) mod H, (x - b) mod W]`` (circular)."""
    if g.numel() == 0 or s == 1:
        return g.clone()
    padded = F.pad(g, (s - 1, 0, s - 1, 0), mode="circular")
    return F.avg_pool2d(padded, s, stride=1) * (s * s)


def block_noise_impl(like, block_size, seed):
    cd = compute_dtype(like.dtype)
    g = _normal_field(like, seed, STREAM_BLOCK, cd)
    return (_box_sum(g, block_size) / block_size).to(like.dtype)


def _mixed(like, alpha, block_size, normalize, seed, cd):
    n = _normal_field(like, seed, STREAM_WHITE, cd)
    if alpha != 0.0:
        g = _normal_field(like, seed, STREAM_BLOCK, cd)
        n = n + alpha * (_box_sum(g, block_size) / block_size)
    if normalize:
        n = n / math.sqrt(1.0 + alpha * alpha)
    return n


def mixed_noise_impl(like, alpha, block_size, normalize, seed):
    return _mixed(like, alpha, block_size, normalize, seed, compute_dtype(like.dtype)).to(like.dtype)


def relay_corrupt_impl(x0, sigma, tau, patch_size, alpha, block_size, min_scale, normalize, seed):
    cd = compute_dtype(x0.dtype)
    blurred = patch_blur_impl(x0.to(cd), tau, patch_size, min_scale)
    n = _mixed(x0, alpha, block_size, normalize, seed, cd)
    return (blurred + sigma.to(cd)[:, None, None, None] * n).to(x0.dtype)


def step_factors(sigma, sigma_next, tau, tau_next, s_noise, patch_size, min_scale):
    """Per-sample ``A, B`` ([B, p, p]) and ``eta`` ([B]) of the relay step (SPEC 6)."""
    a_c = blur_factors_impl(tau, patch_size, min_scale)
    a_n = blur_factors_impl(tau_next, patch_size, min_scale)
    gamma = (math.sqrt(1.0 - s_noise * s_noise) * sigma_next / sigma)[:, None, None]
    A = a_n + gamma * (1.0 - a_c)
    B = gamma * a_c - a_n
    return A, B, s_noise * sigma_next


def relay_step_impl(x, denoised, x_prop, denoised_prop, sigma, sigma_next, tau, tau_next,
                    s_noise, patch_size, alpha, block_size, min_scale, normalize, seed):
    cd = compute_dtype(x.dtype)
    xc, dc = x.to(cd), denoised.to(cd)
    sig = sigma.to(cd)[:, None, None, None]
    if x_prop is None:
        y = xc - dc                                      # sigma * d
    else:
        sig_n = sigma_next.to(cd)[:, None, None, None]
        d2 = (x_prop.to(cd) - denoised_prop.to(cd)) / sig_n
        y = sig * 0.5 * ((xc - dc) / sig + d2)           # sigma * (d + d') / 2
    A, B, eta = step_factors(sigma, sigma_next, tau, tau_next, s_noise, patch_size, min_scale)
    u = _scale_coefficients(_patch_transform(xc, patch_size, False), A.to(cd), patch_size) \
        + _scale_coefficients(_patch_transform(y, patch_size, False), B.to(cd), patch_size)
    out = _patch_transform(u, patch_size, inverse=True)
    if s_noise != 0.0:
        n = _mixed(x, alpha, block_size, normalize, seed, cd)
        out = out + eta.to(cd)[:, None, None, None] * n
    return out.to(x.dtype)


def relay_step_vjp(grad, sigma, sigma_next, tau, tau_next, s_noise, patch_size, min_scale, heun: bool):
    """The gradients of :func:`relay_step_impl` with respect to ``x, denoised`` (and, with
    ``heun``, ``x_prop, denoised_prop``) for the output gradient ``grad``.

    The step is linear in them (its noise term does not depend on them): with ``U`` the DCT
    of each patch, ``out = IDCT(A U(x) + B U(y))``, ``y = x - denoised`` (Euler) or
    ``y = (x - denoised) / 2 + (sigma / sigma_next) (x_prop - denoised_prop) / 2`` (Heun). The
    DCT is orthonormal, so each input's gradient is ``IDCT(c * DCT(grad))``, ``c`` its
    coefficient: ``A + B`` (``A + B/2``) for x, ``-B`` (``-B/2``) for denoised and
    ``+-(sigma / sigma_next) B / 2`` for the proposal pair."""
    cd = compute_dtype(grad.dtype)
    A, B, _ = step_factors(sigma, sigma_next, tau, tau_next, s_noise, patch_size, min_scale)
    u = _patch_transform(grad.to(cd), patch_size, inverse=False)

    def back(c):
        return _patch_transform(_scale_coefficients(u, c.to(cd), patch_size), patch_size, inverse=True).to(grad.dtype)

    if not heun:
        return back(A + B), back(-B)
    half = 0.5 * B
    ratio = (sigma / sigma_next)[:, None, None] * half
    return back(A + half), back(-half), back(ratio), back(-ratio)


# ---------------------------------------------------------------- argument preparation
# Shared with relaydiff.ops.api and relaydiff.ops.linear_blur: turns public arguments into the
# op schema's arguments (``blur_name(s)``: what the blur argument is called in messages).

def prep_transform(x, patch_size, name):
    V.check_image(x, name)
    p = V.check_patch_size(patch_size)
    V.check_divisible(x, p, name)
    return x, p


def prep_blur_factors(tau, patch_size, min_scale):
    p = V.check_patch_size(patch_size)
    m = V.check_scalar(min_scale, "min_scale", high=1.0, high_inclusive=False)
    if isinstance(tau, torch.Tensor):
        t = tau.detach().to(torch.float64) if tau.is_floating_point() else tau.to(torch.float64)
    else:
        t = torch.tensor(V.check_scalar(tau, "tau"), dtype=torch.float64)
    if not V._tracing() and t.numel() and bool((~torch.isfinite(t) | (t < 0)).any()):
        raise ValueError(f"tau must be finite and non-negative; got {tau}")
    return t, p, m


def prep_blur(x, tau, patch_size, min_scale, blur_name="tau"):
    x, p = prep_transform(x, patch_size, "x")
    m = V.check_scalar(min_scale, "min_scale", high=1.0, high_inclusive=False)
    t = V.per_sample(tau, blur_name, x.shape[0], x.device)
    return x, t, p, m


def prep_noise(like, alpha, block_size, normalize, seed):
    V.check_image(like, "like")
    s = V.check_block_size(block_size, like)
    a = V.check_scalar(alpha, "alpha", high=V.MAX_SCALE)
    return like, a, s, bool(normalize), V.check_seed(seed)


def prep_corrupt(x0, sigma, tau, patch_size, alpha, block_size, min_scale, normalize, seed,
                 blur_name="tau"):
    x0, p = prep_transform(x0, patch_size, "x0")
    b = x0.shape[0]
    sig = V.per_sample(sigma, "sigma", b, x0.device, high=V.MAX_SCALE)
    t = V.per_sample(tau, blur_name, b, x0.device)
    _, a, s, nrm, sd = prep_noise(x0, alpha, block_size, normalize, seed)
    m = V.check_scalar(min_scale, "min_scale", high=1.0, high_inclusive=False)
    return x0, sig, t, p, a, s, m, nrm, sd


def prep_step(x, denoised, sigma, sigma_next, tau, tau_next, x_prop, denoised_prop,
              s_noise, patch_size, alpha, block_size, min_scale, normalize, seed,
              blur_names=("tau", "tau_next")):
    x, p = prep_transform(x, patch_size, "x")
    V.check_like(x, "x", denoised=denoised, x_prop=x_prop, denoised_prop=denoised_prop)
    if (x_prop is None) != (denoised_prop is None):
        raise ValueError("x_prop and denoised_prop must be given together (Heun correction) or both be None")
    b = x.shape[0]
    sig = V.per_sample(sigma, "sigma", b, x.device, positive=True, high=V.MAX_SCALE)
    sig_n = V.per_sample(sigma_next, "sigma_next", b, x.device, positive=x_prop is not None, high=V.MAX_SCALE)
    # a step runs towards less noise: sigma_next > sigma would amplify the noise estimate by
    # sigma_next / sigma instead of removing it (legal arithmetic, meaningless sampling)
    if not V._tracing() and b and sig.device.type != "meta" and bool((sig_n > sig).any()):
        raise ValueError(f"sigma_next must not exceed sigma (a relay step lowers the noise); got "
                         f"sigma={sig.tolist()}, sigma_next={sig_n.tolist()}")
    t = V.per_sample(tau, blur_names[0], b, x.device)
    t_n = V.per_sample(tau_next, blur_names[1], b, x.device)
    sn = V.check_scalar(s_noise, "s_noise", high=1.0)
    _, a, s, nrm, sd = prep_noise(x, alpha, block_size, normalize, seed)
    m = V.check_scalar(min_scale, "min_scale", high=1.0, high_inclusive=False)
    return x, denoised, x_prop, denoised_prop, sig, sig_n, t, t_n, sn, p, a, s, m, nrm, sd


# ---------------------------------------------------------------- public twins

def patch_dct(x: torch.Tensor, patch_size: int = 4) -> torch.Tensor:
    return patch_dct_impl(*prep_transform(x, patch_size, "x"))


def patch_idct(u: torch.Tensor, patch_size: int = 4) -> torch.Tensor:
    return patch_idct_impl(*prep_transform(u, patch_size, "u"))


def blur_factors(tau, patch_size: int = 4, min_scale: float = 1e-3) -> torch.Tensor:
    return blur_factors_impl(*prep_blur_factors(tau, patch_size, min_scale))


def patch_blur(x, tau, patch_size: int = 4, min_scale: float = 1e-3) -> torch.Tensor:
    return patch_blur_impl(*prep_blur(x, tau, patch_size, min_scale))


def block_noise(like, block_size: int = 4, seed=None) -> torch.Tensor:
    like, _, s, _, sd = prep_noise(like, 0.0, block_size, True, seed)
    return block_noise_impl(like, s, sd)


def mixed_noise(like, alpha: float = 0.15, block_size: int = 4, normalize: bool = True,
                seed=None) -> torch.Tensor:
    return mixed_noise_impl(*prep_noise(like, alpha, block_size, normalize, seed))


def relay_corrupt(x0, sigma, tau, patch_size: int = 4, alpha: float = 0.15, block_size: int = 4,
                  min_scale: float = 1e-3, normalize: bool = True, seed=None) -> torch.Tensor:
    return relay_corrupt_impl(*prep_corrupt(x0, sigma, tau, patch_size, alpha, block_size,
                                            min_scale, normalize, seed))


def relay_step(x, denoised, sigma, sigma_next, tau, tau_next, *, x_prop=None, denoised_prop=None,
               s_noise: float = 0.2, patch_size: int = 4, alpha: float = 0.15, block_size: int = 4,
               min_scale: float = 1e-3, normalize: bool = True, seed=None) -> torch.Tensor:
    (x, den, xp, dp, sig, sig_n, t, t_n, sn, p, a, s, m, nrm, sd) = prep_step(
        x, denoised, sigma, sigma_next, tau, tau_next, x_prop, denoised_prop,
        s_noise, patch_size, alpha, block_size, min_scale, normalize, seed)
    return relay_step_impl(x, den, xp, dp, sig, sig_n, t, t_n, sn, p, a, s, m, nrm, sd)
