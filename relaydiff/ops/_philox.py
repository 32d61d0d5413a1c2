"""Pure-PyTorch Philox4x32-10 and the normal transform shared with the C++/CUDA kernels.

This is the generator the whole library's noise comes from. It is written here with
plain int64 tensor arithmetic, independently of ``csrc/common/philox.h``, so that the
reference twins can reproduce every kernel's noise element by element.

Stream layout (the contract the kernels implement too):

* key = (seed mod 2^32, seed >> 32) for a seed in [0, 2^63).
* The normal for element ``i`` (the linear index of the element in the *logical*
  contiguous ``[B, C, H, W]`` order, whatever the tensor's strides) of stream ``s`` uses
  the Philox block with counter ``(j mod 2^32, j >> 32, s, 0)``, ``j = i // 4``, whose four
  32-bit outputs ``r0..r3`` give two Box-Muller pairs: lanes 0/1 are the cosine/sine
  normals of ``(r0, r1)``, lanes 2/3 those of ``(r2, r3)``.
* Box-Muller: ``u = (2 * (r_even >> 9) + 1) * 2^-24`` (in (0, 1), exact in float32),
  ``v = (r_odd >> 8) * 2^-24`` (in [0, 1)), ``radius = sqrt(-2 ln u)``,
  ``normal = radius * cos(2 pi v)`` or ``radius * sin(2 pi v)``.
* Streams: 0 = the white field ``e``, 1 = the field ``e2`` that block noise is built from.
"""
from __future__ import annotations

import math

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF

STREAM_WHITE = 0
STREAM_BLOCK = 1


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``m * a`` for uint32 values held in int64 tensors.

    int64 cannot hold a 64-bit product, so ``a`` is split into 16-bit halves.
    """
    a_lo = a & 0xFFFF
    a_hi = a >> 16
    t = a_lo * m                       # < 2^48
    u = a_hi * m                       # < 2^48, weight 2^16
    s = (u & 0xFFFF) * 65536 + t       # < 2^49
    lo = s & MASK32
    hi = (u >> 16) + (s >> 32)
    return hi & MASK32, lo


def philox4x32_10(counter: tuple[torch.Tensor, ...], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32 with 10 rounds (Salmon et al., SC'11). Counter words are int64 tensors
    holding uint32 values; key words are Python ints. Returns the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r > 0:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def split_seed(seed: int) -> tuple[int, int]:
    return seed & MASK32, (seed >> 32) & MASK32


def philox_normal(numel: int, seed: int, stream: int, device=None,
                  dtype: torch.dtype = torch.float64, start: int = 0) -> torch.Tensor:
    """Normals ``start .. start+numel-1`` of ``stream`` under ``seed`` (1-D, ``dtype``).

    The transform runs in float64 with torch's own log/sin/cos: an independent check of
    the kernels' float32 polynomial versions.
    """
    if numel == 0:
        return torch.empty(0, dtype=dtype, device=device)
    first, last = start >> 2, (start + numel - 1) >> 2
    blk = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    zeros = torch.zeros_like(blk)
    r = philox4x32_10((blk & MASK32, blk >> 32, zeros + stream, zeros), split_seed(seed))
    u = ((torch.stack([r[0], r[2]], -1) >> 9) * 2 + 1).to(torch.float64) * 2.0 ** -24
    v = (torch.stack([r[1], r[3]], -1) >> 8).to(torch.float64) * 2.0 ** -24
    radius = torch.sqrt(-2.0 * torch.log(u))
    angle = (2.0 * math.pi) * v
    # [blocks, pair, (cos, sin)] flattens to lanes 0..3 of each block
    out = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], -1).reshape(-1)
    off = start - (first << 2)
    return out[off:off + numel].to(dtype)
