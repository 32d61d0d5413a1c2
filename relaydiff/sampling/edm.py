"""The stage-1 sampler: EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2;
SPEC 7)."""
from __future__ import annotations

import math

import torch
from tqdm.auto import trange

from relaydiff.config import NoiseConfig
from relaydiff.ops._validate import check_image, check_scalar

from .grids import check_sigmas
from .seeds import check_seeds, seeded, split_seed


def call_denoiser(denoiser, x: torch.Tensor, sigma: float, class_labels, dtype: torch.dtype) -> torch.Tensor:
    """``denoiser(x, sigma, class_labels)`` with ``x`` cast to ``dtype`` (the caller's image
    dtype) and ``sigma`` as a ``[B]`` tensor of that dtype, the output cast back to ``x.dtype``."""
    xin = x.to(dtype)
    out = denoiser(xin, xin.new_full((x.shape[0],), sigma), class_labels)
    return out.to(x.dtype)


def edm_rounding(denoiser, round_sigma=None):
    """The function ``sigma -> level`` :func:`sample_edm` rounds its levels with, or ``None``
    (no rounding). ``round_sigma``: ``None`` takes the denoiser's own ``round_sigma`` method
    where it has one (every ``relaydiff.models`` preconditioner; EDM's generate.py calls
    ``net.round_sigma``: the identity except for ``iDDPMPrecond``, which snaps to its discrete
    levels), ``False`` turns rounding off, a callable is used as given."""
    if round_sigma is False:
        return None
    if round_sigma is None:
        round_sigma = getattr(denoiser, "round_sigma", None)
        return round_sigma if callable(round_sigma) else None
    if not callable(round_sigma):
        raise TypeError(f"round_sigma must be None, False or a function of sigma; got {round_sigma!r}")
    return round_sigma


def _rounded(fn, sigma: torch.Tensor) -> torch.Tensor:
    out = torch.as_tensor(fn(sigma))
    if out.shape != sigma.shape:
        raise ValueError(f"round_sigma must keep the shape of its input {tuple(sigma.shape)}; "
                         f"got {tuple(out.shape)}")
    return out.to(device=sigma.device, dtype=torch.float64)


def edm_grid(denoiser, sigmas, round_sigma=None) -> torch.Tensor:
    """The grid :func:`sample_edm` runs for ``denoiser`` on ``sigmas`` (strictly decreasing):
    ``sigmas`` (float64) with every nonzero level through the rounding of :func:`edm_rounding`,
    as EDM's generate.py rounds ``t_steps`` with ``net.round_sigma``. Rounded to a discrete
    table (iDDPM) the grid can repeat levels; it stays non-increasing. For a generation start,
    scale the latent by its first level (EDM's ``latents * t_steps[0]``) and pass ``sigmas``
    itself to :func:`sample_edm`, which rounds it again (rounding keeps rounded levels)."""
    sig = check_sigmas(sigmas)
    fn = edm_rounding(denoiser, round_sigma)
    if fn is None:
        return sig
    nonzero = sig > 0
    out = sig.clone()
    out[nonzero] = _rounded(fn, sig[nonzero])
    if bool((out[:-1] == 0).any()):
        low = float(sig[:-1][out[:-1] == 0].max())
        raise ValueError(f"round_sigma takes the level {low:.4g} of sigmas to 0; keep the grid within the "
                         f"denoiser's range [sigma_min, sigma_max] (EDM's generate.py clamps it)")
    return check_sigmas(out, strict=False)


@torch.no_grad()
def sample_edm(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, class_labels=None,
               s_churn: float = 0.0, s_min: float = 0.0, s_max: float = math.inf, s_noise: float = 1.0,
               sde_scale: float = 0.0, noise: NoiseConfig | None = None, seed=None, round_sigma=None,
               callback=None, disable: bool | None = None, return_nfe: bool = False):
    """EDM stochastic Heun sampler from ``sigmas[0]`` down the grid ``sigmas``.

    ``x`` ``[B, C, H, W]`` is the start state at ``sigmas[0]`` (rounded as below; for
    generation ``edm_grid(denoiser, sigmas)[0]`` times a draw of ``noise``). Step ``i``
    (``sigma_i -> sigma_{i+1}``): ``gamma = min(s_churn / N, sqrt(2) - 1)`` if ``s_min <=
    sigma_i <= s_max`` else 0, ``sigma_hat = round((1 + gamma) sigma_i)``,
    ``x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) s_noise n``,
    ``d = (x_hat - D(x_hat; sigma_hat)) / sigma_hat``, Euler ``x' = x_hat + (sigma_{i+1} - sigma_hat) d``
    and, unless ``sigma_{i+1} = 0``, the Heun correction with the slope at ``x'`` averaged in.
    The state is kept in float64; the denoiser sees ``x.dtype``.

    ``sde_scale = c > 0`` is the stage-1 SDE sampler of the authors' CelebA-HQ script
    (``sde_scale=0.05`` there): each step keeps a share ``g = c sigma_{i+1}`` of fresh noise,
    ``x' = x_hat + (sqrt(sigma_{i+1}^2 - g^2) - sigma_hat) d + g n1`` and the Heun correction
    ``x_hat + (sqrt(sigma_{i+1}^2 - g^2) - sigma_hat) (d + d') / 2 + g n2`` with new noise ``n2``;
    ``c = 0`` is the ODE step above. Requires ``0 <= c < 1``.

    ``round_sigma`` (EDM's ``net.round_sigma``): the levels the denoiser is evaluated at. As
    EDM's sampler, every nonzero level of ``sigmas`` and every ``sigma_hat`` goes through it
    (:func:`edm_grid`); by default the denoiser's own ``round_sigma`` method (the identity for
    EDM, VP and VE preconditioning, iDDPM's nearest discrete level), ``False``: none. A grid
    whose rounded levels repeat runs the repeated steps as EDM does.

    ``denoiser(x, sigma [B], class_labels)`` predicts the clean image. ``noise``: the
    :class:`~relaydiff.NoiseConfig` the model was trained with, which draws the churn noise
    ``n`` (``None``: white; with ``alpha > 0`` the mixed block noise of SPEC 3, paper App. C.2).
    ``seed`` fixes the churn and SDE noise (``None``: drawn from torch's global generator; a
    sequence of ``B`` ints: per-sample seeds, sample ``b``'s noise from ``seed[b]`` alone, see
    :func:`relaydiff.sampling.seeds.seeded`).
    ``callback`` receives ``{step, sigma, sigma_hat, sigma_next, x, denoised, nfe}`` after every step;
    ``disable`` turns the progress bar off. Returns the image in ``x.dtype``, with the number
    of denoiser calls (``2N - 1`` on a grid of N levels ending in 0) if ``return_nfe``.
    """
    check_image(x, "x")
    rounding = edm_rounding(denoiser, round_sigma)
    sig = edm_grid(denoiser, sigmas, rounding if rounding is not None else False).tolist()
    check_scalar(s_churn, "s_churn")
    check_scalar(s_noise, "s_noise")
    check_scalar(sde_scale, "sde_scale", high=1.0, high_inclusive=False)
    noise = NoiseConfig.of(noise)
    seed = check_seeds(seed, x.shape[0])
    n = len(sig) - 1
    gamma_max = min(s_churn / n, math.sqrt(2.0) - 1.0)
    dtype = x.dtype
    x = x.to(torch.float64)
    nfe = 0
    bar = trange(n, disable=disable, desc="edm", unit="step")
    for i in bar:
        s_cur, s_next = sig[i], sig[i + 1]
        gamma = gamma_max if s_min <= s_cur <= s_max else 0.0
        s_hat = s_cur * (1.0 + gamma)
        if gamma > 0.0 and rounding is not None:   # EDM: t_hat = net.round_sigma(t_cur + gamma * t_cur)
            s_hat = float(_rounded(rounding, torch.tensor([s_hat], dtype=torch.float64, device=x.device))[0])
            if not s_hat >= s_cur:
                raise ValueError(f"round_sigma took the raised level {s_cur * (1.0 + gamma):.6g} below the "
                                 f"grid level {s_cur:.6g}; it must be non-decreasing and keep its own levels")
        if gamma > 0.0:
            x = x + math.sqrt(s_hat ** 2 - s_cur ** 2) * s_noise * seeded(noise.draw, split_seed(seed, i), x)
        denoised = call_denoiser(denoiser, x, s_hat, class_labels, dtype)
        nfe += 1
        d = (x - denoised) / s_hat
        g = sde_scale * s_next
        # the ODE step's sigma_{i+1} - sigma_hat, kept literally when there is no SDE share
        h = math.sqrt(s_next ** 2 - g ** 2) - s_hat if g > 0.0 else s_next - s_hat
        x_next = x + h * d
        if g > 0.0:
            x_next = x_next + g * seeded(noise.draw, split_seed(seed, i, 1), x)
        if s_next > 0.0:
            d_next = (x_next - call_denoiser(denoiser, x_next, s_next, class_labels, dtype)) / s_next
            nfe += 1
            x_next = x + h * (0.5 * d + 0.5 * d_next)
            if g > 0.0:
                x_next = x_next + g * seeded(noise.draw, split_seed(seed, i, 2), x)
        if callback is not None:
            callback(dict(step=i, sigma=s_cur, sigma_hat=s_hat, sigma_next=s_next, x=x,
                          denoised=denoised, nfe=nfe))
        x = x_next
        bar.set_postfix(nfe=nfe, refresh=False)
    x = x.to(dtype)
    return (x, nfe) if return_nfe else x
