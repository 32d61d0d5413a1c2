"""The ``authors-*`` sampler presets against a literal float64 transcription of the authors'
generate scripts (THUDM/RelayDiffusion generate_imagenet.py / generate_celebahq.py:
``edm_sampler``, ``blur_sampler``, ``get_alpha_t``, their click defaults), and per-image seeds.

The transcription below is written from their code's math (its own orthonormal patch DCT
matrix, its own blur factors, the loops as they stand, churn included), not from relaydiff's
samplers; only the noise fields come from relaydiff.ops (a pure function of (seed, shape)),
drawn in the order their code calls ``randn_like``, with the seeds relaydiff's samplers
document (``derive_seed(seed, step)`` for a step, ``(seed, step, 1)`` for the correction,
``(seed, step, 2)`` for churn). The noise is composed as theirs: ``randn + s_block *
block_noise``, without normalization. Their main loop (stage 1, ``F.interpolate`` of the
unclamped stage-1 images, relay stage, classes ``seed % label_dim``) is composed from the two
transcriptions and compared with ``RelayPipeline.sample``; their uint8 conversion with relaydiff's
``authors_to_uint8``.
"""
from __future__ import annotations

import dataclasses
import math

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from relaydiff import RelayConfig
from relaydiff.images import authors_enhance, authors_postprocess, authors_to_uint8, to_uint8
from relaydiff.ops import block_noise, mixed_noise
from relaydiff.pipeline import RelayPipeline
from relaydiff.sampling import PRESETS, derive_seed, relay_init, sample_edm, sample_relay
from relaydiff.sampling.guidance import cfg

F64 = torch.float64
# float64 round-off after 100-256 steps of O(1) images (each step ~1e-16 relative)
ATOL = 1e-12


class Toy(torch.nn.Module):
    """A nonlinear, spatially mixing, sigma- and label-dependent float64 denoiser; a label of
    all zeros is the unconditional model (as EDMPrecond treats ``class_labels=None``)."""

    def __init__(self, res, label_dim=0):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = res, 3, label_dim
        self.w = torch.linspace(-0.2, 0.2, max(label_dim, 1) * 3, dtype=F64).reshape(max(label_dim, 1), 3)

    def forward(self, x, sigma, class_labels=None):
        s = sigma.to(F64)[:, None, None, None]
        m = 0.1 * torch.tanh(x.roll(1, -1) + 0.5 * x.roll(-1, -2))
        if class_labels is not None:
            m = m + (class_labels.to(F64) @ self.w)[:, :, None, None]
        return m + 0.125 / (0.25 + s ** 2) * x - 0.05 * torch.sin(3 * x) * s / (1 + s)


# ------------------------------------------------------------ the authors' code, transcribed

def _karras(num_steps, sigma_min, sigma_max, rho):
    idx = torch.arange(num_steps, dtype=F64)
    return (sigma_max ** (1 / rho) + idx / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _dct_matrix(p):
    k, n = torch.meshgrid(torch.arange(p, dtype=F64), torch.arange(p, dtype=F64), indexing="ij")
    c = torch.cos(math.pi * (2 * n + 1) * k / (2 * p)) * math.sqrt(2 / p)
    c[0] /= math.sqrt(2)
    return c


def _dct2(x, p):
    b, ch, h, w = x.shape
    c = _dct_matrix(p)
    return torch.einsum("kn,bcinjm,lm->bcikjl", c, x.reshape(b, ch, h // p, p, w // p, p), c).reshape(x.shape)


def _idct2(u, p):
    b, ch, h, w = u.shape
    c = _dct_matrix(p)
    return torch.einsum("kn,bcikjl,lm->bcinjm", c, u.reshape(b, ch, h // p, p, w // p, p), c).reshape(u.shape)


def _alpha_t(t, p, image_size, prob_length, blur_sigma_max, min_scale=0.001):
    """get_alpha_t: the blur factor of every DCT coefficient, tiled over the image."""
    t = 0.5 * (1 + math.erf((math.log(t) - (-1.2)) / 1.2 / math.sqrt(2))) / prob_length
    blur_t = (blur_sigma_max * math.sin(t * math.pi / 2) ** 2) ** 2 / 2
    freqs = math.pi * torch.linspace(0, p - 1, p, dtype=F64) / p
    f2 = freqs[:, None] ** 2 + freqs[None, :] ** 2
    return (torch.exp(-f2.repeat(image_size // p, image_size // p) * blur_t) * (1 - min_scale) + min_scale)


def _net(net, x, t, labels, cfg_scale):
    sig = torch.full((x.shape[0],), float(t), dtype=F64)
    if cfg_scale > 1:
        return cfg_scale * net(x, sig, labels) - (cfg_scale - 1) * net(x, sig, torch.zeros_like(labels))
    return net(x, sig, labels)


def _authors_blur_sampler(net, up, labels, seed, init_seed, *, num_steps, sigma_min, sigma_max, rho,
                          truncation_sigma, truncation_t, up_scale, cfg_scale, s_block, s_noise, blur_sigma_max,
                          S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0):
    def noise(like, sd):        # randn_like(x) + s_block * block_noise(...)
        return mixed_noise(like, alpha=0.0, seed=sd) + s_block * block_noise(like, up_scale, seed=sd)

    t_steps = _karras(num_steps, sigma_min, sigma_max, rho)
    k = 0
    while t_steps[k] >= truncation_sigma:
        k += 1
    t_steps = t_steps[k:]
    num_steps = len(t_steps)
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    size = up.shape[-1]
    x_next, x_cur = up.to(F64), None
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1].tolist(), t_steps[1:].tolist())):
        x_cur = x_next + noise(x_next, init_seed) * t_cur if x_cur is None else x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * mixed_noise(
            x_cur, alpha=0.0, seed=derive_seed(seed, i, 2))
        denoised = _net(net, x_hat, t_hat, labels, cfg_scale)
        if i == num_steps - 1:
            return denoised
        a_next = _alpha_t(t_next, up_scale, size, truncation_t, blur_sigma_max)
        a_cur = _alpha_t(t_hat, up_scale, size, truncation_t, blur_sigma_max)
        u_cur = _dct2(x_cur, up_scale)
        d_cur = (u_cur - _dct2(denoised, up_scale)) / t_hat
        g = (1 - s_noise ** 2) ** 0.5 * t_next / t_hat
        x_next = _idct2((a_next + g - g * a_cur) * u_cur + t_hat * (g * a_cur - a_next) * d_cur, up_scale) \
            + s_noise * t_next * noise(x_next, derive_seed(seed, i))
        denoised = _net(net, x_next, t_next, labels, cfg_scale)
        d_prime = (_dct2(x_next, up_scale) - _dct2(denoised, up_scale)) / t_next
        x_next = _idct2((a_next + g - g * a_cur) * u_cur + t_hat * (g * a_cur - a_next) * (d_cur + d_prime) / 2,
                        up_scale) + s_noise * t_next * noise(x_next, derive_seed(seed, i, 1))
    return x_next


def _authors_edm_sampler(net, latents, labels, seed, *, num_steps, sigma_min, sigma_max, rho,
                         S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, sde_scale=None):
    def randn(like, *path):
        return mixed_noise(like, alpha=0.0, seed=derive_seed(seed, *path))

    t_steps = torch.cat([_karras(num_steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=F64)])
    x_next = latents.to(F64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1].tolist(), t_steps[1:].tolist())):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * randn(x_cur, i)
        denoised = _net(net, x_hat, t_hat, labels, 1)
        d_cur = (x_hat - denoised) / t_hat
        if sde_scale is not None:        # generate_celebahq.py: "adding SDE"
            g_t = sde_scale * t_next
            a_t = ((t_next ** 2 - g_t ** 2) / t_hat ** 2) ** 0.5
            x_next = x_hat + (a_t - 1) * t_hat * d_cur + g_t * randn(x_next, i, 1)
            if i < num_steps - 1:
                d_prime = (x_next - _net(net, x_next, t_next, labels, 1)) / t_next
                x_next = x_hat + (a_t - 1) * t_hat * (0.5 * d_cur + 0.5 * d_prime) + g_t * randn(x_next, i, 2)
        else:                            # generate_imagenet.py
            x_next = x_hat + (t_next - t_hat) * d_cur
            if i < num_steps - 1:
                d_prime = (x_next - _net(net, x_next, t_next, labels, 1)) / t_next
                x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


# their scripts' click defaults (second stage) and the released relay checkpoints' RelayConfig
AUTHORS = {
    "authors-imagenet256": dict(
        config=RelayConfig.imagenet256(normalize_noise=False), label_dim=5,
        first=dict(num_steps=256, sigma_min=0.002, sigma_max=80, rho=7, S_churn=40, S_min=0.05, S_max=50,
                   S_noise=1.003),
        second=dict(num_steps=200, sigma_min=0.008, sigma_max=80, rho=100, truncation_sigma=0.9,
                    truncation_t=0.93, up_scale=4, cfg_scale=3.5, s_block=0.15, s_noise=0.2, blur_sigma_max=3)),
    "authors-celebahq256": dict(
        config=RelayConfig.celebahq256(normalize_noise=False), label_dim=0,
        first=dict(num_steps=120, sigma_min=0.002, sigma_max=80, rho=7, sde_scale=0.05),
        second=dict(num_steps=150, sigma_min=0.008, sigma_max=80, rho=7, truncation_sigma=0.95,
                    truncation_t=1.05, up_scale=4, cfg_scale=1, s_block=0.15, s_noise=0.2, blur_sigma_max=2.0)),
}


def _labels(label_dim, n=2):
    return None if label_dim == 0 else torch.eye(label_dim, dtype=F64)[torch.tensor([1, 3])[:n] % label_dim]


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_authors_relay_matches_their_blur_sampler(name):
    a, preset = AUTHORS[name], PRESETS[name].relay
    labels = _labels(a["label_dim"])
    low = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * 1.6 - 0.8
    sigmas = preset.sigmas()
    x = relay_init(low, float(sigmas[0]), a["config"], seed=11)
    ours = sample_relay(cfg(Toy(16, a["label_dim"]), preset.cfg), x, sigmas, a["config"], class_labels=labels,
                        seed=5, disable=True, **preset.sampler_kwargs())
    up = low.repeat_interleave(4, -2).repeat_interleave(4, -1)    # F.interpolate(images, 256): nearest
    theirs = _authors_blur_sampler(Toy(16, a["label_dim"]), up, labels, 5, 11, **a["second"])
    assert ours.dtype == F64 and ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def test_relay_churn_matches_their_celebahq_code():
    """The churn branch of their CelebA-HQ blur_sampler (off in their script) with S_churn on."""
    a = AUTHORS["authors-celebahq256"]
    preset = dataclasses.replace(PRESETS["authors-celebahq256"].relay, steps=40, churn=30.0, churn_min=0.05,
                                 churn_max=0.5, churn_noise=1.007)
    low = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64) - 0.5
    sigmas = preset.sigmas()
    x = relay_init(low, float(sigmas[0]), a["config"], seed=2)
    ours = sample_relay(Toy(16), x, sigmas, a["config"], seed=9, disable=True, **preset.sampler_kwargs())
    theirs = _authors_blur_sampler(Toy(16), low.repeat_interleave(4, -2).repeat_interleave(4, -1), None, 9, 2,
                                   **{**a["second"], "num_steps": 40}, S_churn=30.0, S_min=0.05, S_max=0.5,
                                   S_noise=1.007)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    plain = sample_relay(Toy(16), x, sigmas, a["config"], seed=9, disable=True,
                         **dataclasses.replace(preset, churn=0.0).sampler_kwargs())
    assert (plain - ours).abs().max() > 1e-3       # the churn is not a no-op


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_authors_stage1_matches_their_edm_sampler(name):
    a, st = AUTHORS[name], PRESETS[name].stage1
    labels = _labels(a["label_dim"])
    latents = mixed_noise(torch.empty(2, 3, 4, 4, dtype=F64), alpha=0.0, seed=123)
    ours = sample_edm(Toy(4, a["label_dim"]), latents * float(st.sigmas()[0]), st.sigmas(), class_labels=labels,
                      seed=7, disable=True, **st.sampler_kwargs())
    theirs = _authors_edm_sampler(Toy(4, a["label_dim"]), latents, labels, 7, **a["first"])
    assert ours.abs().max() > 0.01          # not collapsed to 0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


@pytest.fixture
def float64_default():
    """Float64 as torch's default dtype: the pipeline makes its stage-1 latent with it, so its
    whole path (latent, stage 1, relay stage) then runs in float64, comparable to round-off."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_authors_pipeline_is_their_generate_loop(name, float64_default):
    """``RelayPipeline.sample`` with an ``authors-*`` preset (shorter grids) against the main loop
    of their generate script composed from the transcriptions above: per seed s, the class
    ``s % label_dim`` (no class_labels given), the stage-1 sampler from the latent, the
    unclamped stage-1 images upsampled by ``F.interpolate`` (nearest) to the relay size, the
    blur sampler; the pipeline's images are those clamped to [-1, 1] (their save clips)."""
    from relaydiff.config import NoiseConfig
    from relaydiff.pipeline import _BASE, _INIT, _LATENT, _RELAY
    a, ld = AUTHORS[name], AUTHORS[name]["label_dim"]
    steps = (40, 64)
    pipe = RelayPipeline(Toy(4, ld), Toy(16, ld), a["config"], sampler=PRESETS[name].with_steps(*steps))
    seeds = [10007, 3, 42]                  # ImageNet toy (5 classes): classes 2, 3, 2
    high, low = pipe.sample(seeds=seeds, batch_size=2, return_low=True, disable=True)
    assert high.dtype == F64 and high.shape == (3, 3, 16, 16) and low.shape == (3, 3, 4, 4)
    assert pipe.last_nfe["stage1"] == 2 * steps[0] - 1
    for k, s in enumerate(seeds):
        labels = None if ld == 0 else torch.eye(ld, dtype=F64)[[s % ld]]   # torch.eye(label_dim)[seeds % label_dim]
        latents = NoiseConfig().draw(torch.empty(1, 3, 4, 4, dtype=F64), seed=derive_seed(s, _LATENT))
        first = _authors_edm_sampler(Toy(4, ld), latents, labels, derive_seed(s, _BASE),
                                     **{**a["first"], "num_steps": steps[0]})
        up = F.interpolate(first, 16)       # their F.interpolate(images, 256)
        second = _authors_blur_sampler(Toy(16, ld), up, labels, derive_seed(s, _RELAY), derive_seed(s, _INIT),
                                       **{**a["second"], "num_steps": steps[1]})
        assert 0.01 < second.abs().max() and 0.01 < first.abs().max()
        torch.testing.assert_close(low[k:k + 1], first.clamp(-1, 1), rtol=0, atol=ATOL)
        torch.testing.assert_close(high[k:k + 1], second.clamp(-1, 1), rtol=0, atol=ATOL)


def test_authors_presets_label_images_seed_mod_label_dim():
    """The ``authors-*`` presets carry the authors' labels (``labels="seed-mod"``): with per-image
    seeds and no class_labels, the image of seed s has class s % label_dim, exactly as if those
    classes were passed; ``labels="random"`` draws other classes; with one batch seed (no
    per-image seeds) both modes draw the same random classes."""
    for name in ("authors-imagenet256", "authors-celebahq256"):
        assert PRESETS[name].labels == "seed-mod" and PRESETS[name].with_steps(3, 4).labels == "seed-mod"
    assert PRESETS["imagenet256"].labels == "random"
    with pytest.raises(ValueError, match="labels must be one of"):
        dataclasses.replace(PRESETS["default"], labels="seed")
    seeds = [10007, 3, 42, 8]
    preset = PRESETS["authors-imagenet256"].with_steps(6, 24)
    mod = RelayPipeline(Toy(4, 5), Toy(16, 5), RelayConfig.imagenet256(normalize_noise=False), sampler=preset)
    rnd = RelayPipeline(Toy(4, 5), Toy(16, 5), RelayConfig.imagenet256(normalize_noise=False),
                        sampler=dataclasses.replace(preset, labels="random"))
    got = mod.sample(seeds=seeds, batch_size=3, disable=True)
    assert torch.equal(got, mod.sample(seeds=seeds, class_labels=[s % 5 for s in seeds], batch_size=3,
                                       disable=True))
    assert torch.equal(got, rnd.sample(seeds=seeds, class_labels=[2, 3, 2, 3], batch_size=3, disable=True))
    assert not torch.equal(got, rnd.sample(seeds=seeds, batch_size=3, disable=True))
    low = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(mod.super_resolve(low, seeds=seeds, disable=True),
                       mod.super_resolve(low, [2, 3, 2, 3], seeds=seeds, disable=True))
    assert torch.equal(mod.sample(4, seed=5, disable=True), rnd.sample(4, seed=5, disable=True))


def _tie_inputs():
    """Float32 images holding, for every level k, the values next to the tie ``127.5 (x + 1) =
    k + 1/2`` (the nearest float32 and 2 neighbours on each side; among them those whose float32
    ``(x + 1) * 127.5`` is exactly ``k + 1/2``, relaydiff's ties), 0 (the one exact tie), the ends
    and values beyond them."""
    centre = ((np.arange(255) + 0.5) / 127.5 - 1).astype(np.float32)
    xs = [centre]
    for direction in (np.inf, -np.inf):
        near = centre[centre != 0]          # (0's neighbours are denormals: their float64 sum with 128 rounds)
        for _ in range(2):
            near = np.nextafter(near, np.float32(direction))
            xs.append(near)
    xs.append(np.array([0.0, 1.0, -1.0, 1.5, -1.5, 0.9999, -0.9999], np.float32))
    x = np.concatenate(xs)
    x = np.concatenate([x, np.zeros((-len(x)) % 36, np.float32)])
    return torch.from_numpy(x.reshape(-1, 3, 3, 4))


def _floor_oracle(x: torch.Tensor) -> np.ndarray:
    """``floor(127.5 x + 128)`` clipped to [0, 255], in exact rational arithmetic."""
    vals = [min(255, max(0, math.floor(Fraction(float(v)) * Fraction(255, 2) + 128))) for v in x.flatten().tolist()]
    return np.array(vals, np.uint8).reshape(x.shape).transpose(0, 2, 3, 1)


def test_authors_conversion_is_their_floor_on_ties():
    """Their save_samples: ``(x * 127.5 + 128).clip(0, 255).to(torch.uint8)``. On the ties of
    relaydiff's own conversion (round half to even) they round up; elsewhere both agree."""
    x = _tie_inputs()
    t32 = ((x + 1) * 127.5).flatten()
    ties = (t32 - t32.floor() == 0.5) & (t32 < 255)
    assert int(ties.sum()) >= 200                        # most levels have a float32 tie
    theirs = _floor_oracle(x)
    got = authors_to_uint8(x)
    assert got.dtype == np.uint8 and got.shape == theirs.shape and np.array_equal(got, theirs)
    ours = to_uint8(x)
    flat_diff = (ours != theirs).transpose(0, 3, 1, 2).flatten()
    # they differ only where relaydiff's float32 value is a tie k + 1/2 (half to even; the exact value
    # may lie on either side of it), by one level
    assert np.abs(ours.astype(int) - theirs).max() == 1 and bool(flat_diff[~ties.numpy()].sum() == 0)
    assert int(flat_diff.sum()) >= 100
    # the one exact tie (x = 0: 127.5 -> 128) and the ends
    assert authors_to_uint8(torch.tensor([0.0, 1.0, -1.0, 1.5, -1.5]).reshape(1, 1, 1, 5)).flatten().tolist() \
        == [128, 255, 0, 255, 0]
    # float64 images (theirs are): the same float64 operations as their code, here numpy's
    # (at x = (m - 128) / 127.5 their value is m exactly, or just under it after float64 rounding)
    x64 = torch.from_numpy(np.concatenate([(np.arange(-6, 294) - 128) / 127.5,
                                           (np.arange(-300, 0) + 0.5) / 255]).reshape(2, 3, 10, 10))
    want = np.clip(x64.numpy() * 127.5 + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(authors_to_uint8(x64), want)
    # the post-processing: conversion, then img_enhance; the CLI's --post the same
    from argparse import Namespace

    from relaydiff.cli.sample import post_process
    for name in ("authors-enhance-imagenet256", "authors-enhance-celebahq256"):
        want = authors_enhance(theirs, name)
        assert np.array_equal(authors_postprocess(x, name), want)
        post = post_process(Namespace(post="authors-enhance", preset=name.replace("-enhance", "")))
        assert np.array_equal(post(x), want) and np.array_equal(post(theirs), want)
    plain = post_process(Namespace(post=None, preset="authors-imagenet256"))
    assert np.array_equal(plain(x), ours) and plain(theirs) is theirs
    with pytest.raises(ValueError, match="unknown post-processing"):
        authors_postprocess(x, "enhance")
    with pytest.raises(ValueError, match="C = 1 or 3"):
        authors_to_uint8(x[:, :2])


def test_cli_post_writes_their_save_samples(tmp_path, monkeypatch, capsys):
    """``relaydiff sample --post authors-enhance`` writes what their save_samples writes for the
    same float images (tie values included): their conversion, then img_enhance; without
    ``--post``, relaydiff's own conversion."""
    from relaydiff.cli import main

    flat = _tie_inputs().flatten()
    high = torch.cat([flat, torch.zeros(2 * 3 * 16 * 16 - flat.numel())]).reshape(2, 3, 16, 16)

    def fake_from_checkpoints(stage1, *stage2, sampler, **kwargs):
        pipe = RelayPipeline(Toy(4, 0), Toy(16, 0), RelayConfig.celebahq256(normalize_noise=False), sampler=sampler)
        pipe.iter_sample = lambda *a, **kw: iter([(0, high, torch.zeros(2, 3, 4, 4))])
        return pipe

    monkeypatch.setattr(RelayPipeline, "from_checkpoints", staticmethod(fake_from_checkpoints))
    (tmp_path / "a").write_text("x")
    common = ["sample", "--stage1", str(tmp_path / "a"), "--stage2", str(tmp_path / "a"), "--seeds", "0-1",
              "--preset", "authors-imagenet256", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "post"), "--post", "authors-enhance"]) == 0, capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0, capsys.readouterr().err
    theirs = authors_enhance(_floor_oracle(high), "authors-enhance-imagenet256")
    for k in range(2):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "post" / f"00000{k}.png")), theirs[k])
        assert np.array_equal(np.asarray(Image.open(tmp_path / "plain" / f"00000{k}.png")), to_uint8(high)[k])
    assert not np.array_equal(authors_enhance(to_uint8(high), "authors-enhance-imagenet256"), theirs)


def test_authors_enhance_matches_the_pil_formulas():
    """Their img_enhance against its closed form: brightness scales, contrast pulls towards the
    mean grey level, colour blends with the grey image, each stage truncated to integers. PIL's
    fixed-point arithmetic differs from this float form by at most one level."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    x = img.astype(float)
    out = authors_enhance(img, "authors-enhance-imagenet256").astype(float)
    assert np.abs(out - np.floor(np.clip(x * 1.06, 0, 255))).max() <= 1

    def grey(v):                                  # ITU-R 601-2 luma, PIL's "L"
        return np.floor((v @ np.array([299, 587, 114]) + 500) / 1000)
    mean = np.array([np.floor(grey(v).mean() + 0.5) for v in x])[:, None, None, None]
    y = np.floor(np.clip(mean + 0.9 * (x - mean), 0, 255))
    y = np.floor(np.clip(y * 1.05, 0, 255))
    y = np.floor(np.clip(grey(y)[..., None] + 0.99 * (y - grey(y)[..., None]), 0, 255))
    got = authors_enhance(img, "authors-enhance-celebahq256").astype(float)
    assert np.abs(got - y).max() <= 1 and np.abs(got - x).max() > 10
    assert authors_enhance(img[..., :1], "authors-enhance-imagenet256").shape == (3, 8, 8, 1)
    with pytest.raises(ValueError, match="unknown post-processing"):
        authors_enhance(img, "enhance")


# ------------------------------------------------------------ per-image seeds

def _pipeline(preset="authors-celebahq256", label_dim=3):
    preset = PRESETS[preset].with_steps(8, 24)
    # per-sample state changes (relay churn on) exercise every noise source of both stages
    preset = dataclasses.replace(preset, relay=dataclasses.replace(preset.relay, churn=10.0))
    return RelayPipeline(Toy(4, label_dim), Toy(16, label_dim), RelayConfig.celebahq256(normalize_noise=False),
                         sampler=preset)


@pytest.mark.parametrize("preset", ["authors-celebahq256", "authors-imagenet256"])
def test_per_image_seeds_do_not_depend_on_the_batch(preset):
    pipe = _pipeline(preset)
    seeds = [5, 9, 2, 7, 11, 3, 8, 1]
    ref, ref_low = pipe.sample(seeds=seeds, batch_size=8, return_low=True, disable=True)
    for bs in (1, 3):
        assert torch.equal(pipe.sample(seeds=seeds, batch_size=bs, disable=True), ref)
    # another order and a subset: each image follows its seed
    sub = [3, 9, 1]
    got = pipe.sample(len(sub), seeds=sub, batch_size=2, disable=True)
    assert torch.equal(got, ref[[seeds.index(s) for s in sub]])
    assert len({float(v) for v in ref.flatten(1).sum(1)}) == 8        # distinct seeds, distinct images
    # super-resolution: one seed per input image, also batch independent
    up = pipe.super_resolve(ref_low, seeds=seeds, batch_size=8, disable=True)
    assert torch.equal(pipe.super_resolve(ref_low[[2, 0]], seeds=[2, 5], batch_size=1, disable=True), up[[2, 0]])


def test_seeds_argument_errors():
    pipe = _pipeline()
    with pytest.raises(ValueError, match="not both"):
        pipe.sample(seeds=[1, 2], seed=3, disable=True)
    with pytest.raises(ValueError, match="3 images, 2 seeds"):
        pipe.sample(3, seeds=[1, 2], disable=True)
    with pytest.raises(ValueError, match="non-empty sequence"):
        pipe.sample(seeds=[], disable=True)
    with pytest.raises(ValueError, match="seed must be None or an integer"):
        pipe.sample(seeds=[1, -2], disable=True)


def test_stage1_grid_within_the_models_sigma_range():
    """A stage 1 with sigma_min/sigma_max attributes (VP, VE, iDDPM) gets EDM's clamped grid."""
    pipe = _pipeline()
    seen = []
    base = pipe.stage1
    base.sigma_min, base.sigma_max = 0.01, 20.0
    orig = base.forward
    base.forward = lambda x, sigma, labels=None: (seen.append(float(sigma[0])), orig(x, sigma, labels))[1]
    pipe.sample(seeds=[0], disable=True)
    assert seen[0] == pytest.approx(20.0) and min(seen) == pytest.approx(0.01)


def test_cli_authors_switches(tmp_path, monkeypatch, capsys):
    """``--seeds``, ``--post``, ``--sde-scale``, ``--relay-churn``, ``--no-heun-last-level`` and
    ``--fresh-correction-noise`` reach the pipeline (the checkpoints are replaced by toy stages)."""
    from relaydiff.cli import main

    made = {}

    def fake_from_checkpoints(stage1, *stage2, sampler, **kwargs):
        made["preset"] = sampler
        made["pipe"] = RelayPipeline(Toy(4, 0), Toy(16, 0), RelayConfig.celebahq256(normalize_noise=False),
                                     sampler=sampler)
        return made["pipe"]

    monkeypatch.setattr(RelayPipeline, "from_checkpoints", staticmethod(fake_from_checkpoints))
    (tmp_path / "a").write_text("x")
    out = tmp_path / "out"
    rc = main(["sample", "--stage1", str(tmp_path / "a"), "--stage2", str(tmp_path / "a"), "--out", str(out),
               "--seeds", "4,1-2", "--batch", "2", "--steps", "6,20", "--preset", "authors-celebahq256",
               "--sde-scale", "0.1", "--relay-churn", "5,0.1,inf,1.01", "--no-heun-last-level",
               "--no-fresh-correction-noise", "--post", "authors-enhance", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    pr = made["preset"]
    assert pr.stage1.sde_scale == 0.1 and not pr.relay.heun_last_level and not pr.relay.fresh_correction_noise
    assert (pr.relay.churn, pr.relay.churn_min, pr.relay.churn_max, pr.relay.churn_noise) == (5, 0.1, math.inf, 1.01)
    want = made["pipe"].sample(seeds=[1], steps=(6, 20), disable=True)
    want = authors_enhance(_floor_oracle(want), "authors-enhance-celebahq256")[0]   # their save_samples
    assert np.array_equal(np.asarray(Image.open(out / "000001.png")), want)
    assert sorted(p.name for p in out.iterdir()) == ["000001.png", "000002.png", "000004.png",
                                                     "relaydiff-sample.json"]
    for argv, needle in ((["--seeds", "3-1"], "--seeds must be"), (["--seeds", "1,1"], "names a seed twice"),
                         (["--seeds", "1", "--n", "2"], "replaces --seed and --n"),
                         (["--relay-churn", "1,2"], "--relay-churn must be"),
                         (["--post", "authors-enhance", "--preset", "default"], "--post authors-enhance needs")):
        rc = main(["sample", "--stage1", str(tmp_path / "a"), "--stage2", str(tmp_path / "a"),
                   "--out", str(tmp_path / "o2"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0], err


# ------------------------------------------------------------ the authors' class labels

def test_authors_class_labels_are_seed_mod_label_dim():
    """Their generate scripts: ``torch.eye(label_dim)[batch_seeds % label_dim]`` (one-hot rows)."""
    from relaydiff.sampling import authors_class_labels
    seeds = [10000, 10001, 10999, 11000, 59999, 3, 1234567]
    theirs = torch.eye(1000)[torch.as_tensor(seeds) % 1000]
    ours = authors_class_labels(seeds, 1000)
    assert ours.dtype == torch.int64 and ours.tolist() == [0, 1, 999, 0, 999, 3, 567]
    assert torch.equal(torch.nn.functional.one_hot(ours, 1000).float(), theirs)
    assert torch.equal(authors_class_labels(torch.tensor(seeds), 7), torch.as_tensor(seeds) % 7)
    # their 50 000 ImageNet seeds: the class-balanced set, 50 images per class
    assert torch.equal(torch.bincount(authors_class_labels(range(10000, 60000), 1000)), torch.full((1000,), 50))
    for bad_dim in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="label_dim must be a positive integer"):
            authors_class_labels(seeds, bad_dim)
    with pytest.raises(ValueError, match="per-image integer seeds"):
        authors_class_labels([1, None], 10)
    with pytest.raises(ValueError, match="seed must be None or an integer"):
        authors_class_labels([1, -1], 10)


def _fake_upscale_pipeline(monkeypatch, label_dim):
    """``RelayPipeline.from_checkpoints`` replaced by a relay-only pipeline of toy stages (4 -> 16px)."""
    made = {}

    def fake(stage1, *stage2, sampler, **kwargs):
        assert stage1 is None
        made["pipe"] = RelayPipeline(None, Toy(16, label_dim), RelayConfig.celebahq256(normalize_noise=False),
                                     sampler=sampler, low_shape=(3, 4, 4), label_dim=label_dim)
        return made["pipe"]

    monkeypatch.setattr(RelayPipeline, "from_checkpoints", staticmethod(fake))
    return made


def _u8_to_float(path):
    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).double()[None] / 127.5 - 1


def test_cli_upscale_class_seed_mod(tmp_path, monkeypatch, capsys):
    """``upscale --seeds LIST --class seed-mod``: the image of seed s is made with class s % label_dim
    (their second-stage-only run), per image; without --class the same (the authors-* preset's
    labels); ``--class random``: random classes from the seeds."""
    from relaydiff.cli import main

    made = _fake_upscale_pipeline(monkeypatch, label_dim=5)
    src = tmp_path / "in"
    src.mkdir()
    g = np.random.default_rng(3)
    for name in ("a", "b", "c"):
        Image.fromarray(g.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(src / f"{name}.png")
    (tmp_path / "relay").write_text("x")
    seeds = [12, 7, 9]
    common = ["upscale", "--stage2", str(tmp_path / "relay"), "--in", str(src), "--steps", "12",
              "--preset", "authors-celebahq256", "--seeds", "12,7,9", "--batch", "2", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "mod"), "--class", "seed-mod"]) == 0, capsys.readouterr().err
    pipe = made["pipe"]
    assert main([*common, "--out", str(tmp_path / "preset")]) == 0, capsys.readouterr().err
    assert made["pipe"].preset.labels == "seed-mod"
    assert main([*common, "--out", str(tmp_path / "rand"), "--class", "random"]) == 0, capsys.readouterr().err
    assert made["pipe"].preset.labels == "random"
    for k, name in enumerate("abc"):
        low = _u8_to_float(src / f"{name}.png")
        want = pipe.super_resolve(low, [seeds[k] % 5], seeds=[seeds[k]], steps=12, disable=True)
        for run in ("mod", "preset"):
            got = np.array(Image.open(tmp_path / run / f"{name}.png"))
            assert np.array_equal(got, to_uint8(want)[0])
    # classes 2, 2, 4 against the random classes drawn from the seeds: other images
    assert any(not np.array_equal(np.array(Image.open(tmp_path / "mod" / f"{n}.png")),
                                  np.array(Image.open(tmp_path / "rand" / f"{n}.png"))) for n in "abc")
    rc = main([*common[:-5], "--quiet", "--out", str(tmp_path / "o2"), "--class", "seed-mod"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--class seed-mod" in err[0] and "needs --seeds" in err[0], err
    assert not (tmp_path / "o2").exists()
    _fake_upscale_pipeline(monkeypatch, label_dim=0)
    for mode in ("seed-mod", "random"):
        rc = main([*common, "--out", str(tmp_path / "o3"), "--class", mode])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "unconditional" in err[0], err
        assert not (tmp_path / "o3").exists()


def test_cli_upscale_post_writes_their_save_samples(tmp_path, monkeypatch, capsys):
    """``relaydiff upscale --post authors-enhance``: the same as ``sample --post`` (their
    floor conversion of the float output, tie values included, then img_enhance)."""
    from relaydiff.cli import main

    flat = _tie_inputs().flatten()
    high = torch.cat([flat, torch.zeros(2 * 3 * 16 * 16 - flat.numel())]).reshape(2, 3, 16, 16)
    made = _fake_upscale_pipeline(monkeypatch, label_dim=0)
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.full((4, 4, 3), 100, np.uint8)).save(src / f"{name}.png")
    (tmp_path / "relay").write_text("x")
    real = RelayPipeline.super_resolve
    monkeypatch.setattr(RelayPipeline, "super_resolve", lambda self, *a, **kw: high.clone())
    common = ["upscale", "--stage2", str(tmp_path / "relay"), "--in", str(src), "--preset", "authors-imagenet256",
              "--quiet"]
    assert main([*common, "--out", str(tmp_path / "post"), "--post", "authors-enhance"]) == 0, capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0, capsys.readouterr().err
    assert made["pipe"] is not None and RelayPipeline.super_resolve is not real
    theirs = authors_enhance(_floor_oracle(high), "authors-enhance-imagenet256")
    for k, name in enumerate("ab"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "post" / f"{name}.png")), theirs[k])
        assert np.array_equal(np.asarray(Image.open(tmp_path / "plain" / f"{name}.png")), to_uint8(high)[k])


# ------------------------------------------------------------ iDDPM: EDM rounds every level

class _EpsNet(torch.nn.Module):
    """A parameter-free network with EDM's signature and iDDPM's 2C outputs: the first C channels
    predict the noise of per-pixel Gaussian data with variance 0.04 at the level its ``c_noise``
    names in the table ``u``, plus a nonlinear spatial term; the other C are unused."""
    img_resolution, in_channels, out_channels, label_dim = 4, 3, 6, 0

    def __init__(self, u):
        super().__init__()
        self.u = u.to(F64)

    def forward(self, x_in, c_noise, class_labels=None):
        s = self.u[(len(self.u) - 2 - c_noise).round().long()].to(x_in.dtype)[:, None, None, None]
        eps = s * (s * s + 1).sqrt() / (0.04 + s * s) * x_in
        f = eps + 0.05 * torch.tanh(x_in.roll(1, -1) - x_in.roll(1, -2)) / (1 + s)
        return torch.cat([f, torch.zeros_like(f)], 1)


def _iddpm():
    from relaydiff.models.precond import iDDPMPrecond, iddpm_levels
    return iDDPMPrecond(_EpsNet(iddpm_levels(dtype=torch.float32)))


def _edm_reference(net, latents, churn_seed, *, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                   S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, rounding=True):
    """EDM's generate.py edm_sampler, literally (float64 state; the net sees ``latents.dtype``)."""
    rnd = net.round_sigma if rounding else torch.as_tensor
    sigma_min, sigma_max = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    t_steps = torch.cat([rnd(_karras(num_steps, sigma_min, sigma_max, rho)), torch.zeros(1, dtype=F64)])
    x_next = latents * t_steps[0]
    dtype, x_next = x_next.dtype, x_next.to(F64)

    def d(x, t):
        return net(x.to(dtype), torch.full((x.shape[0],), float(t), dtype=dtype)).to(F64)

    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = rnd(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * mixed_noise(
            x_cur, alpha=0.0, seed=derive_seed(churn_seed, i))
        d_cur = (x_hat - d(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - d(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


# EDM's ImageNet-64 ADM (iDDPM) settings, churn 40 in [0.05, 50], S_noise 1.003, on 96 instead
# of 256 steps (fast; 96 levels rounded to u still repeat 5 of them)
ADM = dict(num_steps=96, S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003)


def test_sample_edm_rounds_iddpm_levels_like_edm():
    from relaydiff.sampling import edm_grid
    net = _iddpm()
    sigmas = torch.cat([_karras(96, net.sigma_min, 80.0, 7.0), torch.zeros(1, dtype=F64)])
    grid = edm_grid(net, sigmas)
    # snapped to the table: the top is u's level nearest 80, and the dense ends repeat levels
    assert float(grid[0]) == float(net.u[(net.u.double() - 80).abs().argmin()]) != 80.0
    assert bool(torch.isin(grid[:-1], net.u.double()).all()) and grid[:-1].unique().numel() < 96
    latents = mixed_noise(torch.empty(2, 3, 4, 4, dtype=F64), alpha=0.0, seed=321)
    ours, nfe = sample_edm(net, latents * float(grid[0]), sigmas, seed=9, s_churn=40.0, s_min=0.05, s_max=50.0,
                           s_noise=1.003, disable=True, return_nfe=True)
    theirs = _edm_reference(net, latents, 9, **ADM)
    assert nfe == 2 * 96 - 1 and 0.05 < ours.abs().max() < 2
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    # the rounding matters: without it (relaydiff before) the images differ
    plain = sample_edm(net, latents * 80.0, sigmas, seed=9, s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003,
                       round_sigma=False, disable=True)
    assert (plain - theirs).abs().max() > 1e-3
    torch.testing.assert_close(plain, _edm_reference(net, latents, 9, **ADM, rounding=False), rtol=0, atol=ATOL)
    # an EDMPrecond-like denoiser (round_sigma the identity) samples as before, bit for bit
    toy, short = Toy(4), sigmas[::4]
    toy.round_sigma = torch.as_tensor
    a = sample_edm(toy, latents * 80.0, short, seed=9, s_churn=40.0, s_min=0.05, s_max=50.0, disable=True)
    assert torch.equal(a, sample_edm(Toy(4), latents * 80.0, short, seed=9, s_churn=40.0, s_min=0.05,
                                     s_max=50.0, disable=True))
    with pytest.raises(ValueError, match="takes the level .* to 0"):
        edm_grid(net, torch.tensor([1.0, 0.002, 0.0], dtype=F64))   # below u's lowest level: rounds to u_M = 0


def test_pipeline_stage1_rounds_iddpm_levels_like_edm():
    """RelayPipeline's stage 1 with an iDDPM model: EDM's sampler with the grid clamped to the
    model's range and rounded, the latent scaled by the rounded top level."""
    from relaydiff.config import NoiseConfig
    from relaydiff.pipeline import _BASE, _LATENT
    from relaydiff.sampling import EDMSampling, SamplerPreset
    net = _iddpm()
    preset = SamplerPreset(EDMSampling(steps=96, s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003),
                           dataclasses.replace(PRESETS["authors-celebahq256"].relay, steps=12))
    pipe = RelayPipeline(net, Toy(16), RelayConfig.celebahq256(normalize_noise=False), sampler=preset)
    seeds = [4, 17]
    _, low = pipe.sample(seeds=seeds, batch_size=2, return_low=True, disable=True)
    for k, s in enumerate(seeds):
        latents = NoiseConfig().draw(torch.empty(1, 3, 4, 4), seed=derive_seed(s, _LATENT))
        theirs = _edm_reference(net, latents, derive_seed(s, _BASE), **ADM)
        assert theirs.abs().max() < 1                                   # the clamp to [-1, 1] is a no-op
        torch.testing.assert_close(low[k:k + 1].double(), theirs, rtol=0, atol=1e-5)
        unrounded = _edm_reference(net, latents, derive_seed(s, _BASE), **ADM, rounding=False)
        assert (unrounded - theirs).abs().max() > 1e-3
