"""One pass of the feature network over an image set -> :class:`FeatureStats`, cached.

The cache key is the content hash of the images, the fingerprint of the network weights and
the preprocessing version, so a reference set is processed once and any change to its files
or to the weights recomputes it. A cache entry is itself a statistics ``.npz`` (``mu``,
``sigma``, ``mu_s``, ``sigma_s``, ``pool``, ``probs``) usable as ``--ref``.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os

import torch
from tqdm.auto import tqdm

from .frechet import FeatureStats, RunningStats, gaussian_stats, load_stats
from .images import ImageSource, open_images

# bump when the preprocessing or the stored layout changes: old cache entries stop matching
CACHE_VERSION = "tf-inception-299-legacy-bilinear/1"


def default_cache_dir() -> str:
    """``$RELAYDIFF_CACHE/stats``, else ``$XDG_CACHE_HOME/relaydiff/stats``, else ``~/.cache/relaydiff/stats``."""
    root = os.environ.get("RELAYDIFF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "relaydiff")
    return os.path.join(root, "stats")


@contextlib.contextmanager
def _ieee_float32():
    """TF32 convolutions would move the features by ~1e-3 relative; FID wants the float32 network."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def cache_key(source: ImageSource, extractor) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in (CACHE_VERSION, extractor.fingerprint, ",".join(extractor.outputs), source.content_hash()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def compute_stats(images, extractor, *, batch_size: int = 50, device=None, num_workers: int = 0,
                  cache_dir: str | None = None, progress: bool = True, desc: str = "features") -> FeatureStats:
    """Features of ``images`` (folder, .zip, .npz with ``arr_0``, tensor or :class:`ImageSource`)
    through ``extractor`` (e.g. :func:`relaydiff.metrics.load_inception`) on ``device``.

    Returns ``FeatureStats`` with ``mu``/``sigma`` and ``pool [N, 2048]``, ``mu_s``/``sigma_s``
    when the extractor gives ``spatial`` features, ``probs`` when it gives class probabilities.
    ``cache_dir`` (None: no cache) holds ``<key>.npz`` entries; see :func:`cache_key`."""
    source = open_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if len(source) < 2:
        raise ValueError(f"{source.path!r}: need at least 2 images for a covariance; found {len(source)}")
    cache_path = None
    if cache_dir is not None:
        cache_path = os.path.join(cache_dir, cache_key(source, extractor) + ".npz")
        if os.path.isfile(cache_path):
            return load_stats(cache_path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    extractor = extractor.to(device)
    pool, probs, spatial = [], [], RunningStats()
    batches = source.batches(batch_size, num_workers)
    with _ieee_float32():
        for batch in tqdm(batches, total=math.ceil(len(source) / batch_size), desc=desc, unit="batch",
                          disable=not progress):
            if isinstance(batch, list):      # images of different sizes: one at a time
                outs = [extractor(img[None].to(device)) for img in batch]
                out = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
            else:
                out = extractor(batch.to(device))
            pool.append(out["pool"].float().cpu())
            if out.get("spatial") is not None:
                spatial.update(out["spatial"])
            if out.get("probs") is not None:
                probs.append(out["probs"].float().cpu())
    pool_np = torch.cat(pool).numpy()
    mu, sigma = gaussian_stats(pool_np)
    mu_s, sigma_s = spatial.finalize() if spatial.n else (None, None)
    stats = FeatureStats(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool=pool_np,
                         probs=torch.cat(probs).numpy() if probs else None, n=pool_np.shape[0])
    if cache_path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        stats.save(cache_path, with_features=True)
    return stats
