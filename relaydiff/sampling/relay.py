"""The relay (stage 2) sampler: paper Algorithm 1 (SPEC 6) on the fused ``relay_step`` op."""
from __future__ import annotations

import math

import torch
from tqdm.auto import trange

from relaydiff.config import RelayConfig
from relaydiff.ops import linear_relay_step, mixed_noise, relay_step
from relaydiff.ops._validate import check_image, check_scalar, per_sample

from .edm import call_denoiser
from .grids import check_sigmas
from .seeds import check_seeds, seeded, split_seed


CORRECTIONS = ("slope", "denoised")   # what the Heun correction of sample_relay averages


def nearest_upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``[..., h, w] -> [..., h*factor, w*factor]``, every pixel repeated in a block."""
    return x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def relay_init(x_low: torch.Tensor, sigma0, config: RelayConfig, seed=None) -> torch.Tensor:
    """The relay stage's start state (SPEC 6): ``nearest_upsample(x_low, p) + sigma0 * n``.

    ``x_low`` ``[B, C, h, w]`` in [-1, 1]; ``sigma0`` a float or ``[B]`` (the first level of
    the truncated grid); ``n`` the mixed noise of ``config`` (white plus ``alpha`` times block
    noise) under ``seed`` (an int, or ``B`` per-sample seeds as in :func:`sample_relay`).
    Returns ``[B, C, h*p, w*p]`` in ``x_low.dtype``. The nearest upsample is what the blur
    tends to at large ``tau``, so this approximates the forward marginal at the top of the relay schedule (for ``config.blur = "linear"`` it is the blurred
    image at ``t = 1`` itself when ``min_scale = 0``, SPEC 2b).
    """
    check_image(x_low, "x_low")
    up = nearest_upsample(x_low, config.patch_size)
    sig = per_sample(sigma0, "sigma0", x_low.shape[0], x_low.device)
    seed = check_seeds(seed, x_low.shape[0])
    noise = seeded(mixed_noise, seed, up, config.alpha, config.block_size, config.normalize_noise)
    return up + sig.to(up.dtype)[:, None, None, None] * noise


@torch.no_grad()
def sample_relay(denoiser, x: torch.Tensor, sigmas: torch.Tensor, config: RelayConfig, *,
                 class_labels=None, s_noise: float = 0.2, fresh_correction_noise: bool = False,
                 t_truncation: float | None = None, heun_last_level: bool = True,
                 correction: str = "slope", churn: float = 0.0, churn_min: float = 0.0,
                 churn_max: float = math.inf, churn_noise: float = 1.0, seed=None, callback=None,
                 disable: bool | None = None, return_nfe: bool = False):
    """Relay sampler (paper Algorithm 1, SPEC 6) from ``sigmas[0]`` down the grid ``sigmas``.

    ``x`` ``[B, C, H, W]`` is the start state at ``sigmas[0]`` (see :func:`relay_init`); the
    grid is usually ``truncate_sigmas(karras_sigmas(...), cut)``. For each pair
    ``(sigma_c, sigma_n)`` with blur times ``tau = config.tau_of_sigma(sigma, t_truncation)``:

    * ``D = denoiser(x, sigma_c)``; if ``sigma_n = 0`` the sampler returns ``D``;
    * Euler: ``x' = IDCT(A DCT(x) + B DCT(x - D)) + s_noise sigma_n n`` with
      ``A = a_n + gamma (1 - a_c)``, ``B = gamma a_c - a_n``, ``gamma = sqrt(1 - s^2) sigma_n / sigma_c``
      (one fused :func:`relaydiff.ops.relay_step`);
    * Heun: ``D' = denoiser(x', sigma_n)`` and the same step with the slope averaged over
      ``x`` and ``x'``, reusing the Euler step's noise ``n`` (the paper) or, with
      ``fresh_correction_noise=True``, drawing new noise (the authors' code).

    ``correction`` picks what the Heun step averages. ``"slope"`` (the paper) averages the
    slopes ``(x - D) / sigma`` at both ends, each in its own blur basis: when the blur changes
    much within one step this loses within-patch detail (with the true ``x0`` as denoiser, one
    step from 0.865 to 0.008 keeps about half of it). ``"denoised"`` averages the two
    predictions instead and takes the Euler step with ``(D + D') / 2``: in the variables
    ``y = u / sigma``, ``lambda = a / sigma`` (per DCT coefficient, ``s = 0``) the step is
    ``y' = y + (lambda' - lambda) D``, exact for a constant ``D``, and the averaged version is
    the trapezoidal rule of ``dy = D dlambda``, so the forward marginal is kept at any step
    size (SPEC 6, "Corrections").

    ``heun_last_level=True`` corrects every step that ends at a nonzero level, the step into
    the last nonzero level included (paper Algorithm 1: "if n != 1", whose step n = 1 is the
    one to sigma = 0; EDM; the authors' code): ``2K - 1`` denoiser calls for K nonzero levels
    and a final 0. ``False`` takes SPEC 6's wording literally ("if sigma_n is not the last
    nonzero level"): the step into the last nonzero level is Euler only, ``2K - 2`` calls.

    ``churn > 0`` is the churn of the authors' CelebA-HQ relay sampler (EDM's ``S_churn``,
    ``S_min``, ``S_max``, ``S_noise`` as ``churn``, ``churn_min``, ``churn_max``, ``churn_noise``):
    for ``churn_min <= sigma_c <= churn_max`` with ``g = min(churn / N, sqrt(2) - 1)`` (N steps)
    the level is raised to ``sigma_h = (1 + g) sigma_c`` and the denoiser sees
    ``x_h = x + sqrt(sigma_h^2 - sigma_c^2) churn_noise e`` (white ``e``) at ``sigma_h``; as in
    their code the step itself then starts from ``x`` (not ``x_h``) with ``sigma_h`` and its blur
    in the place of ``sigma_c`` (``gamma``, ``a_c`` and the slope ``(x - D) / sigma_h``). Their
    published script leaves it off (``S_churn = 0``).

    Every step's noise has a seed derived from ``seed`` (``None``: drawn from torch's
    global generator), so one seed fixes the whole trajectory. A sequence of ``B`` ints gives
    per-sample seeds: sample ``b``'s noise depends on ``seed[b]`` alone, whatever the batch
    (EDM's convention; each noise op then runs once per sample,
    :func:`relaydiff.sampling.seeds.seeded`). The state stays in
    ``x.dtype`` (the op computes in float32 for half types, in float64 for float64; its
    step factors are float64). ``config.blur = "linear"`` (CogView3, SPEC 2b) runs the same
    steps with the linear blur's factors (:func:`relaydiff.ops.linear_relay_step`, blur weight
    ``w = t(sigma)`` in the place of ``tau``). ``callback`` receives ``{step, sigma, sigma_hat, sigma_next,
    x, denoised, nfe}``; ``disable`` turns the progress bar off. Returns the image, with the
    number of denoiser calls if ``return_nfe``.
    """
    check_image(x, "x")
    if not isinstance(config, RelayConfig):
        raise TypeError(f"config must be a RelayConfig; got {type(config).__name__}")
    check_scalar(s_noise, "s_noise", high=1.0, high_inclusive=False)
    sig_t = check_sigmas(sigmas)
    # the blur's argument per level (tau, or the linear blur's weight) and its step op
    taus = config.blur_of_sigma(sig_t, t_truncation).tolist()
    step_fn = linear_relay_step if config.blur == "linear" else relay_step
    sig = sig_t.tolist()
    seed = check_seeds(seed, x.shape[0])
    check_scalar(churn, "churn")
    check_scalar(churn_noise, "churn_noise")
    gamma_max = min(churn / (len(sig) - 1), math.sqrt(2.0) - 1.0)
    op_kwargs = dict(s_noise=s_noise, **config.op_kwargs())
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}; got {correction!r}")
    if not isinstance(heun_last_level, bool):
        raise TypeError(f"heun_last_level must be a bool; got {type(heun_last_level).__name__}")
    # index of the last nonzero level: its incoming step skips Heun when heun_last_level=False
    last_nonzero = len(sig) - 2 if sig[-1] == 0.0 else len(sig) - 1
    nfe = 0
    bar = trange(len(sig) - 1, disable=disable, desc="relay", unit="step")
    for i in bar:
        s_cur, s_next, tau_cur, tau_next = sig[i], sig[i + 1], taus[i], taus[i + 1]
        x_in = x
        if gamma_max > 0.0 and churn_min <= s_cur <= churn_max:
            s_hat = s_cur * (1.0 + gamma_max)
            white = seeded(mixed_noise, split_seed(seed, i, 2), x, 0.0)
            x_in = x + math.sqrt(s_hat ** 2 - s_cur ** 2) * churn_noise * white
            s_cur = s_hat
            tau_cur = float(config.blur_of_sigma(torch.tensor(s_hat, dtype=torch.float64), t_truncation))
        denoised = call_denoiser(denoiser, x_in, s_cur, class_labels, x.dtype)
        nfe += 1
        if s_next == 0.0:
            x_next = denoised
        else:
            step_seed = split_seed(seed, i)
            x_next = seeded(step_fn, step_seed, x, denoised, s_cur, s_next, tau_cur, tau_next, **op_kwargs)
            if heun_last_level or i + 1 != last_nonzero:
                x_prop = x_next
                denoised_prop = call_denoiser(denoiser, x_prop, s_next, class_labels, x.dtype)
                nfe += 1
                corr_seed = split_seed(seed, i, 1) if fresh_correction_noise else step_seed
                if correction == "denoised":
                    x_next = seeded(step_fn, corr_seed, x, 0.5 * (denoised + denoised_prop), s_cur, s_next,
                                    tau_cur, tau_next, **op_kwargs)
                else:
                    x_next = seeded(step_fn, corr_seed, x, denoised, s_cur, s_next, tau_cur, tau_next,
                                    x_prop=x_prop, denoised_prop=denoised_prop, **op_kwargs)
        if callback is not None:
            callback(dict(step=i, sigma=sig[i], sigma_hat=s_cur, sigma_next=s_next, x=x, denoised=denoised,
                          nfe=nfe))
        x = x_next
        bar.set_postfix(nfe=nfe, refresh=False)
    return (x, nfe) if return_nfe else x
