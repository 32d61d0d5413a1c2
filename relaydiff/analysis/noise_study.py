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

Every curve is a mean over images, so :func:`frequency_study_stream` takes the images in
batches and keeps only per-coefficient sums between them: memory is bounded by one batch,
not by the number of images, and the curves are those of the whole batch (to round-off).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from relaydiff.ops import block_noise, mixed_noise
from relaydiff.ops._philox import STREAM_BLOCK, STREAM_WHITE, philox_normal
from relaydiff.ops._validate import check_seed
from relaydiff.ops.reference import _box_sum, compute_dtype
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


def _noise_at(kind: str, shape, block_size: int, seed, dtype, start: int) -> torch.Tensor:
    """White (``kind="white"``) or block noise ``shape = [B, C, H, W]``: images ``start ..
    start + B - 1`` of the field :func:`relaydiff.ops.mixed_noise` / :func:`relaydiff.ops.block_noise`
    draw for a larger batch. The element ``i`` of a field is the Philox normal ``i`` of its
    stream, so a slice of images is a counter range: the reference twins' noise from there."""
    b, c, h, w = shape
    if start == 0:
        like = torch.zeros(b, c, h, w, dtype=dtype)
        if kind == "white":
            return mixed_noise(like, alpha=0.0, block_size=1, seed=seed)
        return block_noise(like, block_size=block_size, seed=seed)
    if seed is None:
        raise ValueError("seed must be an integer when start > 0 (None would draw another field per slice)")
    seed, cd, per = check_seed(seed), compute_dtype(dtype), c * h * w
    stream = STREAM_WHITE if kind == "white" else STREAM_BLOCK
    out = torch.empty(b, c, h, w, dtype=dtype)
    for j in range(b):   # an image at a time: the generator's int64 scratch is several times its output
        g = philox_normal(per, seed, stream, dtype=cd, start=(start + j) * per).reshape(1, c, h, w)
        out[j] = (g if kind == "white" else _box_sum(g, block_size) / block_size)[0]
    return out


def make_noise(kind: str, shape, factor: int = 4, block_size: int = 4, seed: int = 0,
               dtype=torch.float64, start: int = 0) -> torch.Tensor:
    """Unit-variance noise ``[B, C, H, W]`` of ``kind`` (see :data:`NOISE_KINDS`).

    ``start``: the index of the first image, so that a batch can be made in slices:
    ``make_noise(kind, (b, C, H, W), start=k)`` is ``make_noise(kind, (N, C, H, W))[k:k + b]``
    (to round-off: slices after the first come from the reference generator; ``seed`` must
    then be an integer)."""
    b, c, h, w = shape
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative integer; got {start!r}")
    if kind == "white_low":
        if h % factor or w % factor:
            raise ValueError(f"H and W must be multiples of factor={factor}; got {h} x {w}")
        # the white field alone, drawn on the small grid
        low = _noise_at("white", (b, c, h // factor, w // factor), 1, seed, dtype, start)
        return nearest_upsample(low, factor)
    if kind in ("white", "block"):
        return _noise_at(kind, (b, c, h, w), block_size, seed, dtype, start)
    raise ValueError(f"kind must be one of {NOISE_KINDS}; got {kind!r}")


@dataclasses.dataclass
class FrequencyStudy:
    """Per-bin curves, all ``[num_bins]`` float64 arrays on the axis ``freqs``.

    ``image_psd[res]`` (res ``"high"``/``"low"``), ``noise_psd[kind]`` (unit sigma),
    ``noisy_psd[(kind, sigma)]`` (image + sigma * noise), ``snr[(kind, sigma)]``;
    ``num_images``: how many images they average."""
    freqs: np.ndarray
    sigmas: tuple[float, ...]
    factor: int
    block_size: int
    resolution: tuple[int, int]
    image_psd: dict[str, np.ndarray]
    noise_psd: dict[str, np.ndarray]
    noisy_psd: dict[tuple[str, float], np.ndarray]
    snr: dict[tuple[str, float], np.ndarray]
    num_images: int = 0

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


def _check_study_args(sigmas, factor: int) -> tuple[float, ...]:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer; got {factor!r}")
    sigmas = tuple(float(s) for s in sigmas)
    if not sigmas or any(not s > 0 for s in sigmas):
        raise ValueError(f"sigmas must be positive; got {sigmas}")
    return sigmas


def _check_images(images: torch.Tensor, factor: int, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a [B, C, H, W] tensor; got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name} must be [B, C, H, W]; got shape {tuple(images.shape)}")
    if images.shape[-2] % factor or images.shape[-1] % factor:
        raise ValueError(f"H and W must be multiples of factor={factor}; got {tuple(images.shape[-2:])}")


def frequency_study(images: torch.Tensor, sigmas=(0.1, 0.3, 1.0, 3.0), factor: int = 4, block_size: int = 4,
                    num_bins: int = 64, max_freq: float = MAX_FREQ, seed: int = 0) -> FrequencyStudy:
    """Run the study on ``images [B, C, H, W]`` in [-1, 1] (H, W multiples of ``factor``).
    Noise seeds: ``seed`` for every kind (the kinds use different Philox streams or shapes).
    Holds several float64 copies of the batch: for many images use :func:`frequency_study_stream`."""
    sigmas = _check_study_args(sigmas, factor)
    _check_images(images, factor)
    return frequency_study_stream([images], sigmas, factor, block_size, num_bins, max_freq, seed)


def frequency_study_stream(batches, sigmas=(0.1, 0.3, 1.0, 3.0), factor: int = 4, block_size: int = 4,
                           num_bins: int = 64, max_freq: float = MAX_FREQ, seed: int = 0) -> FrequencyStudy:
    """:func:`frequency_study` of the images of ``batches`` -- an iterable of ``[b, C, H, W]``
    tensors (one C, H, W) -- taken in order as one batch, consumed one batch at a time.

    Every PSD is a mean of ``U^2`` over images, channels and a bin's coefficients, so only
    per-coefficient sums ``[H, W]`` are kept between batches: peak memory is that of the
    largest batch (a few float64 copies of it), whatever the number of images. Image ``i``
    gets the noise it would get in the whole batch (:func:`make_noise` with ``start``), so the
    result equals ``frequency_study(torch.cat(list(batches)))`` to float64 round-off.
    ``seed`` must be an integer (``None`` draws one for the whole stream)."""
    sigmas = _check_study_args(sigmas, factor)
    seed = check_seed(seed)
    sums: dict = {}
    shape, n = None, 0
    for k, batch in enumerate(batches):
        _check_images(batch, factor, f"batch {k}")
        if shape is None:
            shape = tuple(batch.shape[1:])
        elif tuple(batch.shape[1:]) != shape:
            raise ValueError(f"batch {k} must be [b, {shape[0]}, {shape[1]}, {shape[2]}] like the first; "
                             f"got shape {tuple(batch.shape)}")
        b = batch.shape[0]
        if b:
            _accumulate(sums, batch.to(torch.float64), n, sigmas, factor, block_size, seed)
            n += b
    if n == 0:
        raise ValueError("no images given")
    bins = radial_bins(*shape[-2:], num_bins=num_bins, max_freq=max_freq)
    psd = {key: bin_mean(total / (n * shape[0]), bins) for key, total in sums.items()}
    image_psd = {res: psd[res] for res in ("high", "low")}
    noise_psd = {kind: psd[kind] for kind in NOISE_KINDS}
    noisy_psd = {(kind, s): psd[(kind, s)] for kind in NOISE_KINDS for s in sigmas}
    snr = {(kind, s): np.sqrt(image_psd["low" if kind == "white_low" else "high"] / noise_psd[kind]) / s
           for kind in NOISE_KINDS for s in sigmas}
    return FrequencyStudy(freqs=bins.centers, sigmas=sigmas, factor=factor, block_size=block_size,
                          resolution=shape[-2:], image_psd=image_psd, noise_psd=noise_psd,
                          noisy_psd=noisy_psd, snr=snr, num_images=n)


def _accumulate(sums: dict, high: torch.Tensor, start: int, sigmas, factor: int, block_size: int, seed: int):
    """Add the per-coefficient sums over images and channels ``[H, W]`` of one float64 batch
    (images ``start ..`` of the stream) to ``sums``: ``U^2`` of the images at both
    resolutions (keys ``"high"``, ``"low"``), of each unit noise (``kind``) and of each noisy
    image (``(kind, sigma)``)."""
    def add(key, sq):
        total = sq.sum((0, 1))
        sums[key] = total if key not in sums else sums[key] + total

    u_img = {"high": dct2(high), "low": dct2(low_resolution(high, factor))}
    for res, u in u_img.items():
        add(res, u ** 2)
    for kind in NOISE_KINDS:
        u_noise = dct2(make_noise(kind, high.shape, factor, block_size, seed, start=start))
        add(kind, u_noise ** 2)
        u = u_img["low" if kind == "white_low" else "high"]
        for s in sigmas:
            add((kind, s), torch.add(u, u_noise, alpha=s).square_())
