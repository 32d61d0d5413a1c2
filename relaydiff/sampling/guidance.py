"""Classifier-free guidance as a denoiser wrapper (SPEC 6: ``D = w D(c) - (w - 1) D(uncond)``)."""
from __future__ import annotations

import math

import torch


class ClassifierFreeGuidance:
    """``denoiser`` guided with scale ``w``: one call on the doubled batch
    ``[x; x]`` with labels ``[c; 0]`` (the all-zero label is the unconditional model of a
    network trained with label dropout), combined as ``w D(c) - (w - 1) D(0)``.

    ``w = 1`` or ``class_labels=None`` calls ``denoiser`` once on the plain batch, so the
    wrapper costs nothing when guidance is off. A sampler counts each call as one NFE; a
    guided call runs the network on twice the batch.
    """

    def __init__(self, denoiser, scale: float):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"scale must be a finite number >= 0; got {scale!r}")
        self.denoiser = denoiser
        self.scale = float(scale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        if self.scale == 1.0 or class_labels is None:
            return self.denoiser(x, sigma, class_labels)
        out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                            torch.cat([class_labels, torch.zeros_like(class_labels)]))
        cond, uncond = out.chunk(2)
        return self.scale * cond - (self.scale - 1.0) * uncond

    def round_sigma(self, sigma) -> torch.Tensor:
        """The wrapped denoiser's ``round_sigma`` (the levels it is evaluated at, which
        ``sample_edm`` rounds its grid to, as EDM's sampler); the identity where it has none."""
        inner = getattr(self.denoiser, "round_sigma", None)
        return inner(sigma) if callable(inner) else torch.as_tensor(sigma)

    def __repr__(self) -> str:
        return f"ClassifierFreeGuidance(scale={self.scale}, denoiser={self.denoiser!r})"


def cfg(denoiser, scale: float) -> ClassifierFreeGuidance:
    """Wrap ``denoiser(x, sigma, class_labels)`` with classifier-free guidance of ``scale``."""
    return ClassifierFreeGuidance(denoiser, scale)
