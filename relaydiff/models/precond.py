"""Preconditioning: a network ``F`` becomes the denoiser ``D(x; sigma, c) = c_skip x + c_out F(c_in x;
c_noise, c)`` (SPEC 5), in the four forms of EDM's ``training/networks.py`` (Karras et al. 2022,
Table 1).

* EDM: with ``sd = sigma_data``, ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd /
  sqrt(sigma^2 + sd^2)``, ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4``;
* VP (Song et al. 2021; EDM's DDPM++ baselines): ``c_skip = 1``, ``c_out = -sigma``,
  ``c_in = 1 / sqrt(sigma^2 + 1)``, ``c_noise = (M - 1) t(sigma)`` with ``t`` the inverse of
  ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``;
* VE (Song et al. 2021; the NCSN++ baseline): ``c_skip = 1``, ``c_out = sigma``, ``c_in = 1``,
  ``c_noise = ln(sigma / 2)``;
* iDDPM (Nichol & Dhariwal 2021; the ADM baseline): ``c_skip = 1``, ``c_out = -sigma``,
  ``c_in = 1 / sqrt(sigma^2 + 1)``, ``c_noise = M - 1 - j`` for the level ``u_j`` of its
  discrete table nearest to ``sigma``; the network predicts ``2 C`` channels, the first ``C`` are used.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

_AMP_DTYPES = {None: None, "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def preconditioning(sigma: torch.Tensor, sigma_data: float = 0.5):
    """``(c_skip, c_out, c_in, c_noise)`` for ``sigma`` (any shape, same dtype), SPEC 5."""
    s2 = sigma * sigma + sigma_data ** 2
    return sigma_data ** 2 / s2, sigma * sigma_data / s2.sqrt(), 1.0 / s2.sqrt(), sigma.log() / 4


class Precond(nn.Module):
    """The denoiser ``D(x, sigma, class_labels) -> x0_hat`` of the contract around ``model``;
    subclasses give the coefficients.

    ``model(x_in, c_noise, class_labels)`` is any network with EDM's signature (a
    :class:`~relaydiff.models.DhariwalUNet` or :class:`~relaydiff.models.SongUNet`); it is held
    as ``self.model`` so the state dict of EDM's preconditioner maps onto this one key for key.

    Shapes: ``x`` ``[B, C, H, W]``; ``sigma`` ``[B]``, ``[B, 1, 1, 1]`` or a scalar; ``class_labels``
    ``[B, label_dim]`` one-hot float (None: all zeros, the unconditional/CFG-dropped input).
    The preconditioning and the output are float32, or float64 when ``x`` and the network's
    parameters are float64 (``denoiser.double()``: gradient checks and float64 oracles).
    ``amp`` = ``"bfloat16"`` / ``"float16"`` runs the network under ``torch.autocast`` at that
    precision (``None``/``"float32"``: full precision). ``sigma_min`` / ``sigma_max`` are the
    range the network was trained on: EDM's sampler clamps its grid to it.
    """

    def __init__(self, model: nn.Module, img_resolution: int | None = None, img_channels: int | None = None,
                 label_dim: int | None = None, amp: str | None = None):
        super().__init__()
        self.model = model
        self.img_resolution = img_resolution if img_resolution is not None else getattr(model, "img_resolution")
        self.img_channels = img_channels if img_channels is not None else getattr(model, "in_channels")
        self.label_dim = label_dim if label_dim is not None else getattr(model, "label_dim", 0)
        self.amp = amp

    @property
    def amp(self) -> str | None:
        return self._amp

    @amp.setter
    def amp(self, value: str | None) -> None:
        if value not in _AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(k for k in _AMP_DTYPES if k)} or None; got {value!r}")
        self._amp = value

    def config(self) -> dict:
        """The constructor keywords worth saving (checkpoint metadata ``"precond"``)."""
        raise NotImplementedError

    def coefficients(self, sigma: torch.Tensor):
        """``(c_skip, c_out, c_in, c_noise)`` for ``sigma`` ``[B, 1, 1, 1]`` (its dtype)."""
        raise NotImplementedError

    def round_sigma(self, sigma) -> torch.Tensor:
        """The noise level the network is evaluated at (the identity but for iDDPM)."""
        return torch.as_tensor(sigma)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if x.dtype != torch.float64:
            return torch.float32
        p = next(self.model.parameters(), None)
        return torch.float64 if p is None or p.dtype == torch.float64 else torch.float32

    def _autocast(self, device_type: str):
        dtype = _AMP_DTYPES[self._amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=dtype)

    def _denoised_part(self, f: torch.Tensor) -> torch.Tensor:
        return f

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None,
                **model_kwargs) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.img_channels:
            raise ValueError(f"x must be [B, {self.img_channels}, H, W]; got {tuple(x.shape)}")
        dtype = self.compute_dtype(x)
        x = x.to(dtype)
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
        if sigma.numel() == 1:
            sigma = sigma.reshape(1).expand(b)
        if sigma.numel() != b:
            raise ValueError(f"sigma must be a scalar or have {b} elements ([B]); got shape {tuple(sigma.shape)}")
        sigma = sigma.reshape(b, 1, 1, 1)
        if self.label_dim:
            if class_labels is None:
                class_labels = torch.zeros(b, self.label_dim, device=x.device)
            class_labels = class_labels.to(dtype).reshape(-1, self.label_dim)
        else:
            class_labels = None

        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        with self._autocast(x.device.type):
            f = self.model(c_in * x, c_noise.flatten(), class_labels, **model_kwargs)
        return c_skip * x + c_out * self._denoised_part(f).to(dtype)


class EDMPrecond(Precond):
    """EDM's preconditioning (SPEC 5) around ``model``: the form relaydiff trains."""

    def __init__(self, model: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.0,
                 sigma_max: float = math.inf, img_resolution: int | None = None,
                 img_channels: int | None = None, label_dim: int | None = None, amp: str | None = None):
        super().__init__(model, img_resolution, img_channels, label_dim, amp)
        self.sigma_data = float(sigma_data)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def config(self) -> dict:
        """The default range ``[0, inf)`` is left out because JSON has no infinity."""
        c = dict(sigma_data=self.sigma_data)
        if self.sigma_min > 0:
            c["sigma_min"] = self.sigma_min
        if math.isfinite(self.sigma_max):
            c["sigma_max"] = self.sigma_max
        return c

    def coefficients(self, sigma: torch.Tensor):
        return preconditioning(sigma, self.sigma_data)


class VPPrecond(Precond):
    """Variance-preserving preconditioning (EDM's ``VPPrecond``): ``sigma(t) = sqrt(exp(beta_d t^2 / 2
    + beta_min t) - 1)`` for ``t`` in ``[epsilon_t, 1]``, which is the range ``[sigma_min,
    sigma_max]``; the network sees ``c_noise = (M - 1) t``."""

    def __init__(self, model: nn.Module, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000,
                 epsilon_t: float = 1e-5, img_resolution: int | None = None, img_channels: int | None = None,
                 label_dim: int | None = None, amp: str | None = None):
        super().__init__(model, img_resolution, img_channels, label_dim, amp)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)
        # Python floats (float64), not tensors: the model may be built on the meta device
        self.sigma_min, self.sigma_max = (math.sqrt(math.expm1(0.5 * self.beta_d * t * t + self.beta_min * t))
                                          for t in (self.epsilon_t, 1.0))

    def config(self) -> dict:
        return dict(class_name="VPPrecond", beta_d=self.beta_d, beta_min=self.beta_min, M=self.M,
                    epsilon_t=self.epsilon_t)

    # sigma(t) and t(sigma) are evaluated as EDM writes them (exp - 1, log(1 + s^2), not expm1 /
    # log1p): in float32 log(1 + s^2) is coarse at small sigma, and the released networks were
    # trained and are sampled with exactly that c_noise
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return ((0.5 * self.beta_d * t * t + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: torch.Tensor) -> torch.Tensor:
        """``t(sigma)``, the root of the quadratic ``beta_d t^2 / 2 + beta_min t = ln(1 + sigma^2)``."""
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma * sigma).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma: torch.Tensor):
        return (torch.ones_like(sigma), -sigma, 1.0 / (sigma * sigma + 1).sqrt(),
                (self.M - 1) * self.sigma_inv(sigma))


class VEPrecond(Precond):
    """Variance-exploding preconditioning (EDM's ``VEPrecond``), trained on ``[sigma_min, sigma_max]``."""

    def __init__(self, model: nn.Module, sigma_min: float = 0.02, sigma_max: float = 100.0,
                 img_resolution: int | None = None, img_channels: int | None = None,
                 label_dim: int | None = None, amp: str | None = None):
        super().__init__(model, img_resolution, img_channels, label_dim, amp)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def config(self) -> dict:
        return dict(class_name="VEPrecond", sigma_min=self.sigma_min, sigma_max=self.sigma_max)

    def coefficients(self, sigma: torch.Tensor):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


def iddpm_levels(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """iDDPM's noise levels ``u`` ``[M + 1]`` (decreasing, ``u_M = 0``), evaluated in ``dtype``:
    ``u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j - 1) / abar(j), C_1) - 1)`` with the cosine schedule
    ``abar(j) = sin^2(pi j / (2 M (C_2 + 1)))``. In float32 this is bit for bit EDM's table (the
    recurrence accumulates ~5e-4 relative error there, so the precision matters)."""
    abar = (0.5 * math.pi * torch.arange(M + 1, device="cpu").to(dtype) / M / (C_2 + 1)).sin() ** 2
    ratio = (abar[:-1] / abar[1:]).clamp(min=C_1)
    u = torch.zeros(M + 1, dtype=dtype, device="cpu")
    for j in range(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / ratio[j - 1] - 1).sqrt()
    return u


class iDDPMPrecond(Precond):   # noqa: N801 (EDM's class name, which converted files record)
    """Improved-DDPM preconditioning (EDM's ``iDDPMPrecond``) around a network with ``2 C``
    output channels. The buffer ``u`` ``[M + 1]`` holds the discrete levels (:func:`iddpm_levels`
    in float32, as EDM computes and saves them); the range is ``[u_{M-1}, u_0]`` and
    :meth:`round_sigma` snaps to the nearest level."""

    def __init__(self, model: nn.Module, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000,
                 img_resolution: int | None = None, img_channels: int | None = None,
                 label_dim: int | None = None, amp: str | None = None):
        super().__init__(model, img_resolution, img_channels, label_dim, amp)
        out = getattr(model, "out_channels", 2 * self.img_channels)
        if out != 2 * self.img_channels:
            raise ValueError(f"iDDPMPrecond needs a network with 2 x {self.img_channels} output channels; got {out}")
        self.C_1, self.C_2, self.M = float(C_1), float(C_2), int(M)
        self.register_buffer("u", iddpm_levels(self.M, self.C_1, self.C_2, torch.float32))

    @property
    def sigma_min(self) -> float:
        return float(self.u[self.M - 1])

    @property
    def sigma_max(self) -> float:
        return float(self.u[0])

    def config(self) -> dict:
        return dict(class_name="iDDPMPrecond", C_1=self.C_1, C_2=self.C_2, M=self.M)

    def round_sigma(self, sigma, return_index: bool = False) -> torch.Tensor:
        """The nearest level ``u_j`` to each element of ``sigma`` (same shape and dtype), or ``j``
        (int64) with ``return_index``. The distance is taken in the table's dtype, as EDM does."""
        sigma = torch.as_tensor(sigma)
        u = self.u.to(sigma.device)
        index = (sigma.to(u.dtype).reshape(-1, 1) - u.reshape(1, -1)).abs().argmin(1).reshape(sigma.shape)
        return index if return_index else u[index].to(sigma.dtype)

    def coefficients(self, sigma: torch.Tensor):
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(sigma.dtype)
        return torch.ones_like(sigma), -sigma, 1.0 / (sigma * sigma + 1).sqrt(), c_noise

    def _denoised_part(self, f: torch.Tensor) -> torch.Tensor:
        return f[:, :self.img_channels]


PRECONDITIONERS: dict[str, type[Precond]] = {
    cls.__name__: cls for cls in (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond)}
