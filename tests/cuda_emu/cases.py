"""The cases the CUDA tile kernel must get right, shared by the CPU emulation test and the
GPU test: every op over dtypes x patch sizes x shapes (partial 32 x 64 tiles, H != W,
batch 1, W not a multiple of 4) x input layouts, and the noise ops over block sizes 1..16
on images small enough to wrap around.

A backend is anything with the op schemas of csrc/ops.cpp as attributes:
``torch.ops.relaydiff``, :class:`cuda_emu.emulator.Emulator` or :data:`TWINS`.
"""
from __future__ import annotations

import dataclasses
import types

import torch

from relaydiff.ops import _ext
from relaydiff.ops import reference as R

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PATCH_SIZES = [2, 4, 8, 16]
# (B, C, H, W); tiles are 32 x 64, so these leave partial tiles in one or both directions
SHAPES = [(2, 3, 48, 80), (1, 1, 16, 48), (2, 2, 96, 64), (1, 2, 34, 130)]
NOISE_SHAPES = [(2, 3, 5, 7), (1, 1, 33, 65), (1, 2, 2, 2), (1, 1, 17, 1), (2, 1, 64, 64),
                (1, 1, 40, 130)]
LAYOUTS = ["contiguous", "channels_last", "strided", "misaligned", "expanded"]

TWINS = types.SimpleNamespace(
    patch_dct=R.patch_dct_impl, patch_idct=R.patch_idct_impl, patch_blur=R.patch_blur_impl,
    block_noise=R.block_noise_impl, mixed_noise=R.mixed_noise_impl,
    relay_corrupt=R.relay_corrupt_impl, relay_step=R.relay_step_impl)


def cpu_backend():
    """The CPU kernels when built, else the reference twins (the same results)."""
    return torch.ops.relaydiff if _ext.has_kernel("cpu") else TWINS


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` (or, for 'expanded', its first sample repeated) in the memory layout ``name``."""
    if name == "contiguous":
        return x.contiguous()
    if name == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if name == "strided":      # W stride 2
        wide = x.new_zeros(x.shape[:-1] + (2 * x.shape[-1],))
        wide[..., ::2] = x
        return wide[..., ::2]
    if name == "misaligned":   # contiguous strides, data pointer off 16-byte alignment
        flat = x.new_empty(x.numel() + 1)
        view = flat[1:].view(x.shape)
        view.copy_(x)
        return view
    if name == "expanded":     # batch stride 0
        return x[:1].expand(x.shape)
    raise ValueError(name)


def image(shape, dtype, device, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def per_sample(b: int, lo: float, hi: float, device, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(b, generator=g, dtype=torch.float64)).to(device)


@dataclasses.dataclass(frozen=True)
class Case:
    """One op call: ``args(device)`` builds the schema arguments on ``device``."""
    op: str
    dtype: torch.dtype
    shape: tuple
    patch_size: int = 4
    block_size: int = 4
    layout: str = "contiguous"
    heun: bool = False
    seed: int = 0

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        extra = "-heun" if self.heun else ""
        return (f"{self.op}{extra}-{dt}-p{self.patch_size}-s{self.block_size}-"
                f"{'x'.join(map(str, self.shape))}-{self.layout}")

    def args(self, device):
        b = self.shape[0]
        p, s, sd = self.patch_size, self.block_size, 1000 + self.seed
        x = layout(image(self.shape, self.dtype, device, self.seed), self.layout)
        if self.op in ("patch_dct", "patch_idct"):
            return (x, p)
        tau = per_sample(b, 0.0, 3.0, device, self.seed + 1)
        if self.op == "patch_blur":
            return (x, tau, p, 1e-3)
        if self.op == "block_noise":
            return (x, s, sd)
        if self.op == "mixed_noise":
            return (x, 0.3, s, self.seed % 2 == 0, sd)
        sigma = per_sample(b, 0.2, 1.2, device, self.seed + 2)
        if self.op == "relay_corrupt":
            sigma[0] = 0.0   # a sample without noise: its tiles skip the generator
            return (x, sigma, tau, p, 0.15, s, 1e-3, True, sd)
        if self.op == "relay_step":
            den = layout(image(self.shape, self.dtype, device, self.seed + 3), self.layout)
            xp = dp = None
            if self.heun:
                xp = layout(image(self.shape, self.dtype, device, self.seed + 4), self.layout)
                dp = layout(image(self.shape, self.dtype, device, self.seed + 5), self.layout)
            return (x, den, xp, dp, sigma, 0.7 * sigma, tau, 0.5 * tau, 0.2, p, 0.15, s, 1e-3,
                    False, sd)
        raise ValueError(self.op)

    def run(self, backend, device="cpu") -> torch.Tensor:
        return getattr(backend, self.op)(*self.args(device))


def kernel_cases(full: bool = True) -> list[Case]:
    """Every op x dtype x patch size x shape (x layout when ``full``; else two layouts)."""
    cases = []
    layouts = LAYOUTS if full else ["contiguous", "strided"]
    for dt in DTYPES:
        for p in PATCH_SIZES:
            for i, shape in enumerate(SHAPES):
                if shape[2] % p or shape[3] % p:
                    continue
                lay = layouts[(i + p) % len(layouts)] if not full else None
                for ly in ([lay] if lay else layouts):
                    seed = len(cases)
                    for op in ("patch_dct", "patch_idct", "patch_blur"):
                        cases.append(Case(op, dt, shape, p, layout=ly, seed=seed))
                    s = (1, 3, 4, 16)[(i + p) % 4]
                    s = min(s, shape[2], shape[3])
                    cases.append(Case("relay_corrupt", dt, shape, p, s, ly, seed=seed))
                    cases.append(Case("relay_step", dt, shape, p, 4, ly, seed=seed))
                    cases.append(Case("relay_step", dt, shape, p, 5, ly, heun=True, seed=seed))
    return cases


def noise_cases() -> list[Case]:
    """block_noise and mixed_noise for every block size that fits each (tiny) image."""
    cases = []
    for dt in DTYPES:
        for shape in NOISE_SHAPES:
            for s in range(1, min(16, shape[2], shape[3]) + 1):
                for op in ("block_noise", "mixed_noise"):
                    cases.append(Case(op, dt, shape, block_size=s, seed=len(cases)))
    return cases


# float32: a few float32 roundings of values up to ~6 (the noise); float64 likewise
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12)}
# half types: both sides round one float32 result: at most one ulp (eps * |value|) apart
HALF_EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def assert_match(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """``got`` equals ``want`` up to the rounding of two float computations of one formula."""
    assert got.shape == want.shape and got.dtype == want.dtype == dtype, (got.shape, want.shape)
    g, w = got.detach().cpu().double(), want.detach().cpu().double()
    assert not g.isnan().any(), f"{what}: NaN in the output (unwritten element?)"
    if dtype in TOL:
        atol, rtol = TOL[dtype]
    else:
        atol, rtol = 1e-5, HALF_EPS[dtype]
    torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
