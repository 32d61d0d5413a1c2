"""Argument checks shared by the public wrappers and the reference twins.

Every message names the argument and what was expected. Checks of tensor *values*
(NaN, sign) are skipped while torch.compile traces, where they would break the graph;
the C++ CPU kernels repeat them.
"""
from __future__ import annotations

import numbers

import torch

PATCH_SIZES = (2, 4, 8, 16)
MAX_BLOCK_SIZE = 16
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SEED_MAX = 2 ** 63 - 1
# The largest sigma, sigma_next and alpha accepted: noise is computed in float32 for float32
# and half inputs, and sigma * alpha * (a block-noise sample) must stay far below float32's
# 3.4e38 for every intermediate to be finite. Larger values are refused, not turned into inf.
MAX_SCALE = 1e15


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def check_image(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, C, H, W]; got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor [B, C, H, W]; got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must have dtype float32, float64, float16 or bfloat16; got {x.dtype}")
    return x


def check_patch_size(patch_size, name: str = "patch_size") -> int:
    if isinstance(patch_size, bool) or not isinstance(patch_size, numbers.Integral) \
            or int(patch_size) not in PATCH_SIZES:
        raise ValueError(f"{name} must be one of {PATCH_SIZES}; got {patch_size!r}")
    return int(patch_size)


def check_divisible(x: torch.Tensor, p: int, name: str) -> None:
    h, w = x.shape[-2:]
    if h % p or w % p:
        raise ValueError(
            f"{name}: H and W must be multiples of patch_size={p}; got H={h}, W={w} "
            f"(shape {tuple(x.shape)})")


def check_block_size(block_size, x: torch.Tensor, name: str = "block_size") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) \
            or not 1 <= int(block_size) <= MAX_BLOCK_SIZE:
        raise ValueError(f"{name} must be an integer in [1, {MAX_BLOCK_SIZE}]; got {block_size!r}")
    h, w = x.shape[-2:]
    if x.numel() > 0 and block_size > min(h, w):
        raise ValueError(f"{name}={block_size} is larger than the image (H={h}, W={w})")
    return int(block_size)


def check_scalar(v, name: str, *, low: float = 0.0, high: float = float("inf"),
                 high_inclusive: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(v).__name__}")
    v = float(v)
    ok = v >= low and (v <= high if high_inclusive else v < high)
    if not ok or v != v:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}; got {v}")
    return v


def check_seed(seed) -> int:
    """A seed in [0, 2^63); None draws one from torch's global (CPU) generator."""
    if seed is None:
        return int(torch.randint(0, SEED_MAX, (), dtype=torch.int64).item())
    if isinstance(seed, torch.Tensor) and seed.numel() == 1 and not seed.is_floating_point():
        seed = int(seed.item())
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be None or an integer in [0, 2^63 - 1]; got {seed!r}")
    return int(seed)


def _bad_values(t: torch.Tensor, positive: bool, high: float) -> torch.Tensor:
    return ~torch.isfinite(t) | ((t <= 0) if positive else (t < 0)) | (t > high)


def per_sample(v, name: str, batch: int, device, *, positive: bool = False,
               high: float = float("inf")) -> torch.Tensor:
    """A Python number, 0-d tensor or ``[B]`` tensor -> float64 tensor ``[B]`` on ``device``,
    every value finite, non-negative (``positive``: > 0) and at most ``high``. The values of a
    tensor on the meta device are unknown and not checked (shape inference only)."""
    if isinstance(v, torch.Tensor):
        if not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{name} must be a float or a floating tensor of shape [B]; got dtype {v.dtype}")
        if v.dim() == 0:
            v = v.reshape(1).expand(batch)
        elif v.dim() != 1 or v.shape[0] != batch:
            raise ValueError(
                f"{name} must be a float or a tensor of shape [B] = [{batch}]; got shape {tuple(v.shape)}")
        if v.device != torch.device(device) and v.device.type != "cpu":
            raise ValueError(f"{name} is on {v.device} but the images are on {device}")
        t = v.detach().to(device=device, dtype=torch.float64)
    else:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a float or a tensor of shape [B]; got {type(v).__name__}")
        # a number is checked as a number: no device round trip, and it works for meta tensors
        if bool(_bad_values(torch.tensor(float(v), dtype=torch.float64), positive, high)):
            _value_error(name, v, positive, high)
        return torch.full((batch,), float(v), dtype=torch.float64, device=device)
    if not _tracing() and t.numel() > 0 and t.device.type != "meta" and bool(_bad_values(t, positive, high).any()):
        _value_error(name, v.tolist(), positive, high)
    return t


def _value_error(name: str, got, positive: bool, high: float):
    want = "positive" if positive else "non-negative"
    limit = f" and at most {high:g} (larger values overflow float32)" if high != float("inf") else ""
    raise ValueError(f"{name} must be finite and {want}{limit}; got {got}")


def check_same_device(ref: torch.Tensor, ref_name: str, **others) -> None:
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                             "all image tensors must be on one device")


def check_like(ref: torch.Tensor, ref_name: str, **others) -> None:
    for name, t in others.items():
        if t is None:
            continue
        check_image(t, name)
        if t.shape != ref.shape:
            raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}; got {tuple(t.shape)}")
        if t.dtype != ref.dtype:
            raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}); got {t.dtype}")
    check_same_device(ref, ref_name, **others)
