"""relaydiff.sampling: noise grids, the EDM (stage 1) and relay (stage 2) samplers,
classifier-free guidance and named sampler presets.

Samplers follow k-diffusion's calling convention: ``sample_x(denoiser, x, sigmas, ...)``
with ``x`` the start state at ``sigmas[0]``, a ``callback`` receiving a dict per step and
``disable`` for the tqdm bar. A denoiser is any callable
``denoiser(x [B, C, H, W], sigma [B], class_labels=None) -> x0_hat`` (the EDM convention).
"""
from .edm import edm_grid, sample_edm
from .grids import karras_sigmas, truncate_sigmas
from .guidance import ClassifierFreeGuidance, cfg
from .presets import PRESETS, EDMSampling, RelaySampling, SamplerPreset, get_preset
from .relay import nearest_upsample, relay_init, sample_relay
from .seeds import authors_class_labels, derive_seed

__all__ = ["karras_sigmas", "truncate_sigmas", "sample_edm", "relay_init", "sample_relay", "cfg",
           "ClassifierFreeGuidance", "PRESETS", "EDMSampling", "RelaySampling", "SamplerPreset",
           "get_preset", "derive_seed", "nearest_upsample", "edm_grid", "authors_class_labels"]
