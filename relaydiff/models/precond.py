"""EDM preconditioning (Karras et al. 2022) around any network, SPEC 5.

``D(x; sigma, c) = c_skip x + c_out F(c_in x; c_noise, c)`` with ``sd = sigma_data``,
``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4``.
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


class EDMPrecond(nn.Module):
    """The denoiser ``D(x, sigma, class_labels) -> x0_hat`` of the contract around ``model``.

    ``model(x_in, c_noise, class_labels)`` is any network with EDM's signature (a
    :class:`~relaydiff.models.DhariwalUNet`); it is held as ``self.model`` so the state dict of
    an EDM ``EDMPrecond`` maps onto this one key for key.

    Shapes: ``x`` ``[B, C, H, W]``; ``sigma`` ``[B]``, ``[B, 1, 1, 1]`` or a scalar; ``class_labels``
    ``[B, label_dim]`` one-hot float (None: all zeros, the unconditional/CFG-dropped input).
    The preconditioning and the output are float32. ``amp`` = ``"bfloat16"`` / ``"float16"`` runs
    the network under ``torch.autocast`` at that precision (``None``/``"float32"``: full precision).
    """

    def __init__(self, model: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.0,
                 sigma_max: float = math.inf, img_resolution: int | None = None,
                 img_channels: int | None = None, label_dim: int | None = None, amp: str | None = None):
        super().__init__()
        self.model = model
        self.sigma_data = float(sigma_data)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
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
        """The constructor keywords worth saving (checkpoint metadata ``"precond"``); the default
        range ``[0, inf)`` is left out because JSON has no infinity."""
        c = dict(sigma_data=self.sigma_data)
        if self.sigma_min > 0:
            c["sigma_min"] = self.sigma_min
        if math.isfinite(self.sigma_max):
            c["sigma_max"] = self.sigma_max
        return c

    def round_sigma(self, sigma) -> torch.Tensor:
        return torch.as_tensor(sigma)

    def _autocast(self, device_type: str):
        dtype = _AMP_DTYPES[self._amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=dtype)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None,
                **model_kwargs) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.img_channels:
            raise ValueError(f"x must be [B, {self.img_channels}, H, W]; got {tuple(x.shape)}")
        x = x.to(torch.float32)
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.numel() == 1:
            sigma = sigma.reshape(1).expand(b)
        if sigma.numel() != b:
            raise ValueError(f"sigma must be a scalar or have {b} elements ([B]); got shape {tuple(sigma.shape)}")
        sigma = sigma.reshape(b, 1, 1, 1)
        if self.label_dim:
            if class_labels is None:
                class_labels = torch.zeros(b, self.label_dim, device=x.device)
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        else:
            class_labels = None

        c_skip, c_out, c_in, c_noise = preconditioning(sigma, self.sigma_data)
        with self._autocast(x.device.type):
            f = self.model(c_in * x, c_noise.flatten(), class_labels, **model_kwargs)
        return c_skip * x + c_out * f.to(torch.float32)
