"""relaydiff.ops: kernels vs reference twins vs independent float64 oracles, properties,
statistics, autograd/opcheck/compile and bad input. Runs on every device in DEVICES."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import relaydiff.ops as O
from relaydiff.ops import _ext
from relaydiff.ops import reference as R
from relaydiff.ops._philox import philox4x32_10, philox_normal

from conftest import (DEVICES, DTYPES, FULL_DTYPES, PATCH_SIZES, box_oracle, dct_oracle,
                      needs_kernel, rel_err)

# float32 kernels accumulate at most ~2p products per value: rounding stays far below 1e-6
TOL_REL = {torch.float32: 1e-6, torch.float64: 1e-13}
# the kernels' float32 Box-Muller (polynomial log/sincos) vs float64 libm in the twins:
# |n| <= 5.8 and a few float32 ulps of that
NOISE_ATOL = {torch.float32: 1e-5, torch.float64: 1e-12}

SHAPES = [(2, 3, 16, 16), (1, 1, 16, 48), (3, 2, 32, 16)]


def rand(shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def layouts(x: torch.Tensor):
    """The same values as contiguous, channels_last and a strided view."""
    yield "contiguous", x
    yield "channels_last", x.to(memory_format=torch.channels_last)
    wide = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    yield "strided", wide[..., ::2]


# ------------------------------------------------------------------ the generator

def test_philox_known_answers():
    """Random123's published Philox4x32-10 test vectors."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in cases:
        got = philox4x32_10(tuple(torch.tensor([c]) for c in ctr), key)
        assert tuple(int(v) for v in got) == want


def test_philox_normal_is_standard_normal():
    n = philox_normal(1 << 20, seed=123, stream=0)
    # mean/var of 2^20 N(0,1) draws: std errors 1e-3 and 1.4e-3; 5 sigma bounds
    assert abs(float(n.mean())) < 5e-3
    assert abs(float(n.var()) - 1.0) < 7e-3
    # offsets: a window equals the slice of a longer draw (counter addressing)
    assert torch.equal(philox_normal(10, 123, 0, start=5), n[5:15])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_white_noise_matches_generator(device, dtype):
    """mixed_noise with alpha=0 is stream 0 of the generator, element by element."""
    like = torch.empty(2, 3, 8, 12, dtype=dtype, device=device)
    got = O.mixed_noise(like, alpha=0.0, seed=99)
    want = philox_normal(like.numel(), 99, 0).reshape(like.shape)
    torch.testing.assert_close(got.cpu().double(), want, atol=NOISE_ATOL[dtype], rtol=0)


# ------------------------------------------------------------------ patch DCT

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", PATCH_SIZES)
@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_patch_dct_matches_scipy(device, p, dtype):
    for shape in [(2, 3, 2 * p, 3 * p), (1, 1, p, p), (3, 2, 4 * p, 2 * p)]:
        x = rand(shape, dtype, device)
        for name, xl in layouts(x):
            u = O.patch_dct(xl, p)
            assert u.is_contiguous() and u.dtype == dtype and u.shape == x.shape
            assert rel_err(u, dct_oracle(x, p)) < TOL_REL[dtype], name
            assert rel_err(O.patch_idct(xl, p), dct_oracle(x, p, inverse=True)) < TOL_REL[dtype], name
            assert rel_err(R.patch_dct(xl, p), dct_oracle(x, p)) < TOL_REL[dtype], name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", PATCH_SIZES)
def test_patch_dct_roundtrip_and_energy(device, p):
    x = rand((2, 3, 2 * p, 4 * p), torch.float64, device)
    u = O.patch_dct(x, p)
    torch.testing.assert_close(O.patch_idct(u, p), x, atol=1e-12, rtol=0)
    # orthonormal: the energy of every patch is kept
    e_x = x.reshape(2, 3, 2, p, 4, p).pow(2).sum((3, 5))
    e_u = u.reshape(2, 3, 2, p, 4, p).pow(2).sum((3, 5))
    torch.testing.assert_close(e_u, e_x, atol=1e-10, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_patch_dct_layout(device):
    """Coefficient (k, l) of patch (P, Q) sits at (p*P + k, p*Q + l); DC = sqrt(p^2) * mean."""
    p = 4
    x = rand((1, 1, 8, 12), torch.float64, device)
    u = O.patch_dct(x, p)
    means = x.reshape(1, 1, 2, p, 3, p).mean((3, 5))
    torch.testing.assert_close(u[:, :, ::p, ::p], means * p, atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_patch_dct_zero_size(device):
    for shape in [(0, 3, 8, 8), (2, 0, 8, 8), (2, 3, 0, 8)]:
        x = torch.empty(shape, device=device)
        assert O.patch_dct(x, 4).shape == shape
        assert O.relay_corrupt(x, 0.5, 0.5, seed=1).shape == shape
        assert O.mixed_noise(x, seed=1).shape == shape
        assert O.relay_step(x, x, 1.0, 0.5, 0.3, 0.1, seed=1).shape == shape


# ------------------------------------------------------------------ blur

def test_blur_factors_closed_form():
    tau = torch.tensor([0.0, 0.7, 2.5], dtype=torch.float64)
    a = O.blur_factors(tau, patch_size=4, min_scale=1e-3)
    assert a.shape == (3, 4, 4)
    torch.testing.assert_close(a[0], torch.ones(4, 4, dtype=torch.float64))
    k, l = 2, 3
    want = (1 - 1e-3) * math.exp(-(math.pi ** 2 / 16) * (k * k + l * l) * 0.7) + 1e-3
    assert abs(float(a[1, k, l]) - want) < 1e-15
    assert O.blur_factors(0.3, patch_size=8).shape == (8, 8)
    # the DC coefficient is never blurred
    assert torch.all(a[:, 0, 0] == 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", PATCH_SIZES)
def test_blur_large_tau_is_patch_mean(device, p):
    """tau -> inf with m = 0: box-downsample then nearest-upsample (SPEC 2)."""
    x = rand((2, 3, 2 * p, 3 * p), torch.float64, device)
    got = O.patch_blur(x, 1e4, patch_size=p, min_scale=0.0)
    means = x.reshape(2, 3, 2, p, 3, p).mean((3, 5), keepdim=True).expand(2, 3, 2, p, 3, p)
    torch.testing.assert_close(got, means.reshape(x.shape), atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", PATCH_SIZES)
@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_blur_matches_oracle(device, p, dtype):
    x = rand((3, 2, 2 * p, p), dtype, device)
    tau = torch.tensor([0.0, 0.4, 3.0], dtype=torch.float64)
    a = O.blur_factors(tau, p, 1e-3)
    u = dct_oracle(x, p).reshape(3, 2, 2, p, 1, p) * a[:, None, None, :, None, :]
    want = dct_oracle(u.reshape(x.shape), p, inverse=True)
    for name, xl in layouts(x):
        assert rel_err(O.patch_blur(xl, tau.to(device), p), want) < TOL_REL[dtype], name


# ------------------------------------------------------------------ noise

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("s", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_block_noise_matches_roll_oracle(device, s, dtype):
    like = torch.empty(2, 3, 16, 24, dtype=dtype, device=device)
    g = philox_normal(like.numel(), 7, 1).reshape(like.shape)
    want = box_oracle(g, s)
    got = O.block_noise(like, block_size=s, seed=7)
    torch.testing.assert_close(got.cpu().double(), want, atol=2 * NOISE_ATOL[dtype], rtol=0)
    got_ref = R.block_noise(like, block_size=s, seed=7)
    torch.testing.assert_close(got_ref.cpu().double(), want, atol=2 * NOISE_ATOL[dtype], rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", [True, False])
def test_mixed_noise_is_white_plus_block(device, normalize):
    like = torch.empty(2, 2, 12, 8, dtype=torch.float64, device=device)
    alpha, s = 0.3, 4
    e = philox_normal(like.numel(), 5, 0).reshape(like.shape)
    b = box_oracle(philox_normal(like.numel(), 5, 1).reshape(like.shape), s)
    want = (e + alpha * b) / (math.sqrt(1 + alpha ** 2) if normalize else 1.0)
    got = O.mixed_noise(like, alpha=alpha, block_size=s, normalize=normalize, seed=5)
    torch.testing.assert_close(got.cpu(), want, atol=1e-12, rtol=0)


def _cov(n: torch.Tensor, dy: int, dx: int) -> float:
    return float((n * torch.roll(n, shifts=(dy, dx), dims=(2, 3))).mean())


@pytest.mark.parametrize("s", [2, 4])
def test_block_noise_statistics(s):
    """Unit variance and covariance max(0, s-|dy|) max(0, s-|dx|) / s^2, wrap-around included.

    N = 2^18 pixels. The estimator's standard deviation is at most sqrt(2 K / N) with
    K = (sum_d ((s - |d|)/s)^2)^2 (7.6 for s = 4): 0.0076; the bound is 5 of those.
    """
    n = O.block_noise(torch.empty(16, 4, 64, 64, dtype=torch.float64), block_size=s, seed=11)
    k = sum(((s - abs(d)) / s) ** 2 for d in range(-s + 1, s)) ** 2
    tol = 5 * math.sqrt(2 * k / n.numel())
    for dy in range(-s, s + 1):
        for dx in range(-s, s + 1):
            want = max(0, s - abs(dy)) * max(0, s - abs(dx)) / s ** 2
            assert abs(_cov(n, dy, dx) - want) < tol, (dy, dx)
    # wrap-around: row 0 is correlated with the last row as with row 1
    wrap = float((n[:, :, 0] * n[:, :, -1]).mean())
    assert abs(wrap - (s - 1) / s) < 4 * tol


@pytest.mark.parametrize("normalize", [True, False])
def test_mixed_noise_variance(normalize):
    """Var = 1 normalised, 1 + alpha^2 not. 2^18 pixels, same 5-sigma bound as above."""
    alpha = 0.5
    n = O.mixed_noise(torch.empty(16, 4, 64, 64, dtype=torch.float64), alpha=alpha, seed=3,
                      normalize=normalize)
    want = 1.0 if normalize else 1 + alpha ** 2
    assert abs(float(n.var()) - want) < 5 * want * math.sqrt(2 * 7.6 / n.numel())


@pytest.mark.parametrize("device", DEVICES)
def test_noise_is_a_function_of_seed_and_shape(device):
    like = torch.empty(2, 3, 16, 16, device=device)
    a = O.mixed_noise(like, seed=1)
    assert torch.equal(a, O.mixed_noise(like, seed=1))
    assert not torch.equal(a, O.mixed_noise(like, seed=2))
    torch.manual_seed(0)
    b = O.mixed_noise(like)
    torch.manual_seed(0)
    assert torch.equal(b, O.mixed_noise(like))
    # the layout of `like` does not matter, only its logical shape
    assert torch.equal(a, O.mixed_noise(like.to(memory_format=torch.channels_last), seed=1))


@pytest.mark.parametrize("block_size", [4, 3])
def test_noise_independent_of_thread_count(block_size):
    """Few planes are cut into row chunks, one per thread; block_size 3 with p = 4 makes the
    chunks start at rows that are not multiples of the block size."""
    x = rand((1, 3, 256, 64))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = O.relay_corrupt(x, 0.7, 0.5, block_size=block_size, seed=4)
        b = O.block_noise(x, block_size=block_size, seed=4)
        torch.set_num_threads(max(2, old))
        assert torch.equal(a, O.relay_corrupt(x, 0.7, 0.5, block_size=block_size, seed=4))
        assert torch.equal(b, O.block_noise(x, block_size=block_size, seed=4))
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------ relay_corrupt

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", PATCH_SIZES)
@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_relay_corrupt_is_blur_plus_scaled_noise(device, p, dtype):
    x0 = rand((3, 2, 2 * p, 3 * p), dtype, device)
    sigma = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    tau = torch.tensor([1.0, 0.3, 0.0], dtype=torch.float64)
    s = min(4, p)
    kw = dict(patch_size=p, alpha=0.2, block_size=s, min_scale=1e-3, normalize=True, seed=21)
    got = O.relay_corrupt(x0, sigma.to(device), tau.to(device), **kw)
    blur = O.patch_blur(x0.double(), tau.to(device), p, 1e-3).cpu()
    n = O.mixed_noise(x0.double(), alpha=0.2, block_size=s, seed=21).cpu()
    want = blur + sigma[:, None, None, None] * n
    torch.testing.assert_close(got.cpu().double(), want, atol=3 * NOISE_ATOL[dtype], rtol=TOL_REL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_relay_corrupt_kernel_vs_twin(device, dtype, shape):
    needs_kernel(device)
    x0 = rand(shape, dtype, device)
    sigma = torch.linspace(0.1, 3.0, shape[0], dtype=torch.float64)
    for name, xl in layouts(x0):
        got = O.relay_corrupt(xl, sigma.to(device), 0.8, seed=8)
        want = R.relay_corrupt(x0, sigma.to(device), 0.8, seed=8)
        if dtype in FULL_DTYPES:
            torch.testing.assert_close(got, want, atol=4 * NOISE_ATOL[dtype], rtol=0)
        else:
            oracle = R.relay_corrupt(x0.double(), sigma.to(device), 0.8, seed=8)
            assert rel_err(got, oracle) <= 2 * rel_err(want, oracle) + 1e-6, name


def test_relay_corrupt_moments_per_coefficient():
    """alpha = 0: DCT(x_t) ~ N(a_tau u0, sigma^2) per coefficient (SPEC 5).

    2048 draws per coefficient: the mean's error is sigma/45 and the variance's
    sigma^2 * 0.031 (one std error); bounds are 5 of those.
    """
    p, n, sigma, tau = 4, 2048, 0.8, 0.6
    x0 = rand((1, 1, 8, 8), torch.float64).expand(n, 1, 8, 8).contiguous()
    xt = O.relay_corrupt(x0, sigma, tau, alpha=0.0, seed=17)
    u = O.patch_dct(xt, p)
    a = O.blur_factors(tau, p).repeat(2, 2)
    u0 = O.patch_dct(x0[:1], p)[0, 0]
    mean_err = (u.mean(0)[0] - a * u0).abs().max()
    assert mean_err < 5 * sigma / math.sqrt(n)
    assert (u.var(0)[0] / sigma ** 2 - 1).abs().max() < 5 * math.sqrt(2 / n)
    # with block noise the per-pixel variance is still sigma^2 (Parseval), the mean unchanged
    xt = O.relay_corrupt(x0, sigma, tau, alpha=0.5, seed=18)
    u = O.patch_dct(xt, p)
    assert (u.mean(0)[0] - a * u0).abs().max() < 5 * 1.5 * sigma / math.sqrt(n)
    assert abs(float((xt - xt.mean(0)).pow(2).mean()) / sigma ** 2 - 1) < 0.05


# ------------------------------------------------------------------ relay_step

def _step_oracle(x, den, xp, dp, sig, sig_n, tau, tau_n, s_noise, p, alpha, s, m, normalize, seed):
    """SPEC 6 written directly with the scipy DCT, float64."""
    a_c = R.blur_factors_impl(tau, p, m)
    a_n = R.blur_factors_impl(tau_n, p, m)
    gamma = (math.sqrt(1 - s_noise ** 2) * sig_n / sig)[:, None, None]
    A, B = a_n + gamma * (1 - a_c), gamma * a_c - a_n
    bsz, c, h, w = x.shape
    tile = lambda f: f[:, None, None, :, None, :]
    d = dct_oracle(x - den, p) / sig[:, None, None, None]
    if xp is not None:
        d = 0.5 * (d + dct_oracle(xp - dp, p) / sig_n[:, None, None, None])
    ux = dct_oracle(x, p).reshape(bsz, c, h // p, p, w // p, p)
    ud = d.reshape(ux.shape)
    un = A[:, None, None, :, None, :] * ux + sig[:, None, None, None, None, None] * tile(B) * ud
    out = dct_oracle(un.reshape(x.shape), p, inverse=True)
    e = philox_normal(x.numel(), seed, 0).reshape(x.shape)
    b = box_oracle(philox_normal(x.numel(), seed, 1).reshape(x.shape), s)
    n = (e + alpha * b) / (math.sqrt(1 + alpha ** 2) if normalize else 1.0)
    return out + (s_noise * sig_n)[:, None, None, None] * n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", PATCH_SIZES)
@pytest.mark.parametrize("heun", [False, True])
@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_relay_step_matches_oracle(device, p, heun, dtype):
    shape = (2, 2, 2 * p, 3 * p)
    x, den, xp, dp = (rand(shape, dtype, device, seed=i) for i in range(4))
    sig = torch.tensor([2.0, 0.7], dtype=torch.float64)
    sig_n = torch.tensor([1.1, 0.3], dtype=torch.float64)
    tau = torch.tensor([1.5, 0.2], dtype=torch.float64)
    tau_n = torch.tensor([0.9, 0.05], dtype=torch.float64)
    s = min(4, p)
    kw = dict(s_noise=0.2, patch_size=p, alpha=0.15, block_size=s, min_scale=1e-3, seed=31)
    want = _step_oracle(x.double().cpu(), den.double().cpu(), xp.double().cpu() if heun else None,
                        dp.double().cpu() if heun else None, sig, sig_n, tau, tau_n, 0.2, p, 0.15,
                        s, 1e-3, True, 31)
    dv = lambda t: t.to(device)
    for name, xl in layouts(x):
        got = O.relay_step(xl, den, dv(sig), dv(sig_n), dv(tau), dv(tau_n),
                           x_prop=xp if heun else None, denoised_prop=dp if heun else None, **kw)
        torch.testing.assert_close(got.cpu().double(), want, atol=5 * NOISE_ATOL[dtype],
                                   rtol=10 * TOL_REL[dtype], msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heun", [False, True])
def test_relay_step_kernel_vs_twin(device, dtype, heun):
    needs_kernel(device)
    shape = (2, 3, 16, 24)
    x, den, xp, dp = (rand(shape, dtype, device, seed=i) for i in range(4))
    args = (x, den, torch.tensor([1.5, 0.8]), torch.tensor([0.9, 0.4]), 1.0, 0.4)
    kw = dict(x_prop=xp if heun else None, denoised_prop=dp if heun else None, seed=5)
    got = O.relay_step(*args, **kw)
    want = R.relay_step(*args, **kw)
    if dtype in FULL_DTYPES:
        torch.testing.assert_close(got, want, atol=4 * NOISE_ATOL[dtype], rtol=10 * TOL_REL[dtype])
    else:
        up = [a.double() if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args]
        kw64 = dict(kw, x_prop=xp.double() if heun else None, denoised_prop=dp.double() if heun else None)
        oracle = R.relay_step(*up, **kw64)
        assert rel_err(got, oracle) <= 2 * rel_err(want, oracle) + 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_relay_step_heun_with_equal_slopes_is_euler(device):
    x, den, xp = (rand((1, 3, 8, 8), torch.float64, device, seed=i) for i in range(3))
    sig, sig_n = 1.3, 0.6
    dp = xp - (x - den) * (sig_n / sig)           # (xp - dp)/sig_n == (x - den)/sig
    euler = O.relay_step(x, den, sig, sig_n, 0.7, 0.3, seed=2)
    heun = O.relay_step(x, den, sig, sig_n, 0.7, 0.3, x_prop=xp, denoised_prop=dp, seed=2)
    torch.testing.assert_close(heun, euler, atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_relay_step_to_zero_returns_denoised(device):
    """sigma_next = 0, tau_next = 0: gamma = eta = 0, A = 1, B = -1 -> x_n = D."""
    x, den = (rand((2, 3, 8, 8), torch.float64, device, seed=i) for i in range(2))
    out = O.relay_step(x, den, 0.5, 0.0, 0.2, 0.0, seed=1)
    torch.testing.assert_close(out, den, atol=1e-12, rtol=0)


@pytest.mark.parametrize("s_noise", [0.0, 0.2, 0.6])
def test_relay_step_keeps_forward_marginal(s_noise):
    """SPEC 6 / paper A.3: with the true x0 as denoiser and white noise, an Euler step from
    x_c ~ N(a_c u0, sigma_c^2) lands on N(a_n u0, sigma_n^2) per DCT coefficient.
    4096 draws: 5-sigma bounds on mean (sigma_n/64) and variance (sqrt(2/4096))."""
    p, n = 4, 4096
    x0 = rand((1, 1, 8, 8), torch.float64).expand(n, 1, 8, 8).contiguous()
    sig, sig_n, tau, tau_n = 1.2, 0.5, 2.0, 0.4
    xc = O.relay_corrupt(x0, sig, tau, alpha=0.0, seed=40)
    xn = O.relay_step(xc, x0, sig, sig_n, tau, tau_n, s_noise=s_noise, alpha=0.0, seed=41)
    u = O.patch_dct(xn, p)
    a_n = O.blur_factors(tau_n, p).repeat(2, 2)
    u0 = O.patch_dct(x0[:1], p)[0, 0]
    assert (u.mean(0)[0] - a_n * u0).abs().max() < 5 * sig_n / math.sqrt(n)
    assert (u.var(0)[0] / sig_n ** 2 - 1).abs().max() < 5 * math.sqrt(2 / n)


# ------------------------------------------------------------------ autograd, opcheck, compile

@pytest.mark.parametrize("p", [2, 4, 8])
def test_gradcheck(p):
    x = rand((1, 2, 2 * p, p), torch.float64).requires_grad_()
    tau = torch.tensor([0.4], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: O.patch_dct(t, p), (x,))
    assert torch.autograd.gradcheck(lambda t: O.patch_idct(t, p), (x,))
    assert torch.autograd.gradcheck(lambda t: O.patch_blur(t, tau, p), (x,))
    assert torch.autograd.gradcheck(lambda t: O.relay_corrupt(t, 0.5, tau, p, block_size=p, seed=3), (x,))


def _opcheck_samples(device):
    x = rand((2, 3, 8, 16), torch.float32, device)
    d = rand((2, 3, 8, 16), torch.float32, device, seed=1)
    f64 = dict(dtype=torch.float64, device=device)
    sig = torch.tensor([0.5, 1.5], **f64)
    tau = torch.tensor([0.3, 1.0], **f64)
    ops = torch.ops.relaydiff
    return [
        (ops.patch_dct, (x, 4)), (ops.patch_idct, (x, 2)),
        (ops.patch_blur, (x, tau, 4, 1e-3)),
        (ops.block_noise, (x, 4, 3)), (ops.mixed_noise, (x, 0.15, 4, True, 3)),
        (ops.relay_corrupt, (x, sig, tau, 4, 0.15, 4, 1e-3, True, 3)),
        (ops.relay_step, (x, d, None, None, sig, sig * 0.5, tau, tau * 0.5, 0.2, 4, 0.15, 4, 1e-3, True, 3)),
        (ops.relay_step, (x, d, d, x, sig, sig * 0.5, tau, tau * 0.5, 0.2, 8, 0.15, 2, 1e-3, False, 3)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    needs_kernel(device)
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)
    # the differentiable ops, with inputs that require grad
    x = rand((1, 2, 8, 8), torch.float64, device).requires_grad_()
    tau = torch.tensor([0.3], dtype=torch.float64, device=device)
    for op, args in [(torch.ops.relaydiff.patch_dct, (x, 4)), (torch.ops.relaydiff.patch_idct, (x, 4)),
                     (torch.ops.relaydiff.patch_blur, (x, tau, 4, 1e-3)),
                     (torch.ops.relaydiff.relay_corrupt, (x, tau, tau, 4, 0.15, 4, 1e-3, True, 3))]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    needs_kernel(device)

    def f(x, den, sigma, tau):
        u = O.patch_dct(x, 4)
        xt = O.relay_corrupt(O.patch_idct(u, 4), sigma, tau, seed=3)
        return O.relay_step(xt, den, sigma, sigma * 0.5, tau, tau * 0.5, seed=4) + O.mixed_noise(x, seed=5)

    x, den = rand((2, 3, 16, 16), device=device), rand((2, 3, 16, 16), device=device, seed=1)
    sigma = torch.tensor([0.5, 1.0], dtype=torch.float64, device=device)
    tau = torch.tensor([0.2, 0.8], dtype=torch.float64, device=device)
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, den, sigma, tau), f(x, den, sigma, tau))


# ------------------------------------------------------------------ bad input

BAD_CALLS = [
    (lambda: O.patch_dct(torch.zeros(3, 8, 8)), ValueError, "4-D"),
    (lambda: O.patch_dct(torch.zeros(1, 1, 8, 6)), ValueError, "multiples of patch_size"),
    (lambda: O.patch_dct(torch.zeros(1, 1, 8, 8), 3), ValueError, "patch_size"),
    (lambda: O.patch_dct(torch.zeros(1, 1, 8, 8), 0), ValueError, "patch_size"),
    (lambda: O.patch_dct(torch.zeros(1, 1, 8, 8, dtype=torch.int32)), ValueError, "dtype"),
    (lambda: O.patch_dct([[1.0]]), TypeError, "torch.Tensor"),
    (lambda: O.relay_corrupt(torch.zeros(2, 1, 8, 8), torch.ones(3), 0.5), ValueError, "sigma"),
    (lambda: O.relay_corrupt(torch.zeros(2, 1, 8, 8), -1.0, 0.5), ValueError, "sigma"),
    (lambda: O.relay_corrupt(torch.zeros(2, 1, 8, 8), float("nan"), 0.5), ValueError, "sigma"),
    (lambda: O.relay_corrupt(torch.zeros(2, 1, 8, 8), torch.tensor([0.1, float("nan")]), 0.5), ValueError, "sigma"),
    (lambda: O.relay_corrupt(torch.zeros(2, 1, 8, 8), 0.5, -0.1), ValueError, "tau"),
    (lambda: O.relay_corrupt(torch.zeros(2, 1, 8, 8), 0.5, 0.1, block_size=0), ValueError, "block_size"),
    (lambda: O.relay_corrupt(torch.zeros(2, 1, 4, 4), 0.5, 0.1, block_size=8), ValueError, "block_size"),
    (lambda: O.relay_corrupt(torch.zeros(2, 1, 8, 8), 0.5, 0.1, alpha=-1), ValueError, "alpha"),
    (lambda: O.relay_corrupt(torch.zeros(2, 1, 8, 8), 0.5, 0.1, seed=-3), ValueError, "seed"),
    (lambda: O.relay_corrupt(torch.zeros(2, 1, 8, 8), 0.5, 0.1, min_scale=1.0), ValueError, "min_scale"),
    (lambda: O.relay_step(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 4), 1.0, 0.5, 0.1, 0.1), ValueError, "denoised"),
    (lambda: O.relay_step(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8, dtype=torch.float64), 1.0, 0.5, 0.1, 0.1), ValueError, "denoised"),
    (lambda: O.relay_step(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), 0.0, 0.5, 0.1, 0.1), ValueError, "sigma"),
    (lambda: O.relay_step(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), 1.0, 0.5, 0.1, 0.1, s_noise=1.5), ValueError, "s_noise"),
    (lambda: O.relay_step(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), 1.0, 0.5, 0.1, 0.1,
                          x_prop=torch.zeros(1, 1, 8, 8)), ValueError, "denoised_prop"),
    (lambda: O.relay_step(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), 1.0, 0.0, 0.1, 0.1,
                          x_prop=torch.zeros(1, 1, 8, 8), denoised_prop=torch.zeros(1, 1, 8, 8)), ValueError, "sigma_next"),
    (lambda: O.blur_factors(-1.0), ValueError, "tau"),
]


@pytest.mark.parametrize("i", range(len(BAD_CALLS)))
def test_bad_input_names_the_argument(i):
    call, exc, word = BAD_CALLS[i]
    with pytest.raises(exc, match=word):
        call()


def test_bad_input_direct_op_calls():
    """The C++ checks guard callers who bypass the Python wrappers."""
    needs_kernel("cpu")
    ops = torch.ops.relaydiff
    x = torch.zeros(2, 1, 8, 8)
    f64 = torch.ones(2, dtype=torch.float64)
    cases = [
        (lambda: ops.patch_dct(torch.zeros(8, 8), 4), "4-D"),
        (lambda: ops.patch_dct(x, 3), "patch_size"),
        (lambda: ops.patch_dct(torch.zeros(1, 1, 8, 6), 4), "multiples"),
        (lambda: ops.relay_corrupt(x, torch.ones(3, dtype=torch.float64), f64, 4, 0.1, 4, 1e-3, True, 1), "sigma"),
        (lambda: ops.relay_corrupt(x, -f64, f64, 4, 0.1, 4, 1e-3, True, 1), "sigma"),
        (lambda: ops.relay_corrupt(x, f64 * float("nan"), f64, 4, 0.1, 4, 1e-3, True, 1), "sigma"),
        (lambda: ops.relay_corrupt(x, f64, f64, 4, 0.1, 4, 1e-3, True, -1), "seed"),
        (lambda: ops.mixed_noise(x, 0.1, 17, True, 1), "block_size"),
        (lambda: ops.relay_step(x, x, None, None, 0 * f64, f64, f64, f64, 0.2, 4, 0.1, 4, 1e-3, True, 1), "sigma"),
        (lambda: ops.relay_step(x, x, x, None, f64, f64, f64, f64, 0.2, 4, 0.1, 4, 1e-3, True, 1), "x_prop"),
    ]
    for call, word in cases:
        with pytest.raises(RuntimeError, match=word):
            call()


@pytest.mark.cuda
def test_mismatched_devices():
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="device"):
        O.relay_step(x, x.cuda(), 1.0, 0.5, 0.1, 0.1)
    with pytest.raises(ValueError, match="sigma"):
        O.relay_corrupt(x, torch.ones(1, device="cuda"), 0.1)


# ------------------------------------------------------------------ backends

def test_backend_reports_and_reference_fallback():
    code = ("import torch, relaydiff.ops as O; torch.manual_seed(0); "
            "x = torch.randn(1, 1, 8, 8); "
            "print(O.backend(), float(O.relay_corrupt(x, 0.5, 0.5, seed=1).sum()))")
    env = dict(os.environ, RELAYDIFF_FORCE_REFERENCE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    name, value = out.stdout.split()
    assert name == "reference"
    if _ext.loaded():
        assert O.backend() in ("cpp", "cpp+cuda")
        torch.manual_seed(0)
        x = torch.randn(1, 1, 8, 8)
        # the same generator on both paths: the sums agree to float rounding
        assert abs(float(O.relay_corrupt(x, 0.5, 0.5, seed=1).sum()) - float(value)) < 1e-4


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_cpu_simd_paths_give_identical_bits(isa):
    """The CPU Philox has AVX-512, AVX2 and scalar paths picked at run time; capping the
    choice with RELAYDIFF_CPU_ISA must not change a single bit of the noise."""
    needs_kernel("cpu")
    code = ("import torch, relaydiff.ops as O; "
            "n = O.mixed_noise(torch.empty(2, 3, 20, 36), seed=2**40 + 7); "
            "print(repr(n.double().sum().item()), repr(n.double().pow(2).sum().item()))")
    run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                     text=True, check=True).stdout
    base = run(dict(os.environ))
    assert run(dict(os.environ, RELAYDIFF_CPU_ISA=isa)) == base
