"""Image datasets for training: a folder (searched recursively) or a zip of PNG/JPEG files.

Every image is converted to RGB (16-bit grey scaled to 8 bits; relaydiff.images), centre-cropped to a square and resized (Lanczos) to the
stage resolution; images smaller than the resolution are rejected up front. Class labels
come from the top-level sub-folders (``cat/001.png`` has class ``cat``). With ``xflip`` the
dataset is twice as long and items ``n..2n-1`` are the mirrored images, so the random
horizontal flip is part of the (seeded) sample order and needs no RNG in the workers.
Items are ``(uint8 [3, R, R], class index)`` (class index 0 when unconditional).
"""
from __future__ import annotations

import os
import pathlib
import zipfile

import numpy as np
import torch
from PIL import Image

from relaydiff.images import open_image, open_zip_member, square_array

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CACHE_AUTO_BYTES = 256 << 20


class _Source:
    """The image files of a folder or a zip, by relative POSIX name."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.is_zip = path.is_file()
        self._zip: zipfile.ZipFile | None = None
        if self.is_zip:
            if not zipfile.is_zipfile(path):
                raise ValueError(f"data {str(path)!r} is neither a directory nor a zip file")
            try:
                names = self._zipfile().namelist()
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(f"data {str(path)!r}: unreadable zip file ({e})") from None
        else:
            if not path.is_dir():
                raise ValueError(f"data {str(path)!r} does not exist")
            names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
        self.names = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)
                            and not any(part.startswith(".") for part in n.split("/")))

    def _zipfile(self) -> zipfile.ZipFile:
        if self._zip is None:   # opened lazily in each DataLoader worker
            self._zip = zipfile.ZipFile(self.path)
        return self._zip

    def open(self, name: str) -> Image.Image:
        """The image ``name``, its header checked (``ImageError`` naming the file)."""
        if self.is_zip:
            return open_image(open_zip_member(self._zipfile(), name, f"data: {name!r}"), f"data: {name!r}")
        return open_image(self.path / name, f"data: {name!r}")

    def __getstate__(self):
        return {**self.__dict__, "_zip": None}


class ImageDataset(torch.utils.data.Dataset):
    """Images of ``path`` (folder or zip) at ``resolution`` x ``resolution``.

    ``labels``: ``"auto"`` (class-conditional when every image lies in one of at least two
    top-level sub-folders), ``True`` (require that) or ``False`` (ignore folders).
    ``cache``: keep the decoded images in memory (``None``: when they take at most 256 MiB).
    Raises ``ValueError`` naming the problem for a missing path, no images, or an image
    smaller than ``resolution``."""

    def __init__(self, path: str | os.PathLike, resolution: int, xflip: bool = True,
                 labels: bool | str = "auto", cache: bool | None = None, progress: bool = False):
        if not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive integer; got {resolution!r}")
        if labels not in ("auto", True, False):
            raise ValueError(f"labels must be 'auto', True or False; got {labels!r}")
        self.resolution, self.xflip = resolution, bool(xflip)
        self.source = _Source(pathlib.Path(path))
        names = self.source.names
        if not names:
            raise ValueError(f"data {str(path)!r} contains no PNG/JPEG images")
        self._check_sizes(names)

        tops = [n.split("/", 1)[0] if "/" in n else None for n in names]
        classes = sorted({t for t in tops if t is not None})
        foldered = all(t is not None for t in tops)
        if labels is True and not (foldered and len(classes) >= 2):
            raise ValueError(f"data {str(path)!r}: class labels need every image inside one of at "
                             f"least two top-level sub-folders (found {len(classes)} sub-folders"
                             f"{'' if foldered else ' and images outside them'})")
        use_labels = labels is True or (labels == "auto" and foldered and len(classes) >= 2)
        self.class_names = classes if use_labels else []
        index = {c: i for i, c in enumerate(self.class_names)}
        self.labels = np.array([index[t] for t in tops] if use_labels else [0] * len(names), dtype=np.int64)

        nbytes = len(names) * 3 * resolution * resolution
        self._cache = None
        if cache or (cache is None and nbytes <= CACHE_AUTO_BYTES):
            self._cache = np.stack([self._decode(i) for i in self._progress(range(len(names)), progress, "decode")])

    @staticmethod
    def _progress(it, show: bool, desc: str):
        if not show:
            return it
        from tqdm import tqdm
        return tqdm(it, desc=desc, unit="img", leave=False)

    def _check_sizes(self, names: list[str]) -> None:
        for n in names:
            with self.source.open(n) as img:
                w, h = img.size
            if min(w, h) < self.resolution:
                raise ValueError(f"data: image {n!r} is {w}x{h}, smaller than the resolution "
                                 f"{self.resolution}x{self.resolution}")

    def _decode(self, i: int) -> np.ndarray:
        name = self.source.names[i]
        with self.source.open(name) as img:
            return square_array(img, f"data: {name!r}", self.resolution).transpose(2, 0, 1)

    @property
    def cached(self) -> bool:
        """Whether the decoded images are held in memory."""
        return self._cache is not None

    @property
    def num_images(self) -> int:
        return len(self.source.names)

    @property
    def label_dim(self) -> int:
        """Number of classes (0: unconditional)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return self.num_images * (2 if self.xflip else 1)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        i, flip = idx % self.num_images, idx >= self.num_images
        img = self._cache[i] if self._cache is not None else self._decode(i)
        if flip:
            img = img[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(img)), int(self.labels[i])


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless, seeded sample order shared by all processes.

    The global order is the concatenation of permutations ``randperm(n, seed + epoch)``;
    process ``rank`` of ``world`` takes elements ``rank, rank + world, ...``, skipping its first
    ``start`` samples, so a resumed run continues exactly where it stopped."""

    def __init__(self, n: int, rank: int = 0, world: int = 1, seed: int = 0, start: int = 0):
        if n < 1:
            raise ValueError(f"n must be positive; got {n}")
        self.n, self.rank, self.world, self.seed, self.start = n, rank, world, seed, start

    def __iter__(self):
        epoch, perm = -1, None
        k = self.start
        while True:
            j = k * self.world + self.rank
            e, r = divmod(j, self.n)
            if e != epoch:
                epoch, perm = e, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e))
            yield int(perm[r])
            k += 1
