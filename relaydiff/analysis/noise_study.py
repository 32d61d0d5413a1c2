"""The frequency study of the paper (Fig. 2, Fig. 8, App. D): how white noise at low and high
resolution and block noise corrupt the spectrum of natural images.

Three noises at the high resolution ``H x W`` (all unit variance per pixel, from
:mod:`relaydiff.ops` so they are the library's own noise):

* ``white_low``: white noise at ``H/f x W/f``, nearest-upsampled by ``f`` -- what a
  ``H/f`` model's noise looks like on the ``H`` grid;
* ``white``: white noise at ``H x W``;
* ``block``: block noise ``Block_s`` (SPEC 3) at ``H x W``.

The images paired with ``white_low`` are the low-resolution versions (box-downsampled by
``f``, nearest-upsampled back), as the paper compares a 64 px image upsampled to 256 px; the
others use the ``H`` images. Claims (SPEC 10): in the bands below the low resolution's Nyquist
frequency (``pi / f``) block noise has nearly the PSD of ``white_low`` while ``white`` is far
below it; at a fixed sigma the SNR curve of the high resolution lies above that of the low one.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from relaydiff.ops import block_noise, mixed_noise
from relaydiff.sampling.relay import nearest_upsample

from .spectrum import MAX_FREQ, bin_mean, dct2, radial_bins

NOISE_KINDS = ("white_low", "white", "block")
NOISE_LABELS = {
    "white_low": "white noise at {low} px, nearest-upsampled",
    "white": "white noise at {high} px",
    "block": "block noise (s={s}) at {high} px",
}


def low_resolution(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Box-downsample by ``factor`` and nearest-upsample back: the low-resolution image on the high grid."""
    return nearest_upsample(F.avg_pool2d(images, factor), factor)


def make_noise(kind: str, shape, factor: int = 4, block_size: int = 4, seed: int = 0,
               dtype=torch.float64) -> torch.Tensor:
    """Unit-variance noise ``[B, C, H, W]`` of ``kind`` (see :data:`NOISE_KINDS`)."""
    b, c, h, w = shape
    if kind == "white_low":
        if h % factor or w % factor:
            raise ValueError(f"H and W must be multiples of factor={factor}; got {h} x {w}")
        low = torch.zeros(b, c, h // factor, w // factor, dtype=dtype)
        # alpha = 0: the white field alone (block_size only has to fit the small grid)
        return nearest_upsample(mixed_noise(low, alpha=0.0, block_size=1, seed=seed), factor)
    like = torch.zeros(b, c, h, w, dtype=dtype)
    if kind == "white":
        return mixed_noise(like, alpha=0.0, block_size=1, seed=seed)
    if kind == "block":
        return block_noise(like, block_size=block_size, seed=seed)
    raise ValueError(f"kind must be one of {NOISE_KINDS}; got {kind!r}")


@dataclasses.dataclass
class FrequencyStudy:
    """Per-bin curves, all ``[num_bins]`` float64 arrays on the axis ``freqs``.

    ``image_psd[res]`` (res ``"high"``/``"low"``), ``noise_psd[kind]`` (unit sigma),
    ``noisy_psd[(kind, sigma)]`` (image + sigma * noise), ``snr[(kind, sigma)]``."""
    freqs: np.ndarray
    sigmas: tuple[float, ...]
    factor: int
    block_size: int
    resolution: tuple[int, int]
    image_psd: dict[str, np.ndarray]
    noise_psd: dict[str, np.ndarray]
    noisy_psd: dict[tuple[str, float], np.ndarray]
    snr: dict[tuple[str, float], np.ndarray]

    def low_band(self) -> np.ndarray:
        """Mask of the bins below the low resolution's Nyquist frequency ``pi / factor``."""
        return self.freqs < math.pi / self.factor

    def label(self, kind: str) -> str:
        h = self.resolution[0]
        return NOISE_LABELS[kind].format(low=h // self.factor, high=h, s=self.block_size)

    def claims(self) -> dict[str, float]:
        """The paper's claims as numbers, over the low bands:

        ``block_vs_white_low`` / ``white_vs_white_low``: mean ``|ln|`` ratio of the noise PSDs
        to that of ``white_low`` (0 = identical); ``snr_gain_resolution``: median over bands and
        sigmas of SNR(``white``) / SNR(``white_low``) (> 1: the high resolution keeps more signal);
        ``snr_block_vs_white_low``: the same median for block noise (~1: block noise at H corrupts
        like white noise at H/f)."""
        lo = self.low_band() & np.isfinite(self.noise_psd["white_low"])
        ref = np.log(self.noise_psd["white_low"][lo])
        gain = [self.snr[("white", s)][lo] / self.snr[("white_low", s)][lo] for s in self.sigmas]
        block = [self.snr[("block", s)][lo] / self.snr[("white_low", s)][lo] for s in self.sigmas]
        return {
            "block_vs_white_low": float(np.mean(np.abs(np.log(self.noise_psd["block"][lo]) - ref))),
            "white_vs_white_low": float(np.mean(np.abs(np.log(self.noise_psd["white"][lo]) - ref))),
            "snr_gain_resolution": float(np.median(np.concatenate(gain))),
            "snr_block_vs_white_low": float(np.median(np.concatenate(block))),
        }


def frequency_study(images: torch.Tensor, sigmas=(0.1, 0.3, 1.0, 3.0), factor: int = 4, block_size: int = 4,
                    num_bins: int = 64, max_freq: float = MAX_FREQ, seed: int = 0) -> FrequencyStudy:
    """Run the study on ``images [B, C, H, W]`` in [-1, 1] (H, W multiples of ``factor``).
    Noise seeds: ``seed`` for every kind (the kinds use different Philox streams or shapes)."""
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W]; got shape {tuple(images.shape)}")
    if factor < 1 or images.shape[-2] % factor or images.shape[-1] % factor:
        raise ValueError(f"H and W must be multiples of factor={factor}; got {tuple(images.shape[-2:])}")
    sigmas = tuple(float(s) for s in sigmas)
    if not sigmas or any(not s > 0 for s in sigmas):
        raise ValueError(f"sigmas must be positive; got {sigmas}")
    high = images.to(torch.float64)
    versions = {"high": high, "low": low_resolution(high, factor)}
    bins = radial_bins(*high.shape[-2:], num_bins=num_bins, max_freq=max_freq)
    u_img = {res: dct2(x) for res, x in versions.items()}
    image_psd = {res: bin_mean(u ** 2, bins) for res, u in u_img.items()}
    noise_psd, noisy_psd, snr = {}, {}, {}
    for kind in NOISE_KINDS:
        u_noise = dct2(make_noise(kind, high.shape, factor, block_size, seed))
        noise_psd[kind] = bin_mean(u_noise ** 2, bins)
        res = "low" if kind == "white_low" else "high"
        for s in sigmas:
            noisy_psd[(kind, s)] = bin_mean((u_img[res] + s * u_noise) ** 2, bins)
            snr[(kind, s)] = np.sqrt(image_psd[res] / noise_psd[kind]) / s
    return FrequencyStudy(freqs=bins.centers, sigmas=sigmas, factor=factor, block_size=block_size,
                          resolution=tuple(high.shape[-2:]), image_psd=image_psd, noise_psd=noise_psd,
                          noisy_psd=noisy_psd, snr=snr)
