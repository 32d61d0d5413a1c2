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
