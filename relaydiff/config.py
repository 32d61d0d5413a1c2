"""``RelayConfig``: the relay stage's settings, shared by the relay loss and the relay sampler.

SPEC sections 2-4. ``t`` is the diffusion time in [0, 1]; the noise level and the blur are
both functions of it:

* ``sigma(t) = exp(p_mean + p_std * Phi^-1(truncation * t))`` (training draws ``t ~ U(0, 1)``
  and clamps it from below where ``sigma(t) = sigma_floor``),
* ``sigma_B(t) = blur_sigma_max * sin^2(pi t / 2)``, ``tau(t) = sigma_B(t)^2 / 2``,
* the sampler maps a noise level back with ``t(sigma) = Phi((ln sigma - p_mean) / p_std) / T'``,
  ``T'`` = ``truncation`` unless given (the authors' CelebA-HQ script used 1.05).

``blur`` picks the blur: ``"dct"`` (the paper's patch-DCT heat dissipation, driven by ``tau``)
or ``"linear"`` (CogView3's linear blur towards the patch mean with weight ``w(t) = t``, SPEC 2b).

``NoiseConfig``: the noise of a stage-1 (end-to-end) model, white or mixed block noise
(SPEC 3; paper App. C.2), shared by ``EDMLoss`` and ``sample_edm``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from relaydiff.ops import mixed_noise

_SQRT2 = math.sqrt(2.0)


def _phi(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(z / _SQRT2))


def _phi_inv(p: torch.Tensor) -> torch.Tensor:
    return _SQRT2 * torch.erfinv(2.0 * p - 1.0)


def _as_tensor(v) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.to(torch.float64)
    return torch.as_tensor(v, dtype=torch.float64)


BLURS = ("dct", "linear")


@dataclasses.dataclass(frozen=True)
class RelayConfig:
    patch_size: int = 4             # p: patch of the blur = relay up-scaling factor (2, 4, 8, 16)
    alpha: float = 0.15             # weight of block noise in the mixed noise
    block_size: int = 4             # s: block-noise kernel size
    truncation: float = 0.93        # T: the relay stage covers Phi^-1 up to T (0.93 ImageNet, 0.89 CelebA-HQ)
    blur_sigma_max: float = 3.0     # sigma_B at t = 1
    min_scale: float = 1e-3         # floor m of the blur factors (0 = pure paper form)
    p_mean: float = -1.2            # log-normal noise schedule mean
    p_std: float = 1.2              # log-normal noise schedule std
    sigma_floor: float = 0.0075     # training never goes below this sigma
    normalize_noise: bool = True    # divide mixed noise by sqrt(1 + alpha^2) (False: authors' code)
    blur: str = "dct"               # "dct": patch-DCT heat dissipation (paper); "linear": CogView3 (SPEC 2b)

    def __post_init__(self):
        if self.blur not in BLURS:
            raise ValueError(f"blur must be one of {BLURS}; got {self.blur!r}")
        if self.patch_size not in (2, 4, 8, 16):
            raise ValueError(f"patch_size must be one of (2, 4, 8, 16); got {self.patch_size!r}")
        if not 1 <= self.block_size <= 16:
            raise ValueError(f"block_size must be in [1, 16]; got {self.block_size!r}")
        if not 0.0 < self.truncation <= 1.0:
            raise ValueError(f"truncation must be in (0, 1]; got {self.truncation!r}")
        if not (self.alpha >= 0.0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be finite and non-negative; got {self.alpha!r}")
        if not (self.blur_sigma_max >= 0.0 and math.isfinite(self.blur_sigma_max)):
            raise ValueError(f"blur_sigma_max must be finite and non-negative; got {self.blur_sigma_max!r}")
        if not 0.0 <= self.min_scale < 1.0:
            raise ValueError(f"min_scale must be in [0, 1); got {self.min_scale!r}")
        if not (self.p_std > 0.0 and math.isfinite(self.p_mean)):
            raise ValueError(f"p_std must be positive and p_mean finite; got {self.p_std!r}, {self.p_mean!r}")
        if not self.sigma_floor > 0.0:
            raise ValueError(f"sigma_floor must be positive; got {self.sigma_floor!r}")

    # -- published settings (SPEC 9)
    @classmethod
    def imagenet256(cls, **overrides) -> "RelayConfig":
        """ImageNet 64 -> 256: p 4, alpha 0.15, T 0.93, sigma_B max 3.0."""
        return cls(**{**dict(patch_size=4, alpha=0.15, block_size=4, truncation=0.93,
                             blur_sigma_max=3.0), **overrides})

    @classmethod
    def celebahq256(cls, **overrides) -> "RelayConfig":
        """CelebA-HQ 64 -> 256: p 4, alpha 0.15, T 0.89, sigma_B max 2.0."""
        return cls(**{**dict(patch_size=4, alpha=0.15, block_size=4, truncation=0.89,
                             blur_sigma_max=2.0), **overrides})

    # -- schedules
    def sigma_of_t(self, t) -> torch.Tensor:
        t = _as_tensor(t)
        return torch.exp(self.p_mean + self.p_std * _phi_inv(self.truncation * t))

    def t_of_sigma(self, sigma, t_truncation: float | None = None) -> torch.Tensor:
        """``Phi((ln sigma - p_mean) / p_std) / T'`` clamped to [0, 1]; ``T'`` defaults to
        ``truncation``. ``sigma = 0`` gives ``t = 0`` (no blur)."""
        tt = self.truncation if t_truncation is None else float(t_truncation)
        s = _as_tensor(sigma)
        z = (torch.log(s.clamp_min(1e-300)) - self.p_mean) / self.p_std
        t = torch.where(s > 0, _phi(z) / tt, torch.zeros_like(s))
        return t.clamp(0.0, 1.0)

    def tau_of_t(self, t) -> torch.Tensor:
        """Blur time ``tau = sigma_B(t)^2 / 2`` with ``sigma_B(t) = blur_sigma_max sin^2(pi t / 2)``."""
        t = _as_tensor(t)
        sigma_b = self.blur_sigma_max * torch.sin(0.5 * math.pi * t) ** 2
        return 0.5 * sigma_b ** 2

    def tau_of_sigma(self, sigma, t_truncation: float | None = None) -> torch.Tensor:
        return self.tau_of_t(self.t_of_sigma(sigma, t_truncation))

    def blur_of_t(self, t) -> torch.Tensor:
        """The argument the blur's ops take at time ``t``: ``tau(t)`` for ``blur="dct"``, the
        weight ``w(t) = t`` (clamped to [0, 1]) for ``blur="linear"`` (SPEC 2b)."""
        if self.blur == "linear":
            return _as_tensor(t).clamp(0.0, 1.0)
        return self.tau_of_t(t)

    def blur_of_sigma(self, sigma, t_truncation: float | None = None) -> torch.Tensor:
        return self.blur_of_t(self.t_of_sigma(sigma, t_truncation))

    @property
    def t_min(self) -> float:
        """The ``t`` where ``sigma(t) = sigma_floor``: training clamps ``t`` from below to it."""
        z = (math.log(self.sigma_floor) - self.p_mean) / self.p_std
        return float(_phi(torch.tensor(z, dtype=torch.float64))) / self.truncation

    @property
    def sigma_max(self) -> float:
        """The noise level at ``t = 1``: where the relay stage starts when trained."""
        return float(self.sigma_of_t(1.0))

    def sample_training(self, batch: int, generator: torch.Generator | None = None,
                        device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``t ~ U(0, 1)`` (clamped to ``t_min``) -> float32 ``(sigma, blur)``, each ``[batch]``,
        ``blur`` = :meth:`blur_of_t` (``tau``, or the linear blur's weight)."""
        t = torch.rand(batch, generator=generator, dtype=torch.float64).clamp_min(self.t_min)
        sigma, blur = self.sigma_of_t(t), self.blur_of_t(t)
        return sigma.to(device=device, dtype=torch.float32), blur.to(device=device, dtype=torch.float32)

    # -- plumbing
    def op_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``relay_corrupt``/``relay_step`` (and of their linear-blur
        counterparts ``linear_relay_corrupt``/``linear_relay_step``) for this config."""
        return dict(patch_size=self.patch_size, alpha=self.alpha, block_size=self.block_size,
                    min_scale=self.min_scale, normalize=self.normalize_noise)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RelayConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown RelayConfig fields: {sorted(unknown)}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    """The noise of a stage-1 (end-to-end) EDM model, shared by ``EDMLoss`` (training
    corruption ``x0 + sigma n``), ``sample_edm`` (churn noise) and the pipeline's initial latent
    ``sigma_max n``: white for ``alpha = 0`` (the default), else the mixed block noise of SPEC 3,
    ``n = (e + alpha Block_s(e2)) / sqrt(1 + alpha^2)`` (paper App. C.2, Fig. 6: alpha 0.15,
    s 4). Field names and checks are ``RelayConfig``'s; the relay stage uses that one instead."""
    alpha: float = 0.0              # weight of block noise in the mixed noise (0: white noise)
    block_size: int = 4             # s: block-noise kernel size, in [1, 16]
    normalize_noise: bool = True    # divide mixed noise by sqrt(1 + alpha^2) (False: authors' code)

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not (self.alpha >= 0.0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be finite and non-negative; got {self.alpha!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
                or not 1 <= self.block_size <= 16:
            raise ValueError(f"block_size must be an integer in [1, 16]; got {self.block_size!r}")
        if not isinstance(self.normalize_noise, bool):
            raise ValueError(f"normalize_noise must be a bool; got {self.normalize_noise!r}")

    @classmethod
    def of(cls, noise: "NoiseConfig | None", name: str = "noise") -> "NoiseConfig":
        """``noise`` itself, or white noise for ``None``."""
        if noise is None:
            return cls()
        if not isinstance(noise, cls):
            raise TypeError(f"{name} must be a NoiseConfig or None; got {type(noise).__name__}")
        return noise

    @property
    def white(self) -> bool:
        return self.alpha == 0.0

    def draw(self, like: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Noise shaped like ``like`` (its dtype and device), a pure function of ``(seed,
        shape)`` (``None``: a seed from torch's global generator). White noise is the white
        field of ``seed`` (``relaydiff.ops.mixed_noise`` stream 0) whatever ``block_size``."""
        return mixed_noise(like, alpha=float(self.alpha), block_size=1 if self.white else self.block_size,
                           normalize=self.normalize_noise, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NoiseConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown NoiseConfig fields: {sorted(unknown)}")
        return cls(**d)
