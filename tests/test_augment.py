"""Geometric augmentation (relaydiff/training/augment.py) and its use in training."""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from relaydiff.diffusion import EDMLoss, RelayLoss
from relaydiff.config import RelayConfig
from relaydiff.models import load_model
from relaydiff.training import ConfigError, TrainConfig, train
from relaydiff.training.augment import AUGMENT_DIM, GeometricAugment

from test_training import images, tiny_cfg  # noqa: F401  (the fixture and the config helper)


def _smooth(h, w, dtype=torch.float64):
    """A low-frequency analytic image f(x, y) on centred pixel coordinates, and f itself."""
    def f(x, y):   # at most ~0.009 cycles per pixel
        return np.cos(2 * np.pi * (0.0078 * x + 0.0043 * y)) + 0.5 * np.sin(2 * np.pi * (0.0028 * x - 0.0058 * y))
    yy, xx = np.mgrid[0:h, 0:w]
    img = f(xx + 0.5 - w / 2, yy + 0.5 - h / 2)
    return torch.tensor(img, dtype=dtype)[None, None].repeat(1, 2, 1, 1), f


def _warp(img, log_s=0.0, theta=0.0, log_a=0.0, phi=0.0, tx=0.0, ty=0.0):
    h, w = img.shape[-2:]
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    grid = GeometricAugment._grid(t(log_s), t(theta), t(log_a), t(phi), t(tx), t(ty), h, w, img.dtype)
    return torch.nn.functional.grid_sample(img, grid, mode="bicubic", padding_mode="reflection",
                                           align_corners=False)


def _forward_map(log_s, theta, log_a, phi, tx, ty, w, h):
    """q = T R(theta) A S p on centred pixels (x right, y down), written independently with
    numpy: S scales by 2^log_s, A stretches by 2^log_a along direction phi, R rotates
    counter-clockwise as seen on screen, T shifts by (tx w, ty h)."""
    s, a = 2.0 ** log_s, 2.0 ** log_a
    S = np.eye(2) * s
    d = np.array([np.cos(phi), np.sin(phi)])
    n = np.array([-np.sin(phi), np.cos(phi)])
    A = a * np.outer(d, d) + (1 / a) * np.outer(n, n)
    # counter-clockwise on screen with y down: the math rotation by -theta in (x, y_down)
    R = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    return R @ A @ S, np.array([tx * w, ty * h])


@pytest.mark.parametrize("params", [
    dict(theta=0.7), dict(log_s=0.3), dict(log_s=-0.25), dict(log_a=0.3, phi=0.4),
    dict(tx=0.1, ty=-0.05), dict(log_s=0.2, theta=-2.0, log_a=-0.2, phi=1.1, tx=0.03, ty=0.07)])
def test_warp_matches_the_analytic_map(params):
    """Interior pixels of the warped analytic image equal f(F^-1(q)) to bicubic accuracy."""
    h, w = 48, 64
    img, f = _smooth(h, w)
    out = _warp(img, **params)[0, 0].numpy()
    lin, shift = _forward_map(**{**dict(log_s=0.0, theta=0.0, log_a=0.0, phi=0.0, tx=0.0, ty=0.0), **params},
                              w=w, h=h)
    inv = np.linalg.inv(lin)
    yy, xx = np.mgrid[0:h, 0:w]
    q = np.stack([xx + 0.5 - w / 2, yy + 0.5 - h / 2], -1) - shift
    p = q @ inv.T
    want = f(p[..., 0], p[..., 1])
    # pixels whose source lies well inside the image (no border reflection involved)
    inside = (np.abs(p[..., 0]) < w / 2 - 3) & (np.abs(p[..., 1]) < h / 2 - 3)
    assert inside.sum() > 0.3 * h * w
    # torch's bicubic kernel (a = -0.75) is only first-order accurate: its error grows with the
    # frequency: <= 4.05e-3 measured here for every case below (and for plain quarter-pixel
    # shifts). Moving the oracle's map by 0.1 pixel raises that to 7.8e-3 - 1.0e-2 (4.6e-3 for the
    # pure translation, which the exact whole-pixel test below pins down instead).
    assert np.abs(out - want)[inside].max() < 6e-3


def test_quarter_turn_and_whole_pixel_shift_are_exact_permutations():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 16, 16, generator=g, dtype=torch.float64)
    # counter-clockwise on screen = torch.rot90 over (H, W)
    torch.testing.assert_close(_warp(x, theta=math.pi / 2), torch.rot90(x, 1, (2, 3)), atol=1e-9, rtol=0)
    y = _warp(x, tx=3 / 16, ty=-2 / 16)       # 3 px right, 2 px up
    torch.testing.assert_close(y[..., :14, 3:], x[..., 2:, :13], atol=1e-9, rtol=0)


def test_off_returns_the_images_unchanged():
    x = torch.randn(5, 3, 8, 8)
    y, labels = GeometricAugment(0.0)(x)
    assert y is x and labels.shape == (5, AUGMENT_DIM) and not labels.any()


def test_flips_are_exact_and_labelled():
    x = torch.randn(4, 3, 8, 12)
    # every transform fires, but with zero spread: only the flips change the image
    aug = GeometricAugment(1.0, scale_std=0.0, rotate=False, aniso_std=0.0, translate_std=0.0)
    y, labels = aug(x)
    torch.testing.assert_close(y, x.flip(2).flip(3), atol=1e-5, rtol=0)
    assert torch.equal(labels[:, :2], torch.ones(4, 2)) and not labels[:, 2:].any()


def test_hit_rates_and_label_distributions():
    """Each transform fires with probability p, independently; its parameters follow the
    documented laws (z-tests with a Bonferroni bound over the checks)."""
    n, p = 20000, 0.3
    aug = GeometricAugment(p, generator=torch.Generator().manual_seed(1))
    _, lab = aug(torch.zeros(n, 1, 4, 4, dtype=torch.float64))
    z = NormalDist().inv_cdf(1 - 0.001 / 20)
    hits = {"xflip": lab[:, 0] != 0, "yflip": lab[:, 1] != 0, "scale": lab[:, 2] != 0,
            "rotate": lab[:, 4] != 0, "aniso": lab[:, 5:7].abs().sum(1) != 0, "translate": lab[:, 7:9].abs().sum(1) != 0}
    for name, h in hits.items():
        assert abs(h.double().mean() - p) < z * math.sqrt(p * (1 - p) / n), name
    # independence: xflip and scale fire together with probability p^2
    both = (hits["xflip"] & hits["scale"]).double().mean()
    assert abs(both - p * p) < z * math.sqrt(p * p * (1 - p * p) / n)
    # parameters: log2 s ~ N(0, 0.2^2); theta uniform (cos, sin on the unit circle, E[cos] = 0);
    # |log2 a| ~ half-normal(0.2); tx, ty ~ N(0, 0.125^2)
    s = lab[hits["scale"], 2]
    k = s.numel()
    assert abs(s.mean()) < z * 0.2 / math.sqrt(k)
    assert abs(s.std() / 0.2 - 1) < z * math.sqrt(1 / (2 * (k - 1)))
    c, sn = lab[hits["rotate"], 3] + 1, lab[hits["rotate"], 4]
    torch.testing.assert_close(c * c + sn * sn, torch.ones_like(c))
    assert abs(c.mean()) < z * math.sqrt(0.5 / c.numel())
    t = lab[hits["translate"], 7:9]
    assert (t.std(0) / 0.125 - 1).abs().max() < z * math.sqrt(1 / (2 * (t.shape[0] - 1)))
    a = lab[hits["aniso"], 5:7].norm(dim=1)
    assert abs(a.square().mean().sqrt() / 0.2 - 1) < 0.05


def test_reproducible_with_a_generator():
    x = torch.randn(8, 3, 16, 16)
    a = GeometricAugment(0.5, generator=torch.Generator().manual_seed(3))(x)
    b = GeometricAugment(0.5, generator=torch.Generator().manual_seed(3))(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_arguments():
    for p in (-0.1, 1.5, float("nan"), True, "0.2"):
        with pytest.raises(ValueError, match="probability"):
            GeometricAugment(p)
    with pytest.raises(ValueError, match="scale_std"):
        GeometricAugment(0.2, scale_std=-1)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        GeometricAugment(0.2)(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="augment must be callable"):
        EDMLoss(augment=0.2)


class _Recorder(torch.nn.Module):
    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        self.augment_labels = augment_labels
        return torch.zeros_like(x)


@pytest.mark.parametrize("loss_cls", [EDMLoss, lambda **kw: RelayLoss(RelayConfig(), **kw)])
def test_losses_train_on_the_augmented_image_and_pass_its_labels(loss_cls):
    x = torch.randn(3, 3, 16, 16)
    lab = torch.arange(27.0).reshape(3, 9)
    loss = loss_cls(augment=lambda im: (im.flip(3) * 0 + 1.0, lab))
    net = _Recorder()
    torch.manual_seed(0)
    out = loss(net, x)
    assert torch.equal(net.augment_labels, lab)
    # the denoiser returns 0, so the loss is lambda * target^2 with target = the augmented image (1)
    assert torch.allclose(out / out[:, :1, :1, :1], torch.ones_like(out))


def test_training_with_augmentation(tmp_path, images):  # noqa: F811
    run = train(tiny_cfg(images, tmp_path / "aug", steps=2, augment=0.5, stage="relay"))
    model, meta = load_model(run)
    assert meta["network"]["augment_dim"] == AUGMENT_DIM
    assert model.model.map_augment is not None
    # sampling-time calls pass no augment labels (= the all-zero label: no augmentation)
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(model(x, 1.0), model(x, 1.0, augment_labels=torch.zeros(1, AUGMENT_DIM)))
    # without augmentation the network has no augment input, as before
    run = train(tiny_cfg(images, tmp_path / "plain", steps=1))
    assert "augment_dim" not in load_model(run)[1]["network"]


def test_config_defaults_and_errors(images):  # noqa: F811
    assert TrainConfig(stage="relay", data="d", out="o", preset="celebahq256-relay", steps=1).resolved().augment == 0.2
    assert TrainConfig(stage="base", data="d", out="o", preset="imagenet64-base", steps=1).resolved().augment == 0.0
    for bad in (1.5, -0.2):
        with pytest.raises(ConfigError, match="augment"):
            tiny_cfg(images, "o", augment=bad).resolved()
