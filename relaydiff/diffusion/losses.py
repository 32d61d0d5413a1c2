"""Training losses: plain EDM for stage 1 and the relay loss for stage 2 (SPEC 4-5).

A loss is a callable ``loss(net, images, labels=None) -> [B, C, H, W]`` per-element weighted
squared error ``lambda(sigma) * (D(x_t; sigma, c) - x0)^2`` with
``lambda = (sigma^2 + sd^2) / (sigma sd)^2``; ``net`` is a denoiser of the contract
(:class:`~relaydiff.models.EDMPrecond`), ``images`` ``[B, C, H, W]`` in [-1, 1], ``labels``
``[B, label_dim]`` one-hot or None. Randomness comes from torch's global generator, so
``torch.manual_seed`` (and a saved RNG state) makes a run repeatable. ``augment`` (optional,
e.g. :class:`relaydiff.training.augment.GeometricAugment`) maps ``images -> (images,
augment_labels)`` before the corruption; the labels go to the network as ``augment_labels``.
"""
from __future__ import annotations

from typing import Callable

import torch

from relaydiff import ops
from relaydiff.config import NoiseConfig, RelayConfig


def loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM's ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2`` (SPEC 5)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def drop_labels(labels: torch.Tensor | None, p: float) -> torch.Tensor | None:
    """Zero each row of ``labels`` ``[B, label_dim]`` with probability ``p``: the zero vector is
    the unconditional input that classifier-free guidance contrasts with (SPEC 5)."""
    if labels is None or p <= 0.0:
        return labels
    keep = torch.rand(labels.shape[0], 1, device=labels.device) >= p
    return labels * keep.to(labels.dtype)


class _Loss:
    def __init__(self, sigma_data: float, label_dropout: float, augment=None):
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1); got {label_dropout!r}")
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be callable (images -> (images, labels)); got {type(augment).__name__}")
        self.sigma_data = float(sigma_data)
        self.label_dropout = float(label_dropout)
        self.augment = augment

    def corrupt(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ``(x_t, sigma [B])``."""
        raise NotImplementedError

    def condition(self, images: torch.Tensor) -> dict:
        """Extra keywords the network gets, from the clean (augmented) ``images``; none by default."""
        return {}

    def __call__(self, net, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {}
        if self.augment is not None:
            # the augmented image is the clean target; the network is told what was done
            images, kwargs["augment_labels"] = self.augment(images)
        kwargs.update(self.condition(images))
        x_t, sigma = self.corrupt(images)
        denoised = net(x_t, sigma, drop_labels(labels, self.label_dropout), **kwargs)
        w = loss_weight(sigma, self.sigma_data).reshape(-1, 1, 1, 1)
        return w * (denoised - images) ** 2


class EDMLoss(_Loss):
    """Stage 1 (SPEC 4-5): ``ln sigma ~ N(p_mean, p_std^2)``, ``x_t = x0 + sigma n`` with ``n``
    white (``torch.randn``) or, for ``noise`` with ``alpha > 0``, the mixed block noise of
    SPEC 3 (paper App. C.2); sample such a model with the same ``noise`` in ``sample_edm``."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5,
                 label_dropout: float = 0.0, augment=None, noise: NoiseConfig | None = None):
        super().__init__(sigma_data, label_dropout, augment)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.noise = NoiseConfig.of(noise)

    def corrupt(self, images):
        sigma = (torch.randn(images.shape[0], device=images.device) * self.p_std + self.p_mean).exp()
        # white noise stays torch.randn, so white runs draw exactly what they always drew
        n = torch.randn_like(images) if self.noise.white else self.noise.draw(images)
        return images + sigma.reshape(-1, 1, 1, 1) * n, sigma


class LowResEDMLoss(EDMLoss):
    """The conventional cascade's super-resolution model (CDM / ADM-U, paper Sec. 3): the EDM
    loss of ``x_t = x0 + sigma n`` from pure noise, the network also given
    ``low = BoxDown_p(x0)`` ``[B, C, H/p, W/p]`` (the ``low=`` keyword of
    :class:`~relaydiff.models.conditioned.LowResConcat`); ``n`` white."""

    def __init__(self, factor: int, **kwargs):
        super().__init__(**kwargs)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be a positive integer; got {factor!r}")
        self.factor = factor

    def condition(self, images):
        return {"low": torch.nn.functional.avg_pool2d(images, self.factor)}


class RelayLoss(_Loss):
    """Relay stage (SPEC 4-5): ``(sigma, blur)`` from ``relay.sample_training`` (truncated
    log-normal, blur from the same ``t``), ``x_t = Blur(x0) + sigma n`` with ``n`` the mixed
    block noise. The blur is ``relay.blur``'s: the fused ``relay_corrupt`` op (patch-DCT blur,
    ``tau``) or ``linear_relay_corrupt`` (CogView3's linear blur, weight ``w``, SPEC 2b);
    ``corrupt`` swaps in another implementation with their signature, e.g.
    ``relaydiff.ops.reference.relay_corrupt``. The target is the unblurred ``x0``; ``images``
    are the high-resolution images only."""

    def __init__(self, relay: RelayConfig, sigma_data: float = 0.5, label_dropout: float = 0.0,
                 corrupt: Callable[..., torch.Tensor] | None = None, augment=None):
        super().__init__(sigma_data, label_dropout, augment)
        self.relay = relay
        if corrupt is None:
            corrupt = ops.linear_relay_corrupt if relay.blur == "linear" else ops.relay_corrupt
        self._corrupt = corrupt

    def corrupt(self, images):
        sigma, blur = self.relay.sample_training(images.shape[0], device=images.device)
        # the op draws its noise seed from torch's global generator when seed is None
        x_t = self._corrupt(images, sigma, blur, **self.relay.op_kwargs())
        return x_t, sigma
