"""Shared test matrix (in the spirit of pytorch_scatter's testing.py) and oracles."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

from relaydiff.ops import _ext

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FULL_DTYPES = [torch.float32, torch.float64]
PATCH_SIZES = [2, 4, 8, 16]

DEVICES = ["cpu"]
if torch.cuda.is_available():
    DEVICES.append("cuda")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def needs_kernel(device: str):
    """Skip a test that exercises the compiled kernels when they are absent for ``device``."""
    if not _ext.has_kernel(device):
        pytest.skip(f"relaydiff._C has no {device} kernels (backend: {_ext.backend()})")


# ------------------------------------------------------------------ independent oracles

def dct_oracle(x: torch.Tensor, p: int, inverse: bool = False) -> torch.Tensor:
    """Patch-wise orthonormal DCT-II (DCT-III for ``inverse``) with scipy, in float64."""
    a = x.detach().cpu().double().numpy()
    b, c, h, w = a.shape
    patches = a.reshape(b, c, h // p, p, w // p, p)
    kind = 3 if inverse else 2
    out = scipy.fft.dct(scipy.fft.dct(patches, type=kind, axis=3, norm="ortho"), type=kind, axis=5,
                        norm="ortho")
    return torch.from_numpy(np.ascontiguousarray(out.reshape(b, c, h, w)))


def box_oracle(g: torch.Tensor, s: int) -> torch.Tensor:
    """``(1/s) sum_{a,b<s} g[(y-a) mod H, (x-b) mod W]`` by rolls (SPEC 3)."""
    out = torch.zeros_like(g)
    for a in range(s):
        for b in range(s):
            out += torch.roll(g, shifts=(a, b), dims=(2, 3))
    return out / s


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(autouse=True)
def _restore_image_cap():
    """``--max-image-pixels`` sets a process-wide cap; a test that lowers it must not leak it."""
    import relaydiff.images as images
    from PIL import Image
    pil = Image.MAX_IMAGE_PIXELS
    yield
    images.MAX_IMAGE_PIXELS = images.DEFAULT_MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = pil
