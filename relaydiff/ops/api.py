"""Public face of the relay ops: validate, normalise, then run the compiled kernel for
the tensor's device or, where there is none, the reference twin.

Shapes: images are ``[B, C, H, W]`` (float32/float64/float16/bfloat16, any strides; half
types are computed in float32), H and W multiples of ``patch_size`` (2, 4, 8 or 16).
``sigma``/``tau`` are Python floats or per-sample tensors ``[B]``. Outputs are contiguous.
"""
from __future__ import annotations

import torch

from . import _drawn, _ext
from . import _validate as V
from . import reference as R

backend = _ext.backend


def _kernel(t: torch.Tensor) -> bool:
    return _ext.has_kernel(t.device.type)


def _drawn_seed(seed) -> bool:
    """``seed=None`` while torch.compile traces: the op must draw its seed when it runs
    (relaydiff.ops._drawn), so that compiled and eager code draw the same one."""
    return seed is None and V._tracing()


def patch_dct(x: torch.Tensor, patch_size: int = 4) -> torch.Tensor:
    """Orthonormal DCT-II of every ``p x p`` patch, in place layout (SPEC 1):
    element ``(p*P + k, p*Q + l)`` holds coefficient ``(k, l)`` of patch ``(P, Q)``.
    Differentiable (its gradient is ``patch_idct``)."""
    x, p = R.prep_transform(x, patch_size, "x")
    if _kernel(x):
        return torch.ops.relaydiff.patch_dct(x, p)
    return R.patch_dct_impl(x, p)


def patch_idct(u: torch.Tensor, patch_size: int = 4) -> torch.Tensor:
    """Inverse of :func:`patch_dct` (DCT-III of every patch, ``X = C^T U C``)."""
    u, p = R.prep_transform(u, patch_size, "u")
    if _kernel(u):
        return torch.ops.relaydiff.patch_idct(u, p)
    return R.patch_idct_impl(u, p)


def blur_factors(tau, patch_size: int = 4, min_scale: float = 1e-3) -> torch.Tensor:
    """``a_tau(k, l) = (1 - m) exp(-(pi^2/p^2)(k^2 + l^2) tau) + m`` (SPEC 2), float64,
    of shape ``tau.shape + (p, p)`` (``[p, p]`` for a float, ``[B, p, p]`` for ``[B]``)."""
    return R.blur_factors(tau, patch_size, min_scale)


def patch_blur(x: torch.Tensor, tau, patch_size: int = 4, min_scale: float = 1e-3) -> torch.Tensor:
    """``Blur_tau(x) = IDCT(a_tau * DCT(x))`` patch-wise (SPEC 2). Differentiable in ``x``
    (the operator is self-adjoint)."""
    x, t, p, m = R.prep_blur(x, tau, patch_size, min_scale)
    if _kernel(x):
        return torch.ops.relaydiff.patch_blur(x, t, p, m)
    return R.patch_blur_impl(x, t, p, m)


def block_noise(like: torch.Tensor, block_size: int = 4, seed: int | None = None) -> torch.Tensor:
    """Block noise ``Block_s(g)`` of SPEC 3 with the shape/dtype/device of ``like``: a
    circular ``s x s`` box sum of white noise divided by ``s`` (unit variance per pixel).
    ``g`` is stream 1 of the Philox generator under ``seed`` (``None``: drawn from torch's
    global generator)."""
    like, _, s, _, sd = R.prep_noise(like, 0.0, block_size, True, 0 if _drawn_seed(seed) else seed)
    if _drawn_seed(seed):
        return _drawn.block_noise_drawn(like, s)
    if _kernel(like):
        return torch.ops.relaydiff.block_noise(like, s, sd)
    return R.block_noise_impl(like, s, sd)


def mixed_noise(like: torch.Tensor, alpha: float = 0.15, block_size: int = 4, normalize: bool = True,
                seed: int | None = None) -> torch.Tensor:
    """``(e + alpha * Block_s(e2)) / sqrt(1 + alpha^2)`` (SPEC 3); ``normalize=False`` is the
    authors' code variant without the division. ``e`` is stream 0 and ``e2`` stream 1 under
    ``seed``, so ``mixed_noise(x, alpha=0, seed=k)`` is the white field of seed ``k``."""
    if _drawn_seed(seed):
        return _drawn.mixed_noise_drawn(*R.prep_noise(like, alpha, block_size, normalize, 0)[:-1])
    args = R.prep_noise(like, alpha, block_size, normalize, seed)
    if _kernel(like):
        return torch.ops.relaydiff.mixed_noise(*args)
    return R.mixed_noise_impl(*args)


def relay_corrupt(x0: torch.Tensor, sigma, tau, patch_size: int = 4, alpha: float = 0.15,
                  block_size: int = 4, min_scale: float = 1e-3, normalize: bool = True,
                  seed: int | None = None) -> torch.Tensor:
    """The relay stage's forward corruption ``x_t = Blur_tau(x0) + sigma * n`` (SPEC 5), ``n``
    the mixed noise of ``seed``, in one pass over memory. Differentiable in ``x0``."""
    if _drawn_seed(seed):
        return _drawn.relay_corrupt_drawn(*R.prep_corrupt(x0, sigma, tau, patch_size, alpha, block_size,
                                                          min_scale, normalize, 0)[:-1])
    args = R.prep_corrupt(x0, sigma, tau, patch_size, alpha, block_size, min_scale, normalize, seed)
    if _kernel(x0):
        return torch.ops.relaydiff.relay_corrupt(*args)
    return R.relay_corrupt_impl(*args)


def relay_step(x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next, tau, tau_next, *,
               x_prop: torch.Tensor | None = None, denoised_prop: torch.Tensor | None = None,
               s_noise: float = 0.2, patch_size: int = 4, alpha: float = 0.15, block_size: int = 4,
               min_scale: float = 1e-3, normalize: bool = True, seed: int | None = None) -> torch.Tensor:
    """One step of the relay sampler (SPEC 6, paper Algorithm 1) from ``sigma`` to ``sigma_next``:

    ``x_n = IDCT(A * DCT(x) + sigma * B * DCT(d)) + eta * n`` with ``A = a_n + gamma (1 - a_c)``,
    ``B = gamma a_c - a_n``, ``gamma = sqrt(1 - s^2) sigma_next / sigma``, ``eta = s * sigma_next``,
    ``a_c``/``a_n`` the blur factors of ``tau``/``tau_next`` and ``n`` the mixed noise of ``seed``.
    Euler: ``d = (x - denoised) / sigma``. With ``x_prop``/``denoised_prop`` (the Euler proposal at
    ``sigma_next`` and its denoised output) the Heun correction
    ``d = ((x - denoised)/sigma + (x_prop - denoised_prop)/sigma_next) / 2``; pass the seed of
    the Euler step to reuse its noise (the paper), a new one for the code variant."""
    args = R.prep_step(x, denoised, sigma, sigma_next, tau, tau_next, x_prop, denoised_prop,
                       s_noise, patch_size, alpha, block_size, min_scale, normalize, 0 if _drawn_seed(seed) else seed)
    if _drawn_seed(seed):
        return _drawn.relay_step_drawn(*args[:-1])
    if _kernel(x):
        return torch.ops.relaydiff.relay_step(*args)
    return R.relay_step_impl(*args)
