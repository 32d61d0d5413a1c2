"""Named sampler settings, including the published ones (SPEC 9)."""
from __future__ import annotations

import dataclasses
import math

import torch

from .grids import karras_sigmas, truncate_sigmas
from .relay import CORRECTIONS


def _check_common(obj) -> None:
    if isinstance(obj.steps, bool) or not isinstance(obj.steps, int) or obj.steps < 1:
        raise ValueError(f"steps must be a positive integer; got {obj.steps!r}")
    if not (math.isfinite(obj.cfg) and obj.cfg >= 0):
        raise ValueError(f"cfg must be a finite number >= 0; got {obj.cfg!r}")


@dataclasses.dataclass(frozen=True)
class EDMSampling:
    """Stage-1 settings for :func:`relaydiff.sampling.sample_edm` (SPEC 7)."""
    steps: int = 32                 # levels of the Karras grid (a final 0 is appended)
    sigma_min: float = 0.002        # lowest nonzero level
    sigma_max: float = 80.0         # start level: the latent is sigma_max * white noise
    rho: float = 7.0                # grid exponent
    s_churn: float = 0.0            # EDM stochasticity (0: deterministic Heun)
    s_min: float = 0.0              # churn only for sigma in [s_min, s_max]
    s_max: float = math.inf
    s_noise: float = 1.0            # inflation of the churn noise
    cfg: float = 1.0                # classifier-free guidance scale (1: off)
    sde_scale: float = 0.0          # share of fresh noise per step (authors' CelebA-HQ SDE: 0.05)

    def __post_init__(self):
        _check_common(self)
        if not 0.0 <= self.sde_scale < 1.0:
            raise ValueError(f"sde_scale must be in [0, 1); got {self.sde_scale!r}")

    def sigmas(self, device=None) -> torch.Tensor:
        return karras_sigmas(self.steps, self.sigma_min, self.sigma_max, self.rho, device)

    def sampler_kwargs(self) -> dict:
        return dict(s_churn=self.s_churn, s_min=self.s_min, s_max=self.s_max, s_noise=self.s_noise,
                    sde_scale=self.sde_scale)


@dataclasses.dataclass(frozen=True)
class RelaySampling:
    """Relay-stage settings for :func:`relaydiff.sampling.sample_relay` (SPEC 6). The grid is
    the Karras grid of ``steps`` levels with the levels ``>= sigma_cut`` dropped.
    ``sigma_max=None`` starts the grid at the relay stage's trained top, ``RelayConfig.sigma_max``
    (where its blur is complete, as in the nearest-upsampled start state): all ``steps`` levels
    are then kept. A pipeline never runs levels above that top (see ``RelayPipeline``)."""
    steps: int = 64                 # levels of the full grid BEFORE truncation
    sigma_min: float = 0.008
    sigma_max: float | None = 80.0  # None: the relay checkpoint's trained top
    rho: float = 7.0
    sigma_cut: float = 0.9          # the relay stage starts at the first level below this
    s_noise: float = 0.2            # stochasticity s in [0, 1) (0: ODE-like)
    cfg: float = 1.0                # classifier-free guidance scale (1: off)
    fresh_correction_noise: bool = False   # True: the authors' code (new noise in the Heun step)
    t_truncation: float | None = None      # T' of t(sigma); None: the RelayConfig's truncation
    heun_last_level: bool = True           # False: Euler into the last nonzero level (SPEC 6 wording)
    correction: str = "slope"              # Heun average: "slope" (paper) or "denoised" (keeps the marginal)
    churn: float = 0.0                     # churn of the authors' CelebA-HQ relay sampler (S_churn; 0: off)
    churn_min: float = 0.0                 # churn only for sigma in [churn_min, churn_max]
    churn_max: float = math.inf
    churn_noise: float = 1.0               # inflation of the churn noise (S_noise)

    def __post_init__(self):
        _check_common(self)
        if not (math.isfinite(self.churn) and self.churn >= 0 and self.churn_noise >= 0):
            raise ValueError(f"churn and churn_noise must be >= 0; got {self.churn!r}, {self.churn_noise!r}")
        if not 0.0 <= self.s_noise < 1.0:
            raise ValueError(f"s_noise must be in [0, 1); got {self.s_noise!r}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {CORRECTIONS}; got {self.correction!r}")

    def sigmas(self, device=None, trained_max: float | None = None) -> torch.Tensor:
        """The grid (float64, ending in 0). ``trained_max``: the relay stage's trained top
        (``RelayConfig.sigma_max``); required when ``sigma_max`` is None, otherwise unused
        (the pipeline drops levels above it itself)."""
        top = self.sigma_max
        if top is None:
            if trained_max is None:
                raise ValueError("this relay grid starts at the checkpoint's trained top (sigma_max=None): "
                                 "pass trained_max=RelayConfig.sigma_max")
            top = float(trained_max)
        grid = karras_sigmas(self.steps, min(self.sigma_min, top), top, self.rho, device)
        return grid if self.sigma_max is None else truncate_sigmas(grid, self.sigma_cut)

    def sampler_kwargs(self) -> dict:
        return dict(s_noise=self.s_noise, fresh_correction_noise=self.fresh_correction_noise,
                    t_truncation=self.t_truncation, heun_last_level=self.heun_last_level,
                    correction=self.correction, churn=self.churn, churn_min=self.churn_min,
                    churn_max=self.churn_max, churn_noise=self.churn_noise)


# the classes a class-conditional pipeline gives images when the caller names none:
# "random" (drawn from the seed) or "seed-mod" (the image of per-image seed s gets s % label_dim)
LABEL_MODES = ("random", "seed-mod")


@dataclasses.dataclass(frozen=True)
class SamplerPreset:
    """Settings of both stages; a relay stage of a longer cascade uses ``relay`` too.

    ``labels``: the classes of a class-conditional pipeline when ``class_labels`` is not given.
    ``"random"``: drawn from the seed. ``"seed-mod"``: with per-image seeds (``seeds=``), the
    image of seed ``s`` gets class ``s % label_dim``, as the authors' generate scripts
    (:func:`relaydiff.sampling.authors_class_labels`); with one batch seed there are no
    per-image seeds and the classes are random as with ``"random"``."""
    stage1: EDMSampling = EDMSampling()
    relay: RelaySampling = RelaySampling()
    labels: str = "random"

    def __post_init__(self):
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}; got {self.labels!r}")

    def with_steps(self, stage1: int | None = None, relay: int | None = None) -> "SamplerPreset":
        """A copy with other grid sizes (``None`` keeps a stage's)."""
        s1 = self.stage1 if stage1 is None else dataclasses.replace(self.stage1, steps=stage1)
        rl = self.relay if relay is None else dataclasses.replace(self.relay, steps=relay)
        return dataclasses.replace(self, stage1=s1, relay=rl)


PRESETS: dict[str, SamplerPreset] = {
    # Moderate cost: stage 1 63 NFE, relay 45 NFE (23 levels kept of 64).
    "default": SamplerPreset(),
    # Short runs (relaydiff demo, the tiny-relay training preset): a relay stage trained with a
    # low truncation (0.15: sigma <= 0.087) sampled from its trained top down on a few levels,
    # with the correction that keeps the forward marginal on coarse grids (docs/demo.md).
    "short": SamplerPreset(
        EDMSampling(steps=32),
        RelaySampling(steps=2, sigma_max=None, s_noise=0.0, correction="denoised")),
    # SPEC 9, ImageNet 256: relay 200-step grid, rho 100, cut 0.9 (100 levels kept), s 0.2,
    # CFG 3.5; stage 1 256 steps with churn 40 in [0.05, 50], S_noise 1.003.
    "imagenet256": SamplerPreset(
        EDMSampling(steps=256, s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003),
        RelaySampling(steps=200, rho=100.0, sigma_cut=0.9, s_noise=0.2, cfg=3.5)),
    # SPEC 9, CelebA-HQ 256: relay 150-step grid, rho 7, cut 0.95, s 0.2 and the authors'
    # T' = 1.05 in t(sigma). Stage 1 is deterministic EDM Heun with the authors' 120 steps
    # (their script adds an SDE term: the authors-celebahq256 preset).
    "celebahq256": SamplerPreset(
        EDMSampling(steps=120),
        RelaySampling(steps=150, rho=7.0, sigma_cut=0.95, s_noise=0.2, t_truncation=1.05)),
    # The authors' generate scripts (THUDM/RelayDiffusion generate_imagenet.py and
    # generate_celebahq.py, default options) step for step: their code's fresh noise in every
    # Heun correction, the Heun step into the last nonzero level, T' passed explicitly, their
    # grids; CelebA-HQ's stage 1 is their SDE sampler (sde_scale 0.05) and its relay sampler's
    # churn is off as in their script. Mixed noise without normalization, alpha, block size
    # and blur come from the relay checkpoint's RelayConfig (a converted release has
    # normalize_noise=False). Their class labels: the image of seed s gets class s % label_dim
    # (labels="seed-mod", with per-image seeds). Their images were also quantized as
    # floor(127.5 x + 128) and post-processed before their FIDs (authors_postprocess in
    # relaydiff.images, opt-in; docs/sampling.md).
    "authors-imagenet256": SamplerPreset(
        EDMSampling(steps=256, sigma_min=0.002, sigma_max=80.0, rho=7.0, s_churn=40.0, s_min=0.05,
                    s_max=50.0, s_noise=1.003),
        RelaySampling(steps=200, sigma_min=0.008, sigma_max=80.0, rho=100.0, sigma_cut=0.9, s_noise=0.2,
                      cfg=3.5, fresh_correction_noise=True, t_truncation=0.93, heun_last_level=True),
        labels="seed-mod"),
    "authors-celebahq256": SamplerPreset(
        EDMSampling(steps=120, sigma_min=0.002, sigma_max=80.0, rho=7.0, sde_scale=0.05),
        RelaySampling(steps=150, sigma_min=0.008, sigma_max=80.0, rho=7.0, sigma_cut=0.95, s_noise=0.2,
                      fresh_correction_noise=True, t_truncation=1.05, heun_last_level=True),
        labels="seed-mod"),
}


def get_preset(name: str | SamplerPreset) -> SamplerPreset:
    """A preset by name (see ``PRESETS``), or ``name`` itself if it is a ``SamplerPreset``."""
    if isinstance(name, SamplerPreset):
        return name
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler preset {name!r}; choose one of {sorted(PRESETS)}") from None
