"""relaydiff.ops: the relay diffusion operators as PyTorch custom ops.

``torch.ops.relaydiff.*`` are the compiled kernels (C++ on CPU, CUDA on GPU); the functions
here validate arguments and fall back to the pure-PyTorch twins in
:mod:`relaydiff.ops.reference` when no kernel exists for a tensor's device.
``backend()`` says which implementation runs. ``linear_blur``, ``linear_relay_corrupt`` and
``linear_relay_step`` (CogView3's linear relay blur, SPEC 2b) are pure-PyTorch compositions.
"""
from . import _ext
from . import reference
from .api import (backend, block_noise, blur_factors, mixed_noise, patch_blur, patch_dct,
                  patch_idct, relay_corrupt, relay_step)
from .linear_blur import linear_blur, linear_relay_corrupt, linear_relay_step

if _ext.loaded():
    from . import _registration  # noqa: F401  (fake kernels and autograd)

__all__ = ["backend", "block_noise", "blur_factors", "mixed_noise", "patch_blur", "patch_dct",
           "patch_idct", "relay_corrupt", "relay_step", "linear_blur", "linear_relay_corrupt",
           "linear_relay_step", "reference"]
