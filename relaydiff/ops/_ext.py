"""Loading the compiled extension ``relaydiff._C`` and deciding which backend runs."""
from __future__ import annotations

import os
import warnings

import torch

_BUILD_HINT = ("build it with `pip install -e . --no-build-isolation` from the relaydiff "
               "source tree (see README.md); until then the pure-PyTorch reference twins run")

_loaded = False
_load_error: str | None = None

if os.environ.get("RELAYDIFF_FORCE_REFERENCE", "") not in ("", "0"):
    _load_error = "RELAYDIFF_FORCE_REFERENCE is set"
else:
    try:
        from relaydiff import _C  # noqa: F401  (registers torch.ops.relaydiff.*)
        _loaded = True
    except ImportError as e:  # missing or built against another torch
        _load_error = str(e)
        warnings.warn(f"relaydiff: the compiled extension relaydiff._C could not be loaded ({e}); "
                      + _BUILD_HINT, RuntimeWarning, stacklevel=2)


def loaded() -> bool:
    return _loaded


def load_error() -> str | None:
    return _load_error


def _kernel_devices() -> frozenset[str]:
    if not _loaded:
        return frozenset()
    return frozenset(dev for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                     if torch._C._dispatch_has_kernel_for_dispatch_key("relaydiff::patch_dct", key))


# Decided once at import: a plain set lookup is also what torch.compile can trace.
_KERNEL_DEVICES = _kernel_devices()


def has_kernel(device_type: str) -> bool:
    """True when the extension has kernels for ``device_type`` ('cpu' or 'cuda')."""
    return device_type in _KERNEL_DEVICES


def backend() -> str:
    """Which implementation the ops use: 'cpp+cuda', 'cpp' or 'reference'."""
    if not _loaded:
        return "reference"
    return "cpp+cuda" if has_kernel("cuda") else "cpp"
