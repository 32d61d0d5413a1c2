"""A network that also sees a low-resolution image: the conventional cascade's super-resolution
model (CDM, Ho et al. 2022; ADM-U, Dhariwal & Nichol 2021), the baseline the relay stage
replaces (paper Sec. 3).

:class:`LowResConcat` wraps a network ``F`` with EDM's signature whose input has ``2 C``
channels: ``F'(x, c_noise, c; low) = F(cat([x, Up_p(low)]), c_noise, c)`` with ``Up_p`` the
nearest upsample by ``p = H / h``. Around it :class:`~relaydiff.models.EDMPrecond` gives the
denoiser ``D(x; sigma, c, low)`` (it passes ``low=`` through to the network); ``x`` is scaled
by ``c_in``, ``low`` is not (images in [-1, 1], as in SR3/CDM). Unlike the relay stage, such
a model is sampled from pure noise at ``sigma_max``.
"""
from __future__ import annotations

import torch
from torch import nn


class LowResConcat(nn.Module):
    """``net`` (``in_channels = 2 * out_channels``) conditioned on ``low`` ``[B, C, h, w]``, with
    ``H / h = W / w`` an integer; exposes ``in_channels = out_channels = C`` (the image),
    ``img_resolution`` and ``label_dim`` of ``net`` so a preconditioner wraps it as any network."""

    def __init__(self, net: nn.Module):
        super().__init__()
        c_in, c_out = getattr(net, "in_channels", None), getattr(net, "out_channels", None)
        if c_out is None or c_in != 2 * c_out:
            raise ValueError(f"LowResConcat needs a network with in_channels = 2 x out_channels; "
                             f"got {c_in} and {c_out}")
        self.net = net
        self.in_channels = self.out_channels = c_out
        self.img_resolution = getattr(net, "img_resolution", None)
        self.label_dim = getattr(net, "label_dim", 0)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                low: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        b, c, h, w = x.shape
        if low is None or low.dim() != 4 or low.shape[:2] != (b, c) or low.shape[2] < 1 \
                or h % low.shape[2] or w % low.shape[3] or h // low.shape[2] != w // low.shape[3]:
            got = None if low is None else tuple(low.shape)
            raise ValueError(f"low must be [{b}, {c}, h, w] with {h}/h = {w}/w an integer; got {got}")
        p = h // low.shape[2]
        up = low.to(x.dtype).repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)
        return self.net(torch.cat([x, up], dim=1), noise_labels, class_labels, **kwargs)
