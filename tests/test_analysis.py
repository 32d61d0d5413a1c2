"""relaydiff.analysis and ``relaydiff analyze``: whole-image DCT spectra, radial PSD and SNR,
and the paper's frequency claims (SPEC 10) held as numbers.

Oracles: scipy's DCT, Parseval, and the exact expected DCT spectrum of each noise,
``E[U_ky,kx^2] = (C S C^T)[ky, ky] * (C S C^T)[kx, kx]`` for a separable covariance ``S x S``
(identity for white noise, the circular tent ``max(0, s - d) / s`` for block noise, the
``f x f`` block-diagonal of ones for nearest-upsampled white noise).
"""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from relaydiff.analysis import (NOISE_KINDS, bin_mean, dct2, frequency_study, low_resolution, make_noise,
                                nearest_upsample, photo_batch, radial_bins, radial_psd, snr_curve)
from relaydiff.cli import main
from relaydiff.ops.reference import dct_matrix


def _expected_noise_psd(kind: str, n: int, factor: int, block_size: int, num_bins: int) -> np.ndarray:
    i = torch.arange(n)
    if kind == "white":
        cov = torch.eye(n, dtype=torch.float64)
    elif kind == "block":
        d = (i[:, None] - i[None, :]).abs()
        d = torch.minimum(d, n - d)                              # wrap-around distance (SPEC 3)
        cov = (block_size - d).clamp_min(0).double() / block_size
    else:
        cov = (i[:, None] // factor == i[None, :] // factor).double()
    c = dct_matrix(n)
    var = torch.diagonal(c @ cov @ c.T)
    return bin_mean(torch.outer(var, var), radial_bins(n, n, num_bins))


@pytest.fixture(scope="module")
def photos():
    bundled = pytest.importorskip("relaydiff.data.bundled")
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    return photo_batch(bundled.load_bundled_photos().values(), 256)


def test_dct2_matches_scipy_and_keeps_energy():
    fft = pytest.importorskip("scipy.fft")
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    u = dct2(x)
    np.testing.assert_allclose(u.numpy(), fft.dctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1)), atol=1e-12)
    torch.testing.assert_close((u ** 2).sum(), (x ** 2).sum())          # Parseval


def test_radial_bins_cover_every_coefficient_once():
    bins = radial_bins(12, 20, num_bins=9)
    assert bins.index.shape == (12, 20) and bins.index.min() >= 0 and bins.index.max() == 8
    assert bins.index[0, 0] == 0 and bins.index[-1, -1] == 8
    np.testing.assert_allclose(np.diff(bins.edges), math.pi * math.sqrt(2) / 9)
    np.testing.assert_allclose(bin_mean(torch.full((2, 12, 20), 3.0), bins), 3.0)
    # a smaller max_freq drops the corners instead of folding them into the last bin
    cut = radial_bins(12, 20, num_bins=9, max_freq=math.pi)
    assert (cut.index == -1).any() and cut.index.max() == 8


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_noise_psd_matches_its_exact_expectation(kind):
    n, f, s, nb = 64, 4, 4, 16
    noise = make_noise(kind, (8, 3, n, n), factor=f, block_size=s, seed=11)
    assert noise.std().item() == pytest.approx(1.0, abs=0.02)
    freqs, psd = radial_psd(noise, num_bins=nb)
    expected = _expected_noise_psd(kind, n, f, s, nb)
    ok = expected > 1e-3                          # the block/upsampled spectra have near-zero notches
    # each bin averages >= 24 fields x (tens of coefficients): relative error well under 15%
    np.testing.assert_allclose(psd[ok], expected[ok], rtol=0.15)
    assert len(freqs) == nb


def test_paper_claim_block_noise_matches_upsampled_white_noise_at_low_frequencies():
    """SPEC 10 / Fig. 2(c): block noise (s=4) at 256 px has nearly the low-frequency spectrum of
    white noise at 64 px nearest-upsampled to 256 px; white noise at 256 px does not."""
    g = torch.Generator().manual_seed(0)
    smooth = torch.randn(2, 3, 256, 256, generator=g, dtype=torch.float64).cumsum(-1).cumsum(-2) / 256
    study = frequency_study(smooth, sigmas=(1.0,), factor=4, block_size=4, seed=3)
    claims = study.claims()
    lo = study.low_band()
    exact = {k: _expected_noise_psd(k, 256, 4, 4, 64)[lo] for k in NOISE_KINDS}
    exact_block = np.mean(np.abs(np.log(exact["block"] / exact["white_low"])))
    exact_white = np.mean(np.abs(np.log(exact["white"] / exact["white_low"])))
    assert exact_block < 0.03 and exact_white > 2.4          # the claim holds for the expectations ...
    assert claims["block_vs_white_low"] < 0.1                # ... and for one draw of the library's noise
    assert claims["white_vs_white_low"] > 2.0
    assert claims["block_vs_white_low"] < claims["white_vs_white_low"] / 20


def test_paper_claim_snr_shifts_up_with_resolution(photos):
    """SPEC 10 / Fig. 2(a)(b): at a fixed sigma the SNR of the low bands is higher at higher
    resolution -- about x2 per doubling, since upsampled white noise puts f^2 times the power there."""
    sigma = 0.5
    study = frequency_study(photos, sigmas=(sigma,), factor=4, block_size=4, seed=5)
    lo = study.low_band()                                    # below the 64 px Nyquist frequency
    noise_128 = make_noise("white_low", photos.shape, factor=2, seed=5)
    _, snr_128 = snr_curve(low_resolution(photos, 2), sigma * noise_128)
    curves = [study.snr[("white_low", sigma)], snr_128, study.snr[("white", sigma)]]   # 64, 128, 256 px
    for coarse, fine in zip(curves, curves[1:]):
        ratio = fine[lo] / coarse[lo]
        assert np.all(ratio > 1.0), ratio
        assert 1.5 < np.median(ratio) < 2.6, ratio
    claims = study.claims()
    assert claims["snr_gain_resolution"] > 3.0
    # block noise at 256 px corrupts the low bands like white noise at 64 px (Fig. 2(c))
    assert 0.8 < claims["snr_block_vs_white_low"] < 1.3


def test_snr_curve_is_the_rms_amplitude_ratio():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64).cumsum(-1)
    noise = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    f, snr = snr_curve(img, 0.3 * noise, num_bins=8)
    _, p_img = radial_psd(img, 8)
    _, p_noise = radial_psd(noise, 8)
    np.testing.assert_allclose(snr, np.sqrt(p_img / p_noise) / 0.3, rtol=1e-12)
    with pytest.raises(ValueError, match="share H, W"):
        snr_curve(img, noise[..., :16])


def test_make_noise_and_study_validate_arguments():
    up = make_noise("white_low", (1, 1, 8, 8), factor=4, seed=0)
    assert torch.equal(up, nearest_upsample(up[..., ::4, ::4], 4))       # constant on 4 x 4 cells
    with pytest.raises(ValueError, match="kind must be one of"):
        make_noise("pink", (1, 1, 8, 8))
    with pytest.raises(ValueError, match="multiples of factor=3"):
        frequency_study(torch.zeros(1, 3, 16, 16), factor=3)
    with pytest.raises(ValueError, match="sigmas must be positive"):
        frequency_study(torch.zeros(1, 3, 16, 16), sigmas=(0.0,))


def _write_photos(folder, n=2, size=(70, 90)):
    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(n):
        smooth = np.cumsum(np.cumsum(g.standard_normal((*size, 3)), 0), 1)
        img = (255 * (smooth - smooth.min()) / np.ptp(smooth)).astype(np.uint8)
        Image.fromarray(img).save(folder / f"p{i}.png")


def test_cli_analyze_writes_plots_and_tables(tmp_path, capsys):
    _write_photos(tmp_path / "photos")
    out = tmp_path / "out"
    assert main(["analyze", "--images", str(tmp_path / "photos"), "--out", str(out), "--resolution", "64",
                 "--sigmas", "0.2,1", "--bins", "16", "--quiet"]) == 0
    for name in ("noise_psd.png", "psd.png", "snr.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 400
    with open(out / "snr.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 16 and {r["kind"] for r in rows} == set(NOISE_KINDS)
    with open(out / "psd.csv") as f:
        series = {r["series"] for r in csv.DictReader(f)}
    assert {"image_high", "image_low", "noise_block", "noisy_white"} <= series
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 2 and summary["block_vs_white_low"] < summary["white_vs_white_low"]
    assert "block noise" in capsys.readouterr().out


def test_cli_analyze_bundled_photos(tmp_path):
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    out = tmp_path / "out"
    assert main(["analyze", "--out", str(out), "--resolution", "64", "--max-images", "3", "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["images"] == "bundled"


def test_cli_analyze_errors_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    for argv, needle in ((["--images", str(tmp_path / "missing")], "--images"),
                         (["--sigmas", "0.1,x"], "--sigmas"),
                         (["--sigmas", "-1"], "--sigmas"),
                         (["--resolution", "100", "--factor", "8"], "--resolution"),
                         (["--block-size", "17"], "--block-size")):
        assert main(["analyze", "--out", str(out), "--quiet"] + argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("relaydiff analyze: error:") and needle in err and "\n" not in err, err
        assert not out.exists()
