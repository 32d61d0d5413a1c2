"""Fréchet distance between Gaussians fitted to network features (FID, sFID) and the
reference-statistics file.

``d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})`` (Heusel et al. 2017), all in
float64, the square root by ``scipy.linalg.sqrtm`` as in the ADM and pytorch-fid evaluators.

Statistics files are ``.npz`` archives with ``mu`` ``[D]`` and ``sigma`` ``[D, D]`` (the layout
of the common FID reference files), optionally ``mu_s``/``sigma_s`` (spatial features for
sFID, the names of ADM's reference batches) and ``pool`` ``[N, D]`` (the features themselves,
needed for precision/recall; written by the feature cache).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
import zipfile
import zlib

import numpy as np

from relaydiff.zipsizes import checked_member, npy_header


def matrix_sqrt(a) -> np.ndarray:
    """Principal square root ``R`` with ``R @ R = a`` of a square matrix, in float64
    (``scipy.linalg.sqrtm``, Schur method). ``a = S_1 @ S_2`` is not symmetric but is similar
    to a positive semi-definite matrix, so its root is real up to rounding; a complex result
    is returned as is and judged by the caller."""
    try:
        from scipy import linalg
    except ImportError as e:
        raise ImportError("the Fréchet distance needs scipy: pip install 'relaydiff[eval]'") from e
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"a must be a square matrix [D, D]; got shape {a.shape}")
    return linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Squared Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``mu*`` are ``[D]``, ``sigma*`` ``[D, D]``. If ``sigma1 @ sigma2`` is too singular for a
    finite root, ``eps * I`` is added to both covariances (the pytorch-fid/ADM rule). A root
    whose diagonal has an imaginary part above 1e-3 is an error (the covariances are not
    positive semi-definite)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    for name, v, shape in (("mu1", mu1, (d,)), ("mu2", mu2, (d,)), ("sigma1", sigma1, (d, d)),
                           ("sigma2", sigma2, (d, d))):
        if v.shape != shape:
            raise ValueError(f"{name} must have shape {list(shape)} (D = len(mu1) = {d}); got {list(v.shape)}")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{name} contains NaN or infinity")
    diff = mu1 - mu2
    covmean = matrix_sqrt(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        warnings.warn(f"frechet_distance: singular product of covariances; adding {eps} to the diagonal")
        offset = np.eye(d) * eps
        covmean = matrix_sqrt((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise ValueError(f"frechet_distance: the matrix square root has imaginary part {imag:.3g}; "
                             "are sigma1 and sigma2 covariance matrices?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (divisor N - 1) of ``features [N, D]``, float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2; got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


class RunningStats:
    """Mean and covariance of features that arrive in batches, without keeping them.

    Sums are taken in float64 around the first batch's mean, so the final
    ``(sum xx^T - n m m^T) / (n - 1)`` does not cancel catastrophically."""

    def __init__(self):
        self.n = 0
        self._shift = self._sum = self._outer = None

    def update(self, batch) -> None:
        """Add ``batch [B, D]`` (numpy or torch)."""
        b = np.asarray(batch.detach().cpu() if hasattr(batch, "detach") else batch, dtype=np.float64)
        if b.ndim != 2:
            raise ValueError(f"batch must be [B, D]; got shape {b.shape}")
        if self._shift is None:
            self._shift = b.mean(axis=0)
            self._sum = np.zeros_like(self._shift)
            self._outer = np.zeros((b.shape[1], b.shape[1]))
        elif b.shape[1] != self._shift.shape[0]:
            raise ValueError(f"batch has {b.shape[1]} features; earlier batches had {self._shift.shape[0]}")
        c = b - self._shift
        self.n += b.shape[0]
        self._sum += c.sum(axis=0)
        self._outer += c.T @ c

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance; got {self.n}")
        m = self._sum / self.n
        cov = (self._outer - self.n * np.outer(m, m)) / (self.n - 1)
        return self._shift + m, cov


@dataclasses.dataclass
class FeatureStats:
    """What FID/sFID/precision-recall need of one image set.

    ``mu [D]``, ``sigma [D, D]`` (pool features); ``mu_s``/``sigma_s`` (spatial features, sFID);
    ``pool [N, D]`` the features themselves (precision/recall); ``probs [N, K]`` class
    probabilities (Inception Score); ``n`` the number of images. Optional parts may be None."""
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool: np.ndarray | None = None
    probs: np.ndarray | None = None
    n: int = 0

    def save(self, path: str, *, with_features: bool = False) -> None:
        """Write an ``.npz`` (atomically: temporary file, then rename). ``pool``/``probs`` are
        written only with ``with_features=True``."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "n": np.int64(self.n)}
        if self.mu_s is not None:
            arrays.update(mu_s=self.mu_s, sigma_s=self.sigma_s)
        if with_features:
            arrays.update({k: v for k, v in (("pool", self.pool), ("probs", self.probs)) if v is not None})
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(suffix=".npz", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


def _read_npy(zf: zipfile.ZipFile, name: str) -> np.ndarray:
    """One array of an ``.npz``; the sizes its zip entry and its ``.npy`` header declare are
    checked against each other before the array is allocated (:mod:`relaydiff.zipsizes`)."""
    info = checked_member(zf, name)
    with zf.open(info) as f:
        npy_header(f, info)
        f.seek(0)
        return np.lib.format.read_array(f, allow_pickle=False)


def load_stats(path: str) -> FeatureStats:
    """Read a statistics ``.npz`` (ours, ADM's reference batches, pytorch-fid's ``fid_stats``):
    ``mu``/``sigma`` required, ``mu_s``/``sigma_s``/``pool``/``probs`` used when present."""
    try:
        data = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path!r} is not a readable .npz statistics file: {e}") from e
    with data:
        files = {n[:-len(".npy")] for n in data.namelist() if n.endswith(".npy")}
        missing = [k for k in ("mu", "sigma") if k not in files]
        if missing:
            raise ValueError(f"{path!r} has no {' or '.join(missing)}: a statistics file needs 'mu' [D] "
                             f"and 'sigma' [D, D] (found keys {sorted(files)})")
        try:
            get = {k: _read_npy(data, k + ".npy") for k in ("mu", "sigma", "mu_s", "sigma_s", "pool", "probs", "n")
                   if k in files}
        except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f"{path!r}: unreadable statistics ({' '.join(str(e).split())})") from e
    mu, sigma = get["mu"].astype(np.float64), get["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path!r}: 'mu' must be [D] and 'sigma' [D, D]; got {list(mu.shape)} and {list(sigma.shape)}")
    mu_s, sigma_s = get.get("mu_s"), get.get("sigma_s")
    if (mu_s is None) != (sigma_s is None):
        raise ValueError(f"{path!r}: 'mu_s' and 'sigma_s' must be stored together")
    pool = get.get("pool")
    if pool is not None and (pool.ndim != 2 or pool.shape[1] != mu.shape[0]):
        raise ValueError(f"{path!r}: 'pool' must be [N, {mu.shape[0]}]; got {list(pool.shape)}")
    if "n" in get and (get["n"].size != 1 or not np.issubdtype(get["n"].dtype, np.integer)):
        raise ValueError(f"{path!r}: 'n' must be one integer; got {get['n'].dtype} {list(get['n'].shape)}")
    n = int(get["n"]) if "n" in get else (pool.shape[0] if pool is not None else 0)
    return FeatureStats(mu=mu, sigma=sigma,
                        mu_s=None if mu_s is None else mu_s.astype(np.float64),
                        sigma_s=None if sigma_s is None else sigma_s.astype(np.float64),
                        pool=pool, probs=get.get("probs"), n=n)
