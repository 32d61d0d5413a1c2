"""Image tensors <-> uint8 <-> PNG files (docs/CONTRACTS.md, "Images"): the library's one
implementation of the conversion (``relaydiff.data`` and ``relaydiff.metrics`` use it).

Floats are ``[B, C, H, W]`` in [-1, 1]; ``u8 = clamp(round((x + 1) * 127.5), 0, 255)`` and
``x = u8 / 127.5 - 1``. C is 1 (grey) or 3 (RGB).

Reading image files (:func:`open_image`, :func:`image_array`, :func:`read_image`,
:func:`square_array`, :func:`open_zip_member`) is also done here, once for training data, evaluation and upscaling:
16-bit grey is scaled to 8 bits (not clipped), and a file that cannot be used raises
:class:`ImageError` naming it -- unreadable, corrupt, truncated, or larger than
:data:`MAX_IMAGE_PIXELS` (checked from the header, before any pixel is decoded; a zip member
may inflate to at most :data:`BYTES_PER_PIXEL` bytes per allowed pixel, checked before it is
read). :func:`set_max_image_pixels` raises the cap (the CLI's ``--max-image-pixels``).
"""
from __future__ import annotations

import io
import math
import os
import warnings
import zipfile
import zlib

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_MAX_IMAGE_PIXELS = 1 << 26   # 67 M pixels (8192 x 8192): the default cap on one decoded image
MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS   # the cap in force (set_max_image_pixels)
BYTES_PER_PIXEL = 8          # 16-bit RGBA stored uncompressed: the most an image file needs per pixel
SAMPLE_MANIFEST = "relaydiff-sample.json"   # what relaydiff sample generated, in its --out folder
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")   # grey modes holding 0..65535
# what PIL raises for unreadable or broken files (OSError covers UnidentifiedImageError,
# truncated data and bad CRCs; SyntaxError and struct errors come from some header parsers)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, zlib.error,
                  zipfile.BadZipFile, Image.DecompressionBombError)


class ImageError(ValueError):
    """An image file that cannot be used: unreadable, corrupt, truncated or over the size caps."""


def set_max_image_pixels(pixels: int) -> None:
    """Cap decoded images at ``pixels`` (and zip members at ``BYTES_PER_PIXEL * pixels``) for
    this process, raising PIL's own decompression-bomb limit with it where it is lower."""
    global MAX_IMAGE_PIXELS
    if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 1:
        raise ValueError(f"max image pixels must be a positive integer; got {pixels!r}")
    MAX_IMAGE_PIXELS = pixels
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < pixels:
        Image.MAX_IMAGE_PIXELS = pixels


def _cap_hint() -> str:
    return f"the cap is {MAX_IMAGE_PIXELS} pixels; raise it with --max-image-pixels"


def open_image(source, name: str) -> Image.Image:
    """``PIL.Image.open`` of a path or encoded bytes, its header checked (no pixel decoded yet).
    Raises :class:`ImageError` naming ``name`` if PIL cannot identify the file or it has more
    than :data:`MAX_IMAGE_PIXELS` pixels."""
    try:
        with warnings.catch_warnings():   # PIL's bomb warning would be a second stderr line: the cap below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: too large ({e}; {_cap_hint()})") from None
    except _DECODE_ERRORS as e:
        raise ImageError(f"{name}: not a readable image ({' '.join(str(e).split()) or type(e).__name__})") from None
    if im.width * im.height > MAX_IMAGE_PIXELS:
        im.close()
        raise ImageError(f"{name}: {im.width}x{im.height} pixels is too large ({_cap_hint()})")
    return im


def image_array(im: Image.Image, name: str, channels: int = 3) -> np.ndarray:
    """Decode an opened image to uint8 ``[H, W, channels]`` (1: grey, 3: RGB; alpha dropped).
    16-bit grey (``I;16``, and ``I`` read as 16-bit) becomes ``round(v * 255 / 65535)``: PIL's
    own conversion clips it, turning most 16-bit photos white. Raises :class:`ImageError`
    naming ``name`` for corrupt or truncated data."""
    try:
        if im.mode in _SIXTEEN_BIT:
            wide = np.asarray(im).astype(np.float64)
            im = Image.fromarray(np.clip(np.rint(wide * (255 / 65535)), 0, 255).astype(np.uint8), "L")
        elif im.mode == "F":
            raise ImageError(f"{name}: 32-bit float images have no defined range; convert it to 8 or 16 bits")
        a = np.array(im.convert("L" if channels == 1 else "RGB"))   # a writable copy
    except _DECODE_ERRORS as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{name}: corrupt or truncated image ({' '.join(str(e).split()) or type(e).__name__})") \
            from None
    return a[:, :, None] if a.ndim == 2 else a


def read_image(source, name: str, channels: int = 3, size: tuple[int, int] | None = None) -> np.ndarray:
    """:func:`open_image` then :func:`image_array`; resized to ``size = (H, W)`` (Lanczos) if given."""
    with open_image(source, name) as im:
        a = image_array(im, name, channels)
    if size is not None and a.shape[:2] != tuple(size):
        pil = Image.fromarray(a[:, :, 0] if channels == 1 else a)
        a = np.asarray(pil.resize((size[1], size[0]), Image.LANCZOS))
        a = a[:, :, None] if a.ndim == 2 else a
    return a


def open_zip_member(zf: zipfile.ZipFile, member: str, name: str):
    """A seekable stream of an image inside a zip (PIL then reads only what it needs: the
    header to size it). The size the zip declares is checked first: a member that would
    inflate to more than ``BYTES_PER_PIXEL * MAX_IMAGE_PIXELS`` is refused unread. Raises
    :class:`ImageError` naming ``name``."""
    try:
        info = zf.getinfo(member)
        if info.file_size > BYTES_PER_PIXEL * MAX_IMAGE_PIXELS:
            raise ImageError(f"{name}: inflates to {info.file_size} bytes, more than any image within the cap "
                             f"needs ({_cap_hint()})")
        return zf.open(info)
    except (zipfile.BadZipFile, zlib.error, OSError, KeyError, NotImplementedError, RuntimeError) as e:
        raise ImageError(f"{name}: corrupt zip member ({' '.join(str(e).split()) or type(e).__name__})") from None


def float_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``u8 = clamp(round((x + 1) * 127.5), 0, 255)``: floats in [-1, 1] -> uint8, same layout."""
    return ((x.detach().to(torch.float32) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def uint8_to_float(u8: torch.Tensor) -> torch.Tensor:
    """``x = u8 / 127.5 - 1``: uint8 -> float32 in [-1, 1], same layout."""
    return u8.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[B, C, H, W]`` floats in [-1, 1] -> ``[B, H, W, C]`` uint8 (for PIL)."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, C, H, W] with C = 1 or 3; got shape {tuple(x.shape)}")
    return float_to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(a: np.ndarray) -> torch.Tensor:
    """``[H, W, C]`` or ``[B, H, W, C]`` uint8 -> float32 ``[B, C, H, W]`` in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if t.dim() == 3:
        t = t[None]
    return uint8_to_float(t.permute(0, 3, 1, 2))


# The authors' post-processing (``save_samples`` of THUDM/RelayDiffusion's generate_imagenet.py
# and generate_celebahq.py), applied to every image before their published FIDs were computed:
# their uint8 conversion (authors_to_uint8), then ``img_enhance``, PIL ``ImageEnhance``
# operations with their factors, in order. Opt-in (``--post``), since it changes the samples'
# statistics rather than the model's.
AUTHORS_ENHANCE = {
    "authors-enhance-imagenet256": (("Brightness", 1.06),),
    "authors-enhance-celebahq256": (("Contrast", 0.9), ("Brightness", 1.05), ("Color", 0.99)),
}


def authors_enhance(images: np.ndarray, name: str) -> np.ndarray:
    """``[B, H, W, C]`` uint8 (C = 1 or 3) -> the same after the authors' enhancement ``name``
    (a key of :data:`AUTHORS_ENHANCE`), computed by PIL as in their scripts."""
    from PIL import ImageEnhance
    if name not in AUTHORS_ENHANCE:
        raise ValueError(f"unknown post-processing {name!r}; choose one of {sorted(AUTHORS_ENHANCE)}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"images must be uint8 [B, H, W, C] with C = 1 or 3; got {images.dtype} "
                         f"{tuple(images.shape)}")
    out = []
    for image in images:
        pil = Image.fromarray(image[:, :, 0], "L") if image.shape[2] == 1 else Image.fromarray(image, "RGB")
        for op, factor in AUTHORS_ENHANCE[name]:
            pil = getattr(ImageEnhance, op)(pil).enhance(factor)
        out.append(np.asarray(pil).reshape(image.shape))
    return np.stack(out) if out else images.copy()


def authors_to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[B, C, H, W]`` floats -> ``[B, H, W, C]`` uint8 as the authors' ``save_samples``:
    ``(x * 127.5 + 128).clip(0, 255).to(torch.uint8)``, i.e. ``floor(127.5 x + 128)`` clipped
    to [0, 255] (ties ``127.5 (x + 1) = k + 1/2`` go up; :func:`to_uint8` rounds them to even).
    Computed in float64, operation for operation, as their (float64) images are."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, C, H, W] with C = 1 or 3; got shape {tuple(x.shape)}")
    u8 = (x.detach().to(torch.float64) * 127.5 + 128).clamp(0, 255).floor().to(torch.uint8)
    return u8.permute(0, 2, 3, 1).cpu().numpy()


def authors_postprocess(x: torch.Tensor, name: str) -> np.ndarray:
    """The authors' ``save_samples``: ``[B, C, H, W]`` floats -> ``[B, H, W, C]`` uint8 through
    their conversion (:func:`authors_to_uint8`) and their enhancement ``name`` (a key of
    :data:`AUTHORS_ENHANCE`, :func:`authors_enhance`)."""
    if name not in AUTHORS_ENHANCE:
        raise ValueError(f"unknown post-processing {name!r}; choose one of {sorted(AUTHORS_ENHANCE)}")
    return authors_enhance(authors_to_uint8(x), name)


def save_png(image: np.ndarray, path) -> None:
    """Write one ``[H, W, C]`` uint8 image; the file appears complete or not at all."""
    from relaydiff.models.checkpoint import atomic_write
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image, "L" if image.shape[2] == 1 else "RGB")
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


def center_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> its centre ``min(H, W)`` square resized to ``size x size``
    (Lanczos: the resize itself should add no aliasing to the spectrum)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3]; got {image.dtype} {list(image.shape)}")
    h, w = image.shape[:2]
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    crop = Image.fromarray(np.ascontiguousarray(image[top:top + m, left:left + m]))
    return np.asarray(crop if m == size else crop.resize((size, size), Image.LANCZOS))


def square_array(im: Image.Image, name: str, size: int) -> np.ndarray:
    """``center_square(image_array(im, name), size)`` of an opened image, cropped first: the
    centre square is cut from the decoded image before any conversion, so the scratch beyond
    the decoded file is proportional to the square (a 20000 x 300 strip converts 300 x 300
    pixels, not all of them). Pixel-for-pixel equal to the uncropped way, since every
    conversion of :func:`image_array` is per pixel. Raises :class:`ImageError` naming ``name``."""
    w, h = im.size
    m = min(w, h)
    if m != max(w, h):
        left, top = (w - m) // 2, (h - m) // 2
        try:
            im = im.crop((left, top, left + m, top + m))   # decodes the file, keeps the square
        except _DECODE_ERRORS as e:
            raise ImageError(f"{name}: corrupt or truncated image ({' '.join(str(e).split()) or type(e).__name__})") \
                from None
    return center_square(image_array(im, name), size)


def load_image(path: str, channels: int = 3, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image file as ``[H, W, channels]`` uint8 (grey or RGB; alpha is dropped),
    resized to ``size = (H, W)`` with a Lanczos filter if given (:func:`read_image`)."""
    return read_image(path, str(path), channels, size)


def write_sample_manifest(folder: str, images: list[str], **extras) -> None:
    """Write ``folder/relaydiff-sample.json``: ``{"images": [file names], **extras}``, the
    generated images of the folder (``relaydiff sample`` also writes grid.png and low/ there)."""
    import json
    import pathlib

    from relaydiff.models.checkpoint import atomic_write
    text = json.dumps({"images": list(images), **extras}, indent=1) + "\n"
    atomic_write(os.path.join(folder, SAMPLE_MANIFEST), lambda tmp: pathlib.Path(tmp).write_text(text))


def read_sample_manifest(folder: str) -> list[str] | None:
    """The image names ``folder/relaydiff-sample.json`` lists (None without one); ``ValueError``
    naming the file for a malformed one or a name outside the folder."""
    import json
    path = os.path.join(folder, SAMPLE_MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        names = manifest["images"]
        complete = manifest.get("complete", True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ValueError(f"{path}: malformed sample list ({type(e).__name__})") from None
    if complete is False:
        raise ValueError(f"{folder!r} holds an unfinished relaydiff sample run; finish it with the same "
                         f"relaydiff sample command plus --resume")
    if not isinstance(names, list) or not all(isinstance(n, str) and n and os.path.basename(n) == n
                                                and n not in (".", "..") for n in names):
        raise ValueError(f"{path}: 'images' must list file names inside {folder!r}")
    return names


def list_images(folder: str) -> list[str]:
    """The image files directly inside ``folder``, sorted by name."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, f)))


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile ``[B, C, H, W]`` images into one ``[rows*(H+pad)+pad, ...]`` uint8 image, ``nrow``
    per row (default about square), separated by black ``pad``-pixel borders."""
    imgs = to_uint8(x)
    b, h, w, c = imgs.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = max(1, math.ceil(b / nrow))
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(b):
        r, q = divmod(i, nrow)
        y, xx = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, xx:xx + w] = imgs[i]
    return grid
