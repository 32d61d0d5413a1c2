"""relaydiff.metrics.kid: the Kernel Inception Distance (unbiased polynomial-kernel MMD^2).

Oracles: a pure-Python float64 double loop over the kernel's definition, clean-fid's
``kernel_distance`` transcribed in plain numpy, and the closed-form population MMD^2 of two
Gaussians under the cubic kernel (the estimator is unbiased, so its mean over independent
draws must match it, and be 0 for one distribution).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from relaydiff.metrics import kid, polynomial_mmd2


def _k(a, b) -> float:
    return (sum(u * v for u, v in zip(a, b)) / len(a) + 1.0) ** 3


def _mmd2_loop(x, y) -> float:
    """The unbiased MMD^2 from its definition, one kernel value at a time."""
    x, y = np.asarray(x, np.float64).tolist(), np.asarray(y, np.float64).tolist()
    m, n = len(x), len(y)
    xx = sum(_k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(_k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(_k(a, b) for a in x for b in y) / (m * n)
    return xx + yy - 2.0 * xy


def _clean_fid_kernel_distance(feats1, feats2, num_subsets=100, max_subset_size=1000, rng=None):
    """clean-fid's ``kernel_distance`` (equal subset size m for both sets), in plain numpy."""
    n = feats1.shape[1]
    m = min(min(feats1.shape[0], feats2.shape[0]), max_subset_size)
    t = 0
    for _ in range(num_subsets):
        x = feats2[rng.choice(feats2.shape[0], m, replace=False)]
        y = feats1[rng.choice(feats1.shape[0], m, replace=False)]
        a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
        b = (x @ y.T / n + 1) ** 3
        t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return t / num_subsets / m


def _gaussian_kernel_mean(mu, nu) -> float:
    """``E (x . y / d + 1)^3`` for independent ``x ~ N(mu, I)``, ``y ~ N(nu, I)``: ``x . y`` is a
    sum of independent products ``z_i = x_i y_i`` with ``E z = mu nu``, ``E z^2 = (1 + mu^2)(1 + nu^2)``,
    ``E z^3 = (mu^3 + 3 mu)(nu^3 + 3 nu)``; their cumulants add."""
    d = len(mu)
    ez, ez2, ez3 = mu * nu, (1 + mu ** 2) * (1 + nu ** 2), (mu ** 3 + 3 * mu) * (nu ** 3 + 3 * nu)
    k1, k2, k3 = ez.sum(), (ez2 - ez ** 2).sum(), (ez3 - 3 * ez * ez2 + 2 * ez ** 3).sum()
    e1, e2, e3 = k1 / d, (k2 + k1 ** 2) / d ** 2, (k3 + 3 * k2 * k1 + k1 ** 3) / d ** 3
    return e3 + 3 * e2 + 3 * e1 + 1


def test_mmd2_matches_the_double_loop():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 5)), 0.5 + 1.3 * rng.standard_normal((9, 5))
    assert polynomial_mmd2(x, y) == pytest.approx(_mmd2_loop(x, y), rel=1e-12, abs=1e-12)
    # float32 tensors are read as float64; order within a set does not matter
    got = polynomial_mmd2(torch.from_numpy(x).float(), torch.from_numpy(y[::-1].copy()).float())
    assert got == pytest.approx(_mmd2_loop(x.astype(np.float32), y.astype(np.float32)), rel=1e-12, abs=1e-12)


def test_kid_subsets_follow_the_documented_draws():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((12, 4)), rng.standard_normal((15, 4)) + 0.3
    draws = np.random.default_rng(3)
    want = []
    for _ in range(4):
        ix, iy = draws.choice(12, 5, replace=False), draws.choice(15, 5, replace=False)
        want.append(_mmd2_loop(x[ix], y[iy]))
    assert kid(x, y, subset_size=5, n_subsets=4, seed=3) == pytest.approx(np.mean(want), rel=1e-12)
    # the subset size drops to the smaller set: subsets of 12 from both
    draws = np.random.default_rng(0)
    want = []
    for _ in range(3):
        ix, iy = draws.choice(12, 12, replace=False), draws.choice(15, 12, replace=False)
        want.append(_mmd2_loop(x[ix], y[iy]))
    assert kid(x, y, n_subsets=3) == pytest.approx(np.mean(want), rel=1e-12)


def test_kid_of_equal_sized_sets_is_the_whole_set_estimate_and_matches_clean_fid():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((40, 16)), 1.1 * rng.standard_normal((40, 16)) + 0.2
    whole = kid(x, y)
    assert whole == pytest.approx(_mmd2_loop(x, y), rel=1e-10)
    # clean-fid draws 100 permutations of the whole sets: the same number, whatever its draws
    assert whole == pytest.approx(_clean_fid_kernel_distance(x, y, rng=np.random.default_rng(5)), rel=1e-10)
    assert kid(y, x) == pytest.approx(whole, rel=1e-12)


def test_kid_expectation_is_the_population_mmd():
    """Unbiased: over 2000 independent draws (of 30 and 25 points: unequal sizes) the mean
    estimate is within 4.5 standard errors of the closed-form MMD^2 (0 for two samples of one
    distribution, 1.164 for the shifted one)."""
    rng = np.random.default_rng(4)
    mu, nu = np.zeros(3), np.array([0.6, -0.3, 0.4])
    population = _gaussian_kernel_mean(mu, mu) + _gaussian_kernel_mean(nu, nu) - 2 * _gaussian_kernel_mean(mu, nu)
    assert population == pytest.approx(1.164017814814815, rel=1e-12)
    for shift, expected in ((mu, 0.0), (nu, population)):
        v = np.array([polynomial_mmd2(rng.standard_normal((30, 3)), rng.standard_normal((25, 3)) + shift)
                      for _ in range(2000)])
        se = v.std(ddof=1) / math.sqrt(len(v))
        assert abs(v.mean() - expected) < 4.5 * se, (expected, v.mean(), se)
    # and one draw already separates the shifted sets from a same-distribution pair
    a, b, c = (rng.standard_normal((200, 3)) for _ in range(3))
    assert kid(a, b + nu) > 10 * abs(kid(a, c))


def test_kid_rejects_bad_input():
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match="feature dimension"):
        kid(x, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="N >= 2"):
        kid(np.zeros((1, 3)), x)
    with pytest.raises(ValueError, match="N >= 2"):
        polynomial_mmd2(np.zeros(3), x)
    with pytest.raises(ValueError, match="subset_size"):
        kid(x, x, subset_size=1)
    with pytest.raises(ValueError, match="n_subsets"):
        kid(x, x, n_subsets=0)
    with pytest.raises(ValueError, match="non-finite"):
        kid(x, np.full((4, 3), np.nan))
