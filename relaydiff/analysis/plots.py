"""PNG figures and CSV tables of a :class:`~relaydiff.analysis.noise_study.FrequencyStudy`.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no global
backend state); every axis is log-log and labelled, every curve in a legend.
"""
from __future__ import annotations

import csv
import os

import numpy as np

from .noise_study import NOISE_KINDS, FrequencyStudy

FREQ_LABEL = "radial frequency (rad / pixel)"
_KIND_COLORS = {"white_low": "tab:blue", "white": "tab:orange", "block": "tab:green"}


def _figure(ncols: int, width: float = 5.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * ncols, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _loglog(ax, x, y, **kw):
    ok = np.isfinite(y) & (y > 0)
    ax.loglog(x[ok], y[ok], **kw)


def plot_noise_psd(study: FrequencyStudy, path: str) -> None:
    """PSD of the three unit-variance noises (paper Fig. 2(c), Fig. 8 dashed curves)."""
    fig, (ax,) = _figure(1, 6.0)
    for kind in NOISE_KINDS:
        _loglog(ax, study.freqs, study.noise_psd[kind], color=_KIND_COLORS[kind], label=study.label(kind))
    ax.axvline(np.pi / study.factor, color="grey", ls=":", label=f"Nyquist of {study.resolution[0] // study.factor} px")
    ax.set(xlabel=FREQ_LABEL, ylabel="power spectral density", title="PSD of unit-variance noise")
    ax.legend()
    fig.savefig(path, dpi=120)


def plot_psd(study: FrequencyStudy, path: str) -> None:
    """Paper Fig. 8: image PSD (black) and PSD of noisy images at rising sigma (dark to light red)."""
    fig, axes = _figure(3)
    reds = [(0.55 + 0.45 * i / max(1, len(study.sigmas) - 1), 0.6 * i / max(1, len(study.sigmas) - 1),
             0.6 * i / max(1, len(study.sigmas) - 1)) for i in range(len(study.sigmas))]
    for ax, kind in zip(axes, NOISE_KINDS):
        res = "low" if kind == "white_low" else "high"
        for s, color in zip(study.sigmas, reds):
            _loglog(ax, study.freqs, study.noisy_psd[(kind, s)], color=color, label=f"image + {s:g} x noise")
        _loglog(ax, study.freqs, study.image_psd[res], color="black", lw=2, label="image")
        _loglog(ax, study.freqs, study.noise_psd[kind], color="grey", ls="--", label="noise (sigma 1)")
        ax.set(xlabel=FREQ_LABEL, ylabel="power spectral density", title=study.label(kind))
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def plot_snr(study: FrequencyStudy, path: str) -> None:
    """Paper Fig. 2 (second row): SNR per frequency, one panel per sigma, one curve per noise."""
    fig, axes = _figure(len(study.sigmas), 4.2)
    for ax, s in zip(axes, study.sigmas):
        for kind in NOISE_KINDS:
            _loglog(ax, study.freqs, study.snr[(kind, s)], color=_KIND_COLORS[kind], label=study.label(kind))
        ax.axhline(1.0, color="grey", ls=":", lw=1)
        ax.set(xlabel=FREQ_LABEL, ylabel="SNR (RMS image / RMS noise amplitude)", title=f"sigma = {s:g}")
        ax.legend(fontsize="x-small")
    fig.savefig(path, dpi=120)


def plot_spectra(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str, *, reference: str | None = None,
                 band: tuple[float, float] | None = (0.5 * np.pi, np.pi), title: str = "radial power spectrum") -> None:
    """Radial PSDs of image sets, one curve per name (``name -> (frequencies, psd)``, e.g.
    :func:`~relaydiff.analysis.radial_psd`); ``reference`` (e.g. the ground truth) drawn black
    and thick; ``band`` shaded (the range :func:`~relaydiff.analysis.high_frequency_error`
    scores)."""
    fig, (ax,) = _figure(1, 6.0)
    if band is not None:
        ax.axvspan(*band, color="0.92", label="scored band")
    for name, (f, p) in curves.items():
        ref = name == reference
        _loglog(ax, f, p, label=name, color="black" if ref else None, lw=2.2 if ref else 1.3)
    ax.set(xlabel=FREQ_LABEL, ylabel="power spectral density", title=title)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def write_csv(study: FrequencyStudy, psd_path: str, snr_path: str) -> None:
    """``psd.csv``: series, sigma, bin, frequency, psd (series: image_high, image_low,
    noise_<kind>, noisy_<kind>); ``snr.csv``: kind, sigma, bin, frequency, snr."""
    with open(psd_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["series", "sigma", "bin", "frequency", "psd"])
        rows = [(f"image_{res}", "", v) for res, v in study.image_psd.items()]
        rows += [(f"noise_{k}", 1.0, v) for k, v in study.noise_psd.items()]
        rows += [(f"noisy_{k}", s, v) for (k, s), v in study.noisy_psd.items()]
        for name, sigma, values in rows:
            for i, (fr, v) in enumerate(zip(study.freqs, values)):
                w.writerow([name, sigma, i, f"{fr:.6g}", f"{v:.6g}"])
    with open(snr_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "sigma", "bin", "frequency", "snr"])
        for (k, s), values in study.snr.items():
            for i, (fr, v) in enumerate(zip(study.freqs, values)):
                w.writerow([k, s, i, f"{fr:.6g}", f"{v:.6g}"])


def write_report(study: FrequencyStudy, out_dir: str) -> list[str]:
    """All figures and tables into ``out_dir`` (which must exist); returns the paths written."""
    paths = {name: os.path.join(out_dir, name) for name in
             ("noise_psd.png", "psd.png", "snr.png", "psd.csv", "snr.csv")}
    plot_noise_psd(study, paths["noise_psd.png"])
    plot_psd(study, paths["psd.png"])
    plot_snr(study, paths["snr.png"])
    write_csv(study, paths["psd.csv"], paths["snr.csv"])
    return list(paths.values())
