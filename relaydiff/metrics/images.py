"""Image sets to evaluate: a folder (searched recursively), a ``.zip``, an ``.npz`` whose
``arr_0`` is ``uint8 [N, H, W, 3]`` (the ADM sample/reference-batch layout), or an in-memory
tensor. Every source yields ``uint8`` batches ``[B, 3, H, W]`` and has a content hash
(the key of the statistics cache).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import zipfile
import zlib

import numpy as np
import torch

from relaydiff.images import IMAGE_SUFFIXES as IMAGE_EXTENSIONS
from relaydiff.images import float_to_uint8 as to_uint8  # [B, C, H, W] in [-1, 1] -> uint8, layout kept
from relaydiff.images import (SAMPLE_MANIFEST, ImageError, center_square, open_image, open_zip_member, read_image,
                              read_sample_manifest, square_array)
from relaydiff.zipsizes import checked_member, npy_header


def decode_rgb(data, name: str = "image") -> np.ndarray:
    """Encoded image bytes (or a file) -> uint8 ``[H, W, 3]`` (grey, 16-bit grey and RGBA
    converted to RGB; :func:`relaydiff.images.read_image`, whose ``ImageError`` names ``name``)."""
    return read_image(data, name)


class ImageSource:
    """A set of images. ``len()``, ``names`` (stable order), ``read(i) -> uint8 [H, W, 3]``,
    ``content_hash()``, ``batches(batch_size)``."""

    path: str
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def read_square(self, i: int, size: int) -> np.ndarray:
        """Image ``i``'s centre square resized to ``size`` (``center_square(read(i), size)``);
        file sources cut the square before converting, so a very wide image costs its square."""
        return center_square(self.read(i), size)

    def content_hash(self) -> str:
        raise NotImplementedError

    def batches(self, batch_size: int, num_workers: int = 0):
        """Yield uint8 tensors ``[B, 3, H, W]``; a batch of mixed sizes is a list of ``[3, H, W]``."""
        loader = torch.utils.data.DataLoader(_Items(self), batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=_collate)
        yield from loader


class _Items(torch.utils.data.Dataset):
    def __init__(self, source: ImageSource):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return torch.from_numpy(self.source.read(i)).permute(2, 0, 1)


def _collate(items):
    if all(t.shape == items[0].shape for t in items):
        return torch.stack(items)
    return items


class FolderSource(ImageSource):
    """The images of a folder, searched recursively -- or, in a ``relaydiff sample`` output
    folder, only the samples its ``relaydiff-sample.json`` lists (not grid.png, not low/)."""

    def __init__(self, path: str):
        self.path = path
        listed = read_sample_manifest(path)
        if listed is not None:
            missing = [n for n in listed if not os.path.isfile(os.path.join(path, n))]
            if missing:
                raise ValueError(f"{os.path.join(path, SAMPLE_MANIFEST)} lists {missing[0]!r}, which is missing")
            self.names = sorted(listed)
            return
        names = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            names += [os.path.relpath(os.path.join(root, f), path) for f in sorted(files)
                      if f.lower().endswith(IMAGE_EXTENSIONS)]
        self.names = sorted(names)

    def read(self, i: int) -> np.ndarray:
        return decode_rgb(os.path.join(self.path, self.names[i]), os.path.join(self.path, self.names[i]))

    def read_square(self, i: int, size: int) -> np.ndarray:
        path = os.path.join(self.path, self.names[i])
        with open_image(path, path) as im:
            return square_array(im, path, size)

    def content_hash(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for name in self.names:
            h.update(name.replace(os.sep, "/").encode() + b"\0")
            _hash_file_into(h, os.path.join(self.path, name))
        return h.hexdigest()


class ZipSource(ImageSource):
    def __init__(self, path: str):
        self.path = path
        with zipfile.ZipFile(path) as z:
            self.names = sorted(n for n in z.namelist() if n.lower().endswith(IMAGE_EXTENSIONS))
        self._zip = None

    def read(self, i: int) -> np.ndarray:
        if self._zip is None:          # opened lazily: one handle per DataLoader worker
            self._zip = zipfile.ZipFile(self.path)
        name = f"{self.path}:{self.names[i]}"
        with open_zip_member(self._zip, self.names[i], name) as f:
            return decode_rgb(f, name)

    def read_square(self, i: int, size: int) -> np.ndarray:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        name = f"{self.path}:{self.names[i]}"
        with open_zip_member(self._zip, self.names[i], name) as f, open_image(f, name) as im:
            return square_array(im, name, size)

    def __getstate__(self):
        return {**self.__dict__, "_zip": None}

    def content_hash(self) -> str:
        return file_hash(self.path)


class NpzSource(ImageSource):
    """``arr_0`` of an ``.npz``, read batch by batch from the archive (ADM reference batches
    hold 10k-50k images: too many to load at once)."""

    def __init__(self, path: str):
        self.path = path
        try:
            with self._array() as (_, shape, fortran, dtype):
                pass
        except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f"{path!r}: unreadable arr_0 ({' '.join(str(e).split())})") from e
        if fortran:
            raise ValueError(f"{path!r}: arr_0 is stored in Fortran order; expected C order")
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
            raise ValueError(f"{path!r}: arr_0 must be uint8 [N, H, W, 3]; got {dtype} {list(shape)}")
        self.shape = shape
        self.names = [str(i) for i in range(shape[0])]

    @contextlib.contextmanager
    def _array(self):
        """``(file, shape, fortran_order, dtype)`` of arr_0, the file at its data; the zip entry's
        declared size and the header's shape are checked against each other first (relaydiff.zipsizes)."""
        with zipfile.ZipFile(self.path) as z:
            info = checked_member(z, "arr_0.npy")
            with z.open(info) as f:
                yield (f, *npy_header(f, info))

    def read(self, i: int) -> np.ndarray:
        return next(iter(self._chunks(i, i + 1)))[0].copy()

    def _chunks(self, start: int, stop: int, size: int = 1):
        n, h, w, c = self.shape
        item = h * w * c
        try:
            with self._array() as (f, *_):
                f.seek(f.tell() + start * item)
                for i in range(start, stop, size):
                    k = min(size, stop - i)
                    data = f.read(k * item)
                    if len(data) != k * item:
                        raise EOFError("the array ends early")
                    yield np.frombuffer(data, np.uint8).reshape(k, h, w, c)
        except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as e:   # the file changed, or is corrupt
            raise ImageError(f"{self.path}: corrupt arr_0.npy ({' '.join(str(e).split())})") from None

    def batches(self, batch_size: int, num_workers: int = 0):
        for chunk in self._chunks(0, self.shape[0], batch_size):
            yield torch.from_numpy(chunk.copy()).permute(0, 3, 1, 2)

    def content_hash(self) -> str:
        return file_hash(self.path)


class TensorSource(ImageSource):
    """Images already in memory: uint8 ``[N, 3, H, W]`` or float in [-1, 1] (quantised like a saved PNG)."""

    def __init__(self, images: torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W]; got shape {tuple(images.shape)}")
        self.images = images.cpu() if images.dtype == torch.uint8 else to_uint8(images.cpu())
        self.path = "<tensor>"
        self.names = [str(i) for i in range(images.shape[0])]

    def read(self, i: int) -> np.ndarray:
        return self.images[i].permute(1, 2, 0).numpy()

    def batches(self, batch_size: int, num_workers: int = 0):
        for i in range(0, len(self), batch_size):
            yield self.images[i:i + batch_size]

    def content_hash(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(str(tuple(self.images.shape)).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        return h.hexdigest()


def _hash_file_into(h, path: str) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)


def file_hash(path: str) -> str:
    """blake2b-128 hex digest of a file's bytes."""
    h = hashlib.blake2b(digest_size=16)
    _hash_file_into(h, path)
    return h.hexdigest()


def npz_keys(path: str) -> set[str]:
    """The array names in an ``.npz`` (``ValueError`` if it is not one)."""
    try:
        with zipfile.ZipFile(path) as z:
            return {n[:-4] for n in z.namelist() if n.endswith(".npy")}
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path!r} is not a readable .npz archive ({e})") from e


def open_images(source, what: str = "images") -> ImageSource:
    """An :class:`ImageSource` for a folder, ``.zip``, ``.npz`` (``arr_0``) or tensor.
    ``what`` names the argument in error messages."""
    if isinstance(source, ImageSource):
        return source
    if isinstance(source, torch.Tensor):
        return TensorSource(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        src = FolderSource(path)
    elif os.path.isfile(path) and path.lower().endswith(".zip"):
        src = ZipSource(path)
    elif os.path.isfile(path) and path.lower().endswith(".npz"):
        if "arr_0" not in npz_keys(path):
            raise ValueError(f"{what} {path!r}: the .npz has no image array 'arr_0' (uint8 [N, H, W, 3])")
        src = NpzSource(path)
    elif not os.path.exists(path):
        raise ValueError(f"{what} {path!r} does not exist")
    else:
        raise ValueError(f"{what} {path!r} must be a folder of images, a .zip or an .npz with 'arr_0'")
    if len(src) == 0:
        raise ValueError(f"{what} {path!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return src
