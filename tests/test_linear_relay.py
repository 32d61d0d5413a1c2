"""CogView3's linear relay blur (SPEC 2b): the ops, the config option, the relay loss, the
relay sampler and the CLI with ``blur="linear"``.

The ops are judged against float64 oracles written from SPEC 2b in the patch-DCT basis
(scipy's DCT, ``conftest.dct_oracle``) and in pixels (``avg_pool2d`` + nearest
``interpolate``); the sampler with the exact-Gaussian oracle of tests/test_sampling.py, whose
helpers take the blur's factors from the config.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import dct_oracle
from PIL import Image
from test_sampling import _gaussian_relay_setup, _per_coef, _relay_oracle, _start_state, _z
from test_training import make_images

from relaydiff import RelayConfig
from relaydiff.cli import main
from relaydiff.diffusion import RelayLoss
from relaydiff.models import load_model
from relaydiff.ops import (linear_blur, linear_relay_corrupt, linear_relay_step, patch_dct, relay_corrupt,
                           relay_step)
from relaydiff.ops import reference as R
from relaydiff.pipeline import RelayPipeline
from relaydiff.sampling import karras_sigmas, relay_init, sample_relay, truncate_sigmas

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=2e-6)}


def _factors(w: torch.Tensor, p: int, m: float) -> torch.Tensor:
    """SPEC 2b per sample: ``[B, p, p]``, 1 on DC, ``(1 - m)(1 - w) + m`` elsewhere."""
    a = ((1 - m) * (1 - w.double()) + m)[:, None, None].repeat(1, p, p)
    a[:, 0, 0] = 1.0
    return a


def _scale(u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Coefficient (k, l) of every patch of sample b times ``a[b, k, l]`` (in-place DCT layout)."""
    b, c, h, w = u.shape
    p = a.shape[-1]
    return (u.reshape(b, c, h // p, p, w // p, p) * a[:, None, None, :, None, :]).reshape(u.shape)


def _blur_oracle(x: torch.Tensor, w: torch.Tensor, p: int, m: float) -> torch.Tensor:
    return dct_oracle(_scale(dct_oracle(x, p), _factors(w, p, m)), p, inverse=True)


def _box_then_nearest(x: torch.Tensor, p: int) -> torch.Tensor:
    return F.interpolate(F.avg_pool2d(x, p), scale_factor=p, mode="nearest")


# ---------------------------------------------------------------- ops

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p, m", [(2, 0.0), (4, 1e-3), (8, 0.1)])
def test_linear_corrupt_matches_dct_oracle(dtype, p, m):
    g = torch.Generator().manual_seed(p)
    x = (torch.rand(3, 2, 2 * p, 3 * p, generator=g, dtype=torch.float64) * 2 - 1)
    w = torch.tensor([0.0, 0.37, 1.0], dtype=torch.float64)
    sigma = torch.tensor([0.5, 0.02, 0.8], dtype=torch.float64)
    want_blur = _blur_oracle(x, w, p, m)
    torch.testing.assert_close(linear_blur(x.to(dtype), w, p, m).double(), want_blur, **TOL[dtype])
    # the noise: mixed noise of the seed (the reference twin's, in float64)
    noise = R.mixed_noise(x, alpha=0.3, block_size=2, seed=11)
    got = linear_relay_corrupt(x.to(dtype), sigma, w, p, 0.3, 2, m, True, seed=11)
    assert got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got.double(), want_blur + sigma[:, None, None, None] * noise, **TOL[dtype])


def test_linear_blur_keeps_patch_means_and_full_blur_is_nearest_of_box():
    x = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    for w in (0.0, 0.25, 0.9, 1.0):
        torch.testing.assert_close(F.avg_pool2d(linear_blur(x, w, 4, 0.01), 4), F.avg_pool2d(x, 4),
                                   rtol=0, atol=1e-14)
    torch.testing.assert_close(linear_blur(x, 1.0, 4, 0.0), _box_then_nearest(x, 4), rtol=0, atol=1e-14)
    torch.testing.assert_close(linear_blur(x, 0.0, 4, 0.0), x, rtol=0, atol=0)
    # pixel-space form of SPEC 2b
    torch.testing.assert_close(linear_blur(x, 0.6, 4, 0.01), x + 0.99 * 0.6 * (_box_then_nearest(x, 4) - x),
                               rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("s_noise, heun", [(0.0, False), (0.3, False), (0.3, True)])
def test_linear_step_matches_spec6_oracle(dtype, s_noise, heun):
    """SPEC 6 in the DCT basis with SPEC 2b's factors, per-sample levels."""
    p, m = 4, 1e-3
    g = torch.Generator().manual_seed(1)
    x, den, xp, dp = (torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(4))
    sig, sig_n = torch.tensor([0.8, 0.3], dtype=torch.float64), torch.tensor([0.5, 0.1], dtype=torch.float64)
    w, w_n = torch.tensor([0.9, 0.6], dtype=torch.float64), torch.tensor([0.7, 0.2], dtype=torch.float64)
    a_c, a_n = _factors(w, p, m), _factors(w_n, p, m)
    gamma = (math.sqrt(1 - s_noise ** 2) * sig_n / sig)[:, None, None]
    A, B = a_n + gamma * (1 - a_c), gamma * a_c - a_n
    d = (x - den) / sig[:, None, None, None]
    if heun:
        d = 0.5 * (d + (xp - dp) / sig_n[:, None, None, None])
    want = dct_oracle(_scale(dct_oracle(x, p), A) + _scale(dct_oracle(sig[:, None, None, None] * d, p), B),
                      p, inverse=True)
    want = want + (s_noise * sig_n)[:, None, None, None] * R.mixed_noise(x, 0.15, 4, True, seed=5)
    kw = dict(x_prop=xp.to(dtype), denoised_prop=dp.to(dtype)) if heun else {}
    got = linear_relay_step(x.to(dtype), den.to(dtype), sig, sig_n, w, w_n, s_noise=s_noise, patch_size=p,
                            min_scale=m, seed=5, **kw)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_ops_draw_the_dct_paths_noise(dtype):
    """At zero blur both blurs are the identity, so with one seed the linear and the fused DCT
    ops agree exactly: the same mixed noise (SPEC 3) in corruption, Euler and Heun steps."""
    g = torch.Generator().manual_seed(2)
    x, den, xp, dp = (torch.rand(2, 3, 8, 8, generator=g, dtype=dtype) * 2 - 1 for _ in range(4))
    sigma = torch.tensor([0.4, 0.9])
    torch.testing.assert_close(linear_relay_corrupt(x, sigma, 0.0, seed=3), relay_corrupt(x, sigma, 0.0, seed=3),
                               **TOL[dtype])
    for kw in ({}, dict(x_prop=xp, denoised_prop=dp)):
        torch.testing.assert_close(linear_relay_step(x, den, 0.7, 0.4, 0.0, 0.0, s_noise=0.5, seed=9, **kw),
                                   relay_step(x, den, 0.7, 0.4, 0.0, 0.0, s_noise=0.5, seed=9, **kw),
                                   **TOL[dtype])


def test_linear_half_types_compute_in_float32():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    want = linear_relay_corrupt(x.bfloat16().float(), 0.3, 0.5, seed=1)
    got = linear_relay_corrupt(x.bfloat16(), 0.3, 0.5, seed=1)
    assert got.dtype == torch.bfloat16
    # one rounding of the float32 result (bfloat16 spacing 2^-7 relative)
    torch.testing.assert_close(got.float(), want.bfloat16().float(), rtol=0, atol=0)


def test_linear_ops_non_contiguous_and_empty():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)).permute(0, 1, 3, 2)
    d = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    for got, want in ((linear_relay_corrupt(x, 0.3, 0.5, seed=1),
                       linear_relay_corrupt(x.contiguous(), 0.3, 0.5, seed=1)),
                      (linear_relay_step(x, d, 0.6, 0.2, 0.5, 0.1, seed=1),
                       linear_relay_step(x.contiguous(), d, 0.6, 0.2, 0.5, 0.1, seed=1))):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for shape in ((0, 3, 8, 8), (2, 0, 8, 8), (2, 3, 0, 8)):
        e = torch.zeros(shape)
        assert linear_relay_corrupt(e, 0.3, 0.5, seed=1).shape == shape
        assert linear_relay_step(e, e, 0.5, 0.3, 0.5, 0.2, seed=1).shape == shape


def test_linear_corrupt_gradient():
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: linear_relay_corrupt(x, 0.3, torch.tensor([0.2, 0.8]), seed=1), (x,))


def test_linear_ops_errors():
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="weight must be in"):
        linear_relay_corrupt(x, 0.1, 1.5)
    with pytest.raises(ValueError, match="weight_next"):
        linear_relay_step(x, x, 0.5, 0.2, 0.5, -0.1)
    with pytest.raises(ValueError, match="weight must be a float or a tensor of shape"):
        linear_blur(x, torch.zeros(3))
    with pytest.raises(ValueError, match="multiples of patch_size"):
        linear_relay_corrupt(torch.zeros(1, 1, 6, 6), 0.1, 0.5)
    with pytest.raises(ValueError, match="x_prop and denoised_prop"):
        linear_relay_step(x, x, 0.5, 0.2, 0.5, 0.1, x_prop=x)
    with pytest.raises(ValueError, match="denoised must have the shape"):
        linear_relay_step(x, x[:1], 0.5, 0.2, 0.5, 0.1)


# ---------------------------------------------------------------- config

def test_config_blur_option_and_round_trip():
    c = RelayConfig(blur="linear", min_scale=0.0, truncation=0.89)
    assert RelayConfig.from_dict(c.to_dict()) == c and c.to_dict()["blur"] == "linear"
    old = RelayConfig().to_dict()
    del old["blur"]                          # metadata written before the option existed
    assert RelayConfig.from_dict(old).blur == "dct"
    with pytest.raises(ValueError, match="blur must be one of"):
        RelayConfig(blur="gaussian")
    # the blur's op argument: tau for "dct", the weight w(t) = t for "linear" (SPEC 2b)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(RelayConfig().blur_of_t(t), RelayConfig().tau_of_t(t))
    torch.testing.assert_close(c.blur_of_t(t), t)
    s = c.sigma_of_t(t[1:])
    torch.testing.assert_close(c.blur_of_sigma(s), t[1:])
    torch.testing.assert_close(c.blur_of_sigma(s, t_truncation=1.05), t[1:] * 0.89 / 1.05)
    sigma, w = c.sample_training(1000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(w.double(), c.t_of_sigma(sigma.double()), rtol=1e-5, atol=1e-6)
    assert w.min() >= c.t_min * (1 - 1e-6) and w.max() <= 1.0


# ---------------------------------------------------------------- relay loss

class _Record(torch.nn.Module):
    def forward(self, x, sigma, class_labels=None):
        self.x, self.sigma = x, sigma
        return x


def test_relay_loss_linear_feeds_blurred_x0_plus_mixed_noise():
    """``x_t = Blur_w(x0) + sigma n``, ``w = t(sigma)``: the residual ``(x_t - Blur_w(x0)) / sigma``
    has mean 0, variance 1 and the mixed noise's neighbour covariance
    ``alpha^2/(1+alpha^2) (s-1)/s`` (SPEC 3). A wrong blur would leave ``(blur error) / sigma``
    in it, which at the smallest levels (sigma ~ 0.0075) is far above 1."""
    torch.manual_seed(0)
    relay = RelayConfig(blur="linear", alpha=0.5, truncation=0.89)
    x0 = torch.rand(256, 3, 16, 16, dtype=torch.float64) * 2 - 1
    net = _Record()
    RelayLoss(relay)(net, x0.float())
    sigma = net.sigma.double()
    w = relay.t_of_sigma(sigma)
    r = (net.x.double() - _blur_oracle(x0, w, 4, relay.min_scale)) / sigma[:, None, None, None]
    n = r.numel()
    # the mean of n mixed-noise pixels has variance (1 + s^2 alpha^2) / (1 + alpha^2) / n (the block
    # part's covariances sum to s^2); the variance and covariance estimates have sd ~0.004 here
    assert abs(r.mean().item()) < 5 * math.sqrt((1 + 16 * 0.25) / 1.25 / n)
    assert abs(r.var().item() - 1) < 0.02
    cov = (r[..., :, 1:] * r[..., :, :-1]).mean().item()
    assert abs(cov - 0.25 / 1.25 * 3 / 4) < 0.02
    # the levels: truncated log-normal, as for the DCT blur
    assert sigma.min() >= relay.sigma_floor * (1 - 1e-5) and sigma.max() <= relay.sigma_max * (1 + 1e-5)


def test_relay_loss_picks_the_configs_blur():
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    net = _Record()
    torch.manual_seed(1)
    RelayLoss(RelayConfig(blur="linear"))(net, x0)
    torch.manual_seed(1)
    sigma, w = RelayConfig(blur="linear").sample_training(4)
    seed = int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64))   # what the op draws next
    torch.testing.assert_close(net.x, linear_relay_corrupt(x0, sigma, w, **RelayConfig().op_kwargs(), seed=seed))


# ---------------------------------------------------------------- sampler

@pytest.mark.parametrize("s_noise", [0.0, 0.2])
def test_linear_relay_exact_denoiser_returns_x0(s_noise):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    config = RelayConfig(blur="linear")
    sigmas = truncate_sigmas(karras_sigmas(20, 0.008, 80.0), 0.9)
    x = relay_init(F.avg_pool2d(x0, 4), float(sigmas[0]), config, seed=3)
    seen = []
    out = sample_relay(lambda x, s, c=None: x0.clone(), x, sigmas, config, s_noise=s_noise, seed=1,
                       callback=seen.append, disable=True)
    assert torch.equal(out, x0)
    assert all(torch.equal(d["denoised"], x0) for d in seen) and len(seen) == sigmas.numel() - 1


def test_linear_relay_euler_keeps_the_marginal_mean():
    """With the true x0 and s = 0, each Euler step maps the marginal's mean ``Blur_{w_c}(x0)`` to
    ``Blur_{w_n}(x0)`` exactly (SPEC 6 consistency, any factors)."""
    config = RelayConfig(blur="linear", min_scale=0.0)
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1
    levels = torch.tensor([0.8, 0.3, 0.05, 0.01], dtype=torch.float64)
    w = config.blur_of_sigma(levels)
    x = linear_blur(x0, float(w[0]), 4, 0.0)
    for i in range(len(levels) - 1):
        # a two-level grid without a final 0 and no Heun into its last level: one Euler step
        x = sample_relay(lambda x, s, c=None: x0.clone(), x, levels[i:i + 2], config, s_noise=0.0,
                         heun_last_level=False, disable=True)
        torch.testing.assert_close(x, linear_blur(x0, float(w[i + 1]), 4, 0.0), rtol=0, atol=1e-13)


@pytest.mark.parametrize("s_noise, fresh, t_truncation", [(0.2, False, None), (0.0, False, None),
                                                          (0.5, True, 1.05)])
def test_linear_relay_gaussian_moments(s_noise, fresh, t_truncation):
    """Gaussian data in the patch-DCT domain (alpha = 0), the posterior-mean denoiser of the
    linear blur's marginal: per coefficient the samples' mean and variance match the exact
    output moments of Algorithm 1 with SPEC 2b's factors, and the data's."""
    config = RelayConfig(alpha=0.0, blur="linear")
    p = config.patch_size
    mu, v, denoiser = _gaussian_relay_setup(config, t_truncation)
    sigmas = truncate_sigmas(karras_sigmas(64, 0.008, 80.0), 0.9)
    x = _start_state(mu, v, float(sigmas[0]), config, (128, 3, 32, 32), seed=11, t_truncation=t_truncation)
    out = sample_relay(denoiser, x, sigmas, config, s_noise=s_noise, fresh_correction_noise=fresh,
                       t_truncation=t_truncation, seed=5, disable=True)
    samples = _per_coef(patch_dct(out, p), p)
    n = samples.shape[0]
    m_hat, v_hat = samples.mean(0), samples.var(0)
    mean, var = _relay_oracle(mu, v, sigmas.tolist(), config, s_noise, fresh, t_truncation)
    z = _z(2 * p * p)
    tol_m, tol_v = z * (var / n).sqrt(), z * var * math.sqrt(2 / (n - 1))
    assert bool(((m_hat - mean).abs() <= tol_m).all()), (m_hat - mean) / tol_m
    assert bool(((v_hat - var).abs() <= tol_v).all()), (v_hat - var) / tol_v
    # against the data: the same tolerance plus the oracle's exact discretisation error
    assert bool(((m_hat - mu).abs() <= tol_m + (mean - mu).abs()).all())
    assert bool(((v_hat - v).abs() <= tol_v + (var - v).abs()).all())
    # the oracle is specific to the blur: the DCT blur's moments would not fit these samples
    dct = dataclasses.replace(config, blur="dct")
    mean_d, var_d = _relay_oracle(mu, v, sigmas.tolist(), dct, s_noise, fresh, t_truncation)
    assert not (bool(((m_hat - mean_d).abs() <= tol_m).all()) and bool(((v_hat - var_d).abs() <= tol_v).all()))


# ---------------------------------------------------------------- CLI

def test_cli_train_sample_upscale_linear(tmp_path, capsys):
    """``relaydiff train --stage relay --blur linear`` saves the option in the checkpoint's
    RelayConfig, and ``sample`` / ``upscale`` sample with it without being told."""
    data = make_images(tmp_path / "data", n_per_class=4, size=(32, 32))
    common = ["--data", str(data), "--preset", "tiny", "--batch", "2", "--workers", "0", "--sample-every", "-1",
              "--quiet", "--device", "cpu"]
    base, relay = tmp_path / "base", tmp_path / "relay"
    assert main(["train", "--stage", "base", "--out", str(base), "--resolution", "8", "--steps", "1", *common]) == 0
    assert main(["train", "--stage", "relay", "--out", str(relay), "--resolution", "32", "--steps", "2",
                 "--blur", "linear", *common]) == 0, capsys.readouterr().err
    assert load_model(relay)[1]["relay"]["blur"] == "linear"
    pipe = RelayPipeline.from_checkpoints(str(base), str(relay))
    assert pipe.config.blur == "linear"

    out = tmp_path / "samples"
    assert main(["sample", "--stage1", str(base), "--stage2", str(relay), "--out", str(out), "--n", "2",
                 "--steps", "4,8", "--seed", "3", "--quiet"]) == 0, capsys.readouterr().err
    got = torch.from_numpy(np.array(Image.open(out / "000003.png"))).permute(2, 0, 1).float() / 127.5 - 1
    want = pipe.sample(2, seed=3, steps=(4, 8), disable=True)
    assert (got - want[0]).abs().max() <= 1 / 127.5 + 1e-6
    pipe.config = dataclasses.replace(pipe.config, blur="dct")
    assert (got - pipe.sample(2, seed=3, steps=(4, 8), disable=True)[0]).abs().max() > 0.02

    src, up = tmp_path / "low", tmp_path / "up"
    src.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(src / f"{name}.png")
    assert main(["upscale", "--stage2", str(relay), "--in", str(src), "--out", str(up), "--steps", "8",
                 "--quiet"]) == 0, capsys.readouterr().err
    for name in ("a.png", "b.png"):
        with Image.open(up / name) as im:
            assert im.size == (32, 32)
