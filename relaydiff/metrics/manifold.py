"""Improved precision and recall (Kynkäänniemi et al. 2019), the definition of the ADM and
StyleGAN evaluators, and the Inception Score (Salimans et al. 2016).

Precision/recall: every feature vector of a set gets the radius of the ball reaching its
``k``-th nearest neighbour in the same set (``k = 3``, itself not counted); the union of the
balls estimates the set's manifold. Precision is the fraction of generated samples inside
the real manifold, recall the fraction of real samples inside the generated one. Distances are
Euclidean on the 2048-d pool features, computed in float32 blocks (on the GPU when given).
"""
from __future__ import annotations

import numpy as np
import torch


def _as_features(x, name: str, device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() != 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty feature matrix [N, D]; got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a_i - b_j|^2`` ``[len(a), len(b)]`` by ``|a|^2 + |b|^2 - 2 a.b`` (one matmul), clamped at 0."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return d.clamp_min_(0.0)


def knn_radii(features, k: int = 3, *, block: int = 2048, device=None) -> torch.Tensor:
    """Squared distance from every row of ``features [N, D]`` to its ``k``-th nearest other row ``[N]``.

    Row i's own zero distance is the smallest of its row, so the answer is the ``(k + 1)``-th
    smallest entry (the ADM evaluator's ``np.partition(d, k)[:, k]``)."""
    f = _as_features(features, "features", device)
    if not 1 <= k < f.shape[0]:
        raise ValueError(f"k must be in [1, N - 1] = [1, {f.shape[0] - 1}]; got {k}")
    out = torch.empty(f.shape[0], dtype=torch.float32, device=f.device)
    for i in range(0, f.shape[0], block):
        out[i:i + block] = torch.kthvalue(_sq_dists(f[i:i + block], f), k + 1, dim=1).values
    return out


def _covered(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """For each point, whether it lies in some ball ``|p - c_j|^2 <= r_j`` ``[len(points)]``."""
    inside = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    for i in range(0, points.shape[0], block):
        p = points[i:i + block]
        for j in range(0, centers.shape[0], block):
            inside[i:i + block] |= (_sq_dists(p, centers[j:j + block]) <= radii[None, j:j + block]).any(1)
    return inside


def precision_recall(real, fake, k: int = 3, *, block: int = 2048, device=None) -> tuple[float, float]:
    """``(precision, recall)`` of generated features ``fake [M, D]`` against ``real [N, D]``."""
    r = _as_features(real, "real", device)
    f = _as_features(fake, "fake", r.device)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake must have the same feature size; got {r.shape[1]} and {f.shape[1]}")
    r_radii = knn_radii(r, k, block=block)
    f_radii = knn_radii(f, k, block=block)
    precision = _covered(f, r, r_radii, block).double().mean().item()
    recall = _covered(r, f, f_radii, block).double().mean().item()
    return precision, recall


def inception_score(probs, splits: int = 10) -> tuple[float, float]:
    """``exp(E_x KL(p(y|x) || p(y)))`` over ``splits`` equal parts of ``probs [N, K]``
    (rows: class probabilities); returns the mean and standard deviation over the parts,
    the original definition (10 parts; ADM's 5000-image parts are the same for N = 50k)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < splits or splits < 1:
        raise ValueError(f"probs must be [N, K] with N >= splits = {splits}; got shape {p.shape}")
    if np.any(p < 0) or not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise ValueError("probs must hold probabilities: non-negative rows that sum to 1")
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))
