"""Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs", Sec. 4 / App. E):
the unbiased estimate of the squared maximum mean discrepancy between two feature sets under
the cubic polynomial kernel ``k(x, y) = (x . y / d + 1)^3``, ``d`` the feature dimension.

Unlike FID it has an unbiased estimator, so its expectation does not depend on the number of
images (it is 0 for two samples of one distribution, and can come out slightly negative).
Subsets as in the common implementations (the authors' code, StyleGAN2-ADA, clean-fid): the
mean over ``n_subsets = 100`` pairs of random subsets of ``subset_size = 1000`` features of each
set (each drawn without replacement, independently per pair), the subset size lowered to
``min(N_real, N_fake)`` when a set is smaller (torch-fidelity refuses that case instead). When
both sets have exactly that many features every subset is the whole set, so the estimate is
computed once. Computed in float64; reported as is (papers often quote KID x 1e3).
"""
from __future__ import annotations

import numpy as np
import torch

SUBSET_SIZE = 1000
N_SUBSETS = 100


def _as_features(x, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] == 0:
        raise ValueError(f"{name} must be a feature matrix [N, D] with N >= 2; got shape {tuple(a.shape)}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds non-finite values")
    return a


def polynomial_mmd2(x, y) -> float:
    """The unbiased MMD^2 of ``x [M, D]`` and ``y [N, D]`` (M, N >= 2) under
    ``k(a, b) = (a . b / D + 1)^3``: the mean of ``k`` over distinct pairs within ``x`` and
    within ``y``, minus twice its mean over all pairs across."""
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same feature dimension; got {x.shape[1]} and {y.shape[1]}")
    return _mmd2(x, y)


def _mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d, m, n = x.shape[1], x.shape[0], y.shape[0]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def kid(real, fake, *, subset_size: int = SUBSET_SIZE, n_subsets: int = N_SUBSETS, seed: int = 0) -> float:
    """KID of feature sets ``real [N1, D]`` and ``fake [N2, D]`` (e.g. Inception ``pool``
    features): the mean of :func:`polynomial_mmd2` over ``n_subsets`` pairs of random subsets
    of ``min(subset_size, N1, N2)`` features each (drawn by ``numpy.random.default_rng(seed)``:
    per pair, ``choice(N1, m, replace=False)`` then ``choice(N2, m, replace=False)``). When
    ``N1 == N2 == m`` it is the whole-set estimate, drawn once. Lower is better."""
    x, y = _as_features(real, "real"), _as_features(fake, "fake")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"real and fake must have the same feature dimension; got {x.shape[1]} and {y.shape[1]}")
    for name, v in (("subset_size", subset_size), ("n_subsets", n_subsets)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (2 if name == "subset_size" else 1):
            raise ValueError(f"{name} must be an integer >= {2 if name == 'subset_size' else 1}; got {v!r}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if x.shape[0] == y.shape[0] == m:
        return _mmd2(x, y)
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(n_subsets):
        total += _mmd2(x[rng.choice(x.shape[0], m, replace=False)], y[rng.choice(y.shape[0], m, replace=False)])
    return total / n_subsets
