"""``RelayConfig``: the relay stage's settings, shared by the relay loss and the relay sampler.

SPEC sections 2-4. ``t`` is the diffusion time in [0, 1]; the noise level and the blur are
both functions of it:

* ``sigma(t) = exp(p_mean + p_std * Phi^-1(truncation * t))`` (training draws ``t ~ U(0, 1)``
  and clamps it from below where ``sigma(t) = sigma_floor``),
* ``sigma_B(t) = blur_sigma_max * sin^2(pi t / 2)``, ``tau(t) = sigma_B(t)^2 / 2``,
* the sampler maps a noise level back with ``t(sigma) = Phi((ln sigma - p_mean) / p_std) / T'``,
  ``T'`` = ``truncation`` unless given (the authors' CelebA-HQ script used 1.05).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

_SQRT2 = math.sqrt(2.0)


def _phi(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(z / _SQRT2))


def _phi_inv(p: torch.Tensor) -> torch.Tensor:
    return _SQRT2 * torch.erfinv(2.0 * p - 1.0)


def _as_tensor(v) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.to(torch.float64)
    return torch.as_tensor(v, dtype=torch.float64)


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

    def __post_init__(self):
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
        """Draw ``t ~ U(0, 1)`` (clamped to ``t_min``) -> float32 ``(sigma, tau)``, each ``[batch]``."""
        t = torch.rand(batch, generator=generator, dtype=torch.float64).clamp_min(self.t_min)
        sigma, tau = self.sigma_of_t(t), self.tau_of_t(t)
        return sigma.to(device=device, dtype=torch.float32), tau.to(device=device, dtype=torch.float32)

    # -- plumbing
    def op_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``relay_corrupt``/``relay_step``/``mixed_noise`` for this config."""
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
