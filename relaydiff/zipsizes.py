"""Sizes a zip file declares, checked before anything is inflated or allocated.

A zip's directory declares each member's inflated size (``ZipInfo.file_size``) beside the
bytes it stores (``compress_size``), and readers allocate what is declared: a 256 KiB deflated
member may inflate to 256 MiB, ``torch.load`` reserves a record's declared size before it
inflates it, and numpy allocates the array an ``.npy`` header declares before reading a byte of
it. The readers of user-named zip files check here first: torch files
(:mod:`relaydiff.models.safe_pickle`, ``--resume``) and ``.npz`` statistics and images
(:mod:`relaydiff.metrics`). Nothing from relaydiff is imported, so any layer may use it.
"""
from __future__ import annotations

import math
import zipfile

import numpy as np

# deflate's best case (zlib's documentation: 1032:1): a member declaring more than this many
# times the bytes it stores cannot inflate to what it declares
DEFLATE_MAX_RATIO = 1032
# torch.save stores every member as it is (1:1); torch.jit.save deflates only its code (about
# 3:1). A torch file whose members inflate to more than this many times its size is no torch writer's.
TORCH_MAX_RATIO = 8


class DeclaredSizeError(ValueError):
    """A zip member (or an ``.npy`` header) declares more than it can or may hold; nothing was read."""


def check_member(info: zipfile.ZipInfo, *, size: int | None = None, limit: int | None = None,
                 max_ratio: float = DEFLATE_MAX_RATIO) -> None:
    """Raise :class:`DeclaredSizeError` unless ``info`` declares exactly ``size`` bytes (when
    given), at most ``limit`` (when given), and no more than its stored bytes inflate to: the
    same for a stored member, at most ``max_ratio`` times them for a compressed one."""
    n, stored = info.file_size, info.compress_size
    if size is not None and n != size:
        raise DeclaredSizeError(f"{info.filename} declares {n} bytes, {size} expected")
    if limit is not None and n > limit:
        raise DeclaredSizeError(f"{info.filename} declares {n} bytes inflated, more than the {limit} allowed")
    if info.compress_type == zipfile.ZIP_STORED and n != stored:
        raise DeclaredSizeError(f"{info.filename} declares {n} bytes but stores {stored}, uncompressed")
    if n > max_ratio * max(stored, 1):
        raise DeclaredSizeError(f"{info.filename} declares {n} bytes inflated from {stored} "
                                f"(more than {max_ratio:g}:1)")


def checked_member(zf: zipfile.ZipFile, name: str, **limits) -> zipfile.ZipInfo:
    """``name``'s directory entry once :func:`check_member` passes it (``KeyError`` when absent)."""
    info = zf.getinfo(name)
    check_member(info, **limits)
    return info


def check_archive(zf: zipfile.ZipFile, file_bytes: int, max_ratio: float = DEFLATE_MAX_RATIO) -> None:
    """Every member of ``zf`` (a file of ``file_bytes`` bytes) through :func:`check_member`, then
    their declared total against the file: members that share stored bytes (a directory listing
    one deflated stream many times) inflate to more than ``max_ratio`` times the file."""
    total = 0
    for info in zf.infolist():
        check_member(info, max_ratio=max_ratio)
        total += info.file_size
    if total > max_ratio * max(file_bytes, 1):
        raise DeclaredSizeError(f"its members declare {total} bytes inflated from a file of {file_bytes} "
                                f"(more than {max_ratio:g}:1)")


def npy_header(f, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` member ``info`` from ``f`` (open at its
    start, left at its data), once the array the header declares is known to fit in the bytes
    the member declares. Raises ``ValueError`` (:class:`DeclaredSizeError` for a size)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype.hasobject:
        raise ValueError(f"{info.filename} holds Python objects ({dtype}), not numbers")
    need, have = math.prod(shape) * dtype.itemsize, info.file_size - f.tell()
    if need > have:
        raise DeclaredSizeError(f"{info.filename}: its header declares a {dtype} array of shape {list(shape)} "
                                f"({need} bytes), the member holds {have}")
    return shape, fortran, dtype
