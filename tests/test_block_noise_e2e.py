"""Block noise in end-to-end (stage-1) EDM models (paper App. C.2, Fig. 6): ``NoiseConfig``,
``EDMLoss(noise=...)``, ``sample_edm(noise=...)``, the pipeline's stage-1 latent, the trainer's
``block_noise`` option and its round trip through checkpoint metadata and the CLI.

Oracles: the closed-form covariance of SPEC 3, and for the sampler its Fourier dual. Mixed
block noise is circular and stationary, so the DFT diagonalises it: its power spectrum
``lambda_k`` is the DFT of that covariance. For per-pixel Gaussian data the exact denoiser
under such noise is diagonal in the DFT too, and at each frequency the sampler is the
scalar EDM sampler with noise variance ``lambda_k``, i.e. ``sqrt(lambda_k)`` times the white
sampler on data variance ``v / lambda_k`` (``test_sampling._edm_oracle``).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from relaydiff import NoiseConfig, RelayConfig
from relaydiff.cli import main as cli_main
from relaydiff.diffusion import EDMLoss
from relaydiff.models import build_model, load_model, network_kwargs, save_weights
from relaydiff.ops import mixed_noise
from relaydiff.pipeline import _LATENT, PipelineError, RelayPipeline
from relaydiff.sampling import derive_seed, karras_sigmas, sample_edm
from relaydiff.training import ConfigError
from test_pipeline import FAST, GaussianDenoiser, checkpoints  # noqa: F401  (checkpoints: the fixture)
from test_sampling import _edm_oracle, _z
from test_training import images, tiny_cfg  # noqa: F401  (images: the fixture)

PAPER = NoiseConfig(alpha=0.15, block_size=4)


def _covariance(alpha: float, s: int, dy: int, dx: int, normalize: bool = True) -> float:
    """SPEC 3: covariance of mixed noise at offset ``(dy, dx)`` (no wrap-around)."""
    block = max(0, s - abs(dy)) * max(0, s - abs(dx)) / s ** 2
    c = float(dy == 0 and dx == 0) + alpha ** 2 * block
    return c / (1 + alpha ** 2) if normalize else c


def _spectrum(alpha: float, s: int, h: int, w: int, normalize: bool = True) -> torch.Tensor:
    """``[h, w]`` power spectrum of mixed noise: the DFT of its circular covariance
    (wrap-around distances; exact for ``s <= h/2, w/2``)."""
    cov = torch.tensor([[_covariance(alpha, s, min(y, h - y), min(x, w - x), normalize) for x in range(w)]
                        for y in range(h)], dtype=torch.float64)
    return torch.fft.fft2(cov).real


def _lag_products(n: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``n[y, x] * n[y + dy, x + dx]`` (circular) for every pixel."""
    return n * torch.roll(n, shifts=(-dy, -dx), dims=(-2, -1))


# ---------------------------------------------------------------- NoiseConfig

def test_noise_config_validation_and_round_trip():
    assert NoiseConfig().white and not PAPER.white
    assert NoiseConfig.from_dict(PAPER.to_dict()) == PAPER
    assert NoiseConfig.of(None) == NoiseConfig() and NoiseConfig.of(PAPER) is PAPER
    for bad in (dict(alpha=-0.1), dict(alpha=math.inf), dict(alpha=math.nan), dict(alpha=True),
                dict(block_size=0), dict(block_size=17), dict(block_size=2.0), dict(normalize_noise=1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            NoiseConfig(**bad)
    with pytest.raises(ValueError, match="unknown NoiseConfig fields"):
        NoiseConfig.from_dict({"alpha": 0.1, "sigma": 1.0})
    with pytest.raises(TypeError, match="noise must be a NoiseConfig"):
        NoiseConfig.of(0.15)


def test_noise_config_draw_is_the_mixed_noise_op():
    like = torch.empty(2, 3, 8, 8)
    torch.testing.assert_close(PAPER.draw(like, 5), mixed_noise(like, 0.15, 4, True, 5), rtol=0, atol=0)
    # white noise is the white field of the seed whatever the block size (it may exceed the image)
    white = mixed_noise(like, alpha=0.0, block_size=1, seed=5)
    assert torch.equal(NoiseConfig(block_size=16).draw(like, 5), white)
    assert torch.equal(NoiseConfig().draw(torch.empty(1, 1, 2, 2), 1), mixed_noise(torch.empty(1, 1, 2, 2), 0.0, 1,
                                                                                 seed=1))


# ---------------------------------------------------------------- EDMLoss

class _Recorder(torch.nn.Module):
    """A 'denoiser' that keeps what the loss feeds it and returns it unchanged."""

    def forward(self, x, sigma, class_labels=None):
        self.x, self.sigma = x, sigma
        return x


@pytest.mark.parametrize("noise", [PAPER, NoiseConfig()], ids=["alpha0.15", "white"])
def test_edm_loss_feeds_the_network_mixed_noise(noise):
    """``(x_t - x0) / sigma`` has unit variance per pixel and SPEC 3's neighbour covariance
    (closed form) at offsets (0,1), (1,1), (0,3) and none from (0,4) on; white noise has none."""
    torch.manual_seed(0)
    x0 = torch.rand(64, 3, 128, 128) * 2 - 1
    rec = _Recorder()
    EDMLoss(noise=noise)(rec, x0)
    n = ((rec.x.double() - x0.double()) / rec.sigma.double().reshape(-1, 1, 1, 1))
    offsets = [(0, 0), (0, 1), (1, 1), (0, 3), (0, 4)]
    a, s = noise.alpha, noise.block_size
    z = _z(len(offsets))
    lags = [(y, x) for y in range(-3 * s, 3 * s + 1) for x in range(-3 * s, 3 * s + 1)]
    for dy, dx in offsets:
        est = float(_lag_products(n, dy, dx).mean())
        want = _covariance(a, s, dy, dx)
        # Bartlett: the mean of N lag products of a Gaussian field has variance
        # sum_k [c(k)^2 + c(k + h) c(k - h)] / N (c: SPEC 3's covariance, zero beyond s)
        var = sum(_covariance(a, s, y, x) ** 2 + _covariance(a, s, y + dy, x + dx) * _covariance(a, s, y - dy, x - dx)
                  for y, x in lags) / n.numel()
        assert abs(est - want) <= z * math.sqrt(var), ((dy, dx), est, want, z * math.sqrt(var))
        if not noise.white and want:
            # the tolerance is far tighter than the covariance: white noise would fail here
            assert want > 2 * z * math.sqrt(var)


def test_edm_loss_white_path_is_torch_randn():
    """Runs without block noise draw exactly what they always drew: sigma then randn_like."""
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    torch.manual_seed(7)
    rec = _Recorder()
    EDMLoss()(rec, x0)
    torch.manual_seed(7)
    sigma = (torch.randn(4) * 1.2 - 1.2).exp()
    assert torch.equal(rec.sigma, sigma)
    assert torch.equal(rec.x, x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(x0))
    # block noise draws its seed from the same global generator: repeatable under manual_seed
    torch.manual_seed(7)
    EDMLoss(noise=PAPER)(rec, x0)
    first = rec.x
    torch.manual_seed(7)
    EDMLoss(noise=PAPER)(rec, x0)
    assert torch.equal(first, rec.x)
    with pytest.raises(TypeError, match="noise must be a NoiseConfig"):
        EDMLoss(noise=0.15)


# ---------------------------------------------------------------- sample_edm

def _fourier_gaussian_run(noise: NoiseConfig, churn_noise: NoiseConfig | None, b=128, h=16, w=16):
    """``sample_edm`` on per-pixel Gaussian data with the exact denoiser under ``noise``
    (diagonal in the DFT), started from the exact marginal at sigma 80; its churn drawn by
    ``churn_noise``. Returns ``(samples, mu, v, oracle spectrum [C, h, w], lambda)``."""
    mu = torch.tensor([0.4, -0.2, 0.0], dtype=torch.float64)
    v = torch.tensor([0.05, 0.2, 0.01], dtype=torch.float64)
    mu_, v_ = mu[:, None, None], v[:, None, None]
    lam = _spectrum(noise.alpha, noise.block_size, h, w, noise.normalize_noise)

    def denoiser(x, sigma, class_labels=None):
        s2 = sigma.to(x.dtype)[:, None, None, None] ** 2
        return mu_ + torch.fft.ifft2(v_ / (v_ + s2 * lam) * torch.fft.fft2(x - mu_)).real

    sigmas = karras_sigmas(32, 0.002, 80.0)
    kw = dict(s_churn=30.0, s_min=0.05, s_max=50.0, s_noise=1.003)
    shape = (b, 3, h, w)
    g = torch.Generator().manual_seed(4)
    x = mu_ + v_.sqrt() * torch.randn(shape, generator=g, dtype=torch.float64) \
        + 80.0 * noise.draw(torch.empty(shape, dtype=torch.float64), 5)
    out = sample_edm(denoiser, x, sigmas, noise=churn_noise, seed=9, disable=True, **kw)
    _, var = _edm_oracle(torch.zeros_like(mu_), v_ / lam, sigmas.tolist(), **kw)
    return out, mu, v, lam * var, lam


def _moment_checks(out, mu, v, spectrum, lam):
    """``(estimate, oracle, data, tolerance)`` per channel of: the mean, the variance per pixel,
    and the mean power spectrum over the frequencies where the noise is strongly correlated
    (``lambda`` above its mid-range) and over the rest."""
    b, c, h, w = out.shape
    n = b * h * w
    y = out - out.mean(dim=(0, 2, 3), keepdim=True)
    power = (torch.fft.fft2(y).abs() ** 2 / (h * w)).mean(0)    # periodogram, mean over images
    hi = lam > 0.5 * (lam.min() + lam.max())
    checks = [(out.mean(dim=(0, 2, 3)), mu, mu, (spectrum[:, 0, 0] / n).sqrt()),
              (y.square().mean(dim=(0, 2, 3)), spectrum.mean(dim=(1, 2)), v,
               (2 * spectrum.square().mean(dim=(1, 2)) / n).sqrt())]
    for band in (hi, ~hi):
        k = int(band.sum())
        # a periodogram value has sd = its mean; +k and -k are equal, so k values hold k/2 draws
        checks.append((power[:, band].mean(1), spectrum[:, band].mean(1), v,
                       (2 * spectrum[:, band].square().mean(1) / (b * k)).sqrt()))
    return checks


@pytest.mark.parametrize("noise", [PAPER, NoiseConfig(alpha=1.0, block_size=4, normalize_noise=False)],
                         ids=["paper", "alpha1-unnormalized"])
def test_edm_gaussian_moments_with_block_noise(noise):
    """Like ``test_sampling.test_edm_gaussian_moments`` with churn and mixed noise: the
    samples' mean, variance and power spectrum (correlated and other frequencies) match the
    exact output of EDM's Algorithm 2 under this noise and, within its exact discretisation
    error (11-18% of the variance with churn 30 on 32 levels), the data's (a flat spectrum v)."""
    checks = _moment_checks(*_fourier_gaussian_run(noise, noise))
    z = _z(2 * len(checks) * 3)
    for est, oracle, data, sd in checks:
        assert bool(((est - oracle).abs() <= z * sd).all()), (est, oracle, z * sd)
        assert bool(((est - data).abs() <= z * sd + (oracle - data).abs()).all()), (est, data)


def test_edm_white_churn_under_block_noise_is_detected():
    """The check above can fail: churn drawn white for a block-noise model adds too little
    noise where the block noise is strong (and too much elsewhere), off the oracle's spectrum."""
    noise = NoiseConfig(alpha=1.0, block_size=4, normalize_noise=False)
    checks = _moment_checks(*_fourier_gaussian_run(noise, None))
    z = _z(2 * len(checks) * 3)
    est, oracle, _, sd = checks[2]
    assert bool(((est - oracle).abs() > z * sd).all()), (est, oracle, z * sd)


def test_edm_churn_noise_comes_from_noise_config():
    x = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    sigmas = torch.tensor([1.0, 0.0], dtype=torch.float64)
    seen = []

    def den(xx, sigma, class_labels=None):
        seen.append(xx.clone())
        return torch.zeros_like(xx)

    sample_edm(den, x, sigmas, s_churn=10.0, noise=PAPER, seed=3, disable=True)
    gamma = math.sqrt(2) - 1
    want = math.sqrt((1 + gamma) ** 2 - 1) * PAPER.draw(x, derive_seed(3, 0))
    torch.testing.assert_close(seen[0], want)
    with pytest.raises(TypeError, match="noise must be a NoiseConfig"):
        sample_edm(den, x, sigmas, noise={"alpha": 0.15}, disable=True)


# ---------------------------------------------------------------- pipeline

def _recording_pipeline(base_noise):
    base = GaussianDenoiser(8)
    first = []
    forward = base.forward

    def record(x, sigma, class_labels=None):
        if not first:
            first.append((x.clone(), float(sigma[0])))
        return forward(x, sigma, class_labels)

    base.forward = record
    pipe = RelayPipeline(base, GaussianDenoiser(32), RelayConfig(), sampler=FAST, base_noise=base_noise)
    return pipe, first


def test_pipeline_stage1_latent_uses_base_noise():
    pipe, first = _recording_pipeline(PAPER)
    pipe.sample(2, seed=11, batch_size=2, disable=True)
    x, sigma0 = first[0]
    latent = PAPER.draw(torch.empty(2, 3, 8, 8), derive_seed(derive_seed(11, 0), _LATENT)) * sigma0
    torch.testing.assert_close(x, latent)
    # white noise (the default) is what pipelines always drew
    white, _ = _recording_pipeline(NoiseConfig())
    default, _ = _recording_pipeline(None)
    assert torch.equal(white.sample(2, seed=11, disable=True), default.sample(2, seed=11, disable=True))
    assert not torch.equal(pipe.sample(2, seed=11, disable=True), default.sample(2, seed=11, disable=True))


def test_pipeline_base_noise_rules():
    inner = RelayPipeline(GaussianDenoiser(8), GaussianDenoiser(32), RelayConfig(), base_noise=PAPER)
    with pytest.raises(PipelineError, match="innermost"):
        RelayPipeline(inner, GaussianDenoiser(128), RelayConfig(), base_noise=PAPER)
    with pytest.raises(PipelineError, match="innermost"):
        RelayPipeline(None, GaussianDenoiser(32), RelayConfig(), low_shape=(3, 8, 8), base_noise=PAPER)
    with pytest.raises(TypeError, match="base_noise must be a NoiseConfig"):
        RelayPipeline(GaussianDenoiser(8), GaussianDenoiser(32), RelayConfig(), base_noise=0.15)


def test_old_base_checkpoints_sample_with_white_noise(checkpoints, tmp_path):  # noqa: F811
    net = network_kwargs("tiny", 8, label_dim=0)
    model = build_model(net)
    tensors = {f"ema.{k}": v.clone() for k, v in model.state_dict().items()}
    old = save_weights(tmp_path / "old-base.safetensors", tensors, {
        "stage": "base", "network": net, "precond": model.config(), "relay": None,
        "step": 0, "kimg": 0.0, "resolution": 8, "label_dim": 0})
    assert "block_noise" not in load_model(old)[1]
    assert RelayPipeline.from_checkpoints(old, checkpoints["relay"], sampler=FAST).base_noise == NoiseConfig()


# ---------------------------------------------------------------- training config

def test_train_config_block_noise(images):  # noqa: F811
    cfg = tiny_cfg(images, "out", block_noise=0.15).resolved()
    assert cfg.base_noise() == PAPER and cfg.to_dict()["block_noise"] == 0.15
    assert tiny_cfg(images, "out").resolved().base_noise() == NoiseConfig()
    assert tiny_cfg(images, "out", stage="relay").resolved().base_noise() is None
    for kw, msg in [(dict(block_noise=-0.1), "block_noise must be"), (dict(block_noise=math.nan), "block_noise must"),
                    (dict(block_noise=0.15, block_noise_size=0), "block_noise_size must"),
                    (dict(block_noise=0.15, block_noise_size=17), "block_noise_size must"),
                    (dict(block_noise=0.15, resolution=8, block_noise_size=16), "exceeds the training image size"),
                    (dict(stage="relay", block_noise=0.15), "base stage only")]:
        with pytest.raises(ConfigError, match=msg):
            tiny_cfg(images, "out", **kw).resolved()


# ---------------------------------------------------------------- CLI end to end

def _cli(capsys, *argv):
    rc = cli_main(list(argv))
    return rc, capsys.readouterr()


def test_cli_train_block_noise_then_sample(checkpoints, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "photos"
    data.mkdir()
    yy, xx = np.mgrid[0:8, 0:8] / 8
    for i in range(4):
        img = np.stack([np.sin(3 * xx + i), np.cos(2 * yy - i), xx * yy], -1) * 0.45 + 0.5
        Image.fromarray((img * 255).astype(np.uint8)).save(data / f"{i}.png")
    run = tmp_path / "base"
    rc, cap = _cli(capsys, "train", "--stage", "base", "--block-noise", "0.15", "--steps", "2", "--data", str(data),
                   "--out", str(run), "--resolution", "8", "--batch", "2", "--workers", "0", "--sample-every", "0",
                   "--sample-count", "2", "--quiet")
    assert rc == 0, cap.err
    config = json.loads((run / "config.json").read_text())
    assert (config["block_noise"], config["block_noise_size"]) == (0.15, 4)
    meta = load_model(run)[1]
    assert NoiseConfig.from_dict(meta["block_noise"]) == PAPER
    assert (run / "samples" / "step-0000002.png").is_file()   # the preview grid under block noise

    out = tmp_path / "samples"
    rc, cap = _cli(capsys, "sample", "--stage1", str(run), "--stage2", checkpoints["relay"], "--out", str(out),
                   "--n", "2", "--steps", "4,12", "--seed", "3", "--quiet")
    assert rc == 0, cap.err
    assert sorted(os.listdir(out)) == ["000003.png", "000004.png", "relaydiff-sample.json"]
    pipe = RelayPipeline.from_checkpoints(str(run), checkpoints["relay"], sampler="default")
    assert pipe.base_noise == PAPER
    want = pipe.sample(2, seed=3, steps=(4, 12), batch_size=16, disable=True)
    got = torch.from_numpy(np.array(Image.open(out / "000004.png"))).permute(2, 0, 1).float() / 127.5 - 1
    assert (got - want[1]).abs().max() <= 1 / 127.5 + 1e-6


@pytest.mark.parametrize("argv, needle", [
    (["--stage", "relay", "--block-noise", "0.15"], "base stage only"),
    (["--stage", "relay", "--block-noise-size", "2"], "--block-noise-size applies only to --stage base"),
    (["--stage", "base", "--block-noise", "-1"], "block_noise must be"),
    (["--stage", "base", "--block-noise", "0.15", "--block-noise-size", "32"], "block_noise_size must"),
])
def test_cli_train_block_noise_errors(argv, needle, images, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    rc, cap = _cli(capsys, "train", *argv, "--data", str(images), "--out", str(out), "--steps", "1", "--quiet")
    assert rc == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], cap.err
    assert not out.exists()
