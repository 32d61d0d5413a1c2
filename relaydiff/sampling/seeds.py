"""Deterministic seed derivation: one user seed -> a tree of per-step noise seeds.

The relay ops draw their noise from Philox as a pure function of ``(seed, shape)``, so a
sampler is repeatable once every noise draw has its own seed. ``derive_seed(seed, *path)``
hashes a path of small integers (the step index, which draw within the step, ...) with
splitmix64 rounds; nearby seeds and paths give unrelated results. The samplers first
replace a ``None`` user seed by one drawn from torch's global generator
(``relaydiff.ops._validate.check_seed``), so ``torch.manual_seed`` makes unseeded runs
repeatable.
"""
from __future__ import annotations

import numbers

import torch

from relaydiff.ops._validate import check_seed

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, *path: int) -> int:
    """A seed in ``[0, 2^63)`` determined by ``seed`` and the integers in ``path``."""
    h = _splitmix64(seed)
    for k in path:
        h = _splitmix64(h ^ (k & _MASK64))
    return h >> 1


def check_seeds(seed, batch: int) -> int | tuple[int, ...]:
    """A sampler's ``seed`` argument: ``None`` or an int (one seed for the whole batch, its
    noise drawn batch-wide) -> an int; a sequence or 1-D integer tensor of ``batch`` per-sample
    seeds -> a tuple (EDM's convention: sample ``b``'s noise depends on ``seed[b]`` alone)."""
    if seed is None or isinstance(seed, (bool, numbers.Integral)) \
            or (isinstance(seed, torch.Tensor) and seed.dim() == 0):
        return check_seed(seed)
    if isinstance(seed, torch.Tensor):
        seed = seed.tolist()
    if not isinstance(seed, (list, tuple)) or len(seed) != batch:
        raise ValueError(f"seed must be None, an integer or a sequence of {batch} per-sample seeds "
                         f"(one per image of the batch); got {seed!r}")
    return tuple(check_seed(s) for s in seed)


def split_seed(seed: int | tuple[int, ...], *path: int) -> int | tuple[int, ...]:
    """:func:`derive_seed` of an int seed, or of each per-sample seed of a tuple."""
    if isinstance(seed, tuple):
        return tuple(derive_seed(s, *path) for s in seed)
    return derive_seed(seed, *path)


def seeded(fn, seed: int | tuple[int, ...], *args, **kwargs):
    """``fn(*args, seed=seed, **kwargs)`` for an int seed. For per-sample seeds (a tuple of B)
    ``fn`` runs once per sample on the ``b``-th slice ``[b:b+1]`` of every tensor argument with
    ``seed[b]``, and the results are concatenated: sample ``b`` then depends on ``seed[b]``
    alone, whatever the batch (the noise ops are pure functions of ``(seed, shape)``, so a
    batch-wide draw is not the stack of per-sample ones). Costs B op calls instead of one."""
    if not isinstance(seed, tuple):
        return fn(*args, seed=seed, **kwargs)

    def part(v, b):
        return v[b:b + 1] if isinstance(v, torch.Tensor) else v
    return torch.cat([fn(*(part(a, b) for a in args), seed=s, **{k: part(v, b) for k, v in kwargs.items()})
                      for b, s in enumerate(seed)])


def authors_class_labels(seeds, label_dim: int) -> torch.Tensor:
    """The classes the authors' generate scripts give their images: ``seed % label_dim`` for
    the image of seed ``seed`` (THUDM/RelayDiffusion generate_imagenet.py and generate.py:
    ``class_labels = torch.eye(label_dim)[batch_seeds % label_dim]``, unless ``--class``).
    Over their ImageNet seeds ``10000-59999`` every class gets 50 images. Returns ``[n]``
    int64 class indices (``RelayPipeline.sample(seeds=seeds, class_labels=...)`` takes them;
    ``relaydiff sample/upscale --seeds LIST --class seed-mod`` on the command line)."""
    if isinstance(label_dim, bool) or not isinstance(label_dim, numbers.Integral) or label_dim < 1:
        raise ValueError(f"label_dim must be a positive integer (a class-conditional model); got {label_dim!r}")
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.tolist()
    if not isinstance(seeds, (list, tuple, range)) or any(s is None for s in seeds):
        raise ValueError(f"seeds must be a sequence of per-image integer seeds; got {seeds!r}")
    seeds = [check_seed(s) for s in seeds]
    return torch.tensor([s % int(label_dim) for s in seeds], dtype=torch.int64)
