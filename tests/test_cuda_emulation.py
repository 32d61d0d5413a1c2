"""The CUDA kernels' device code, run on the CPU (tests/cuda_emu): no GPU needed.

csrc/cuda/relay_kernels.cuh is compiled with g++ and each thread block's four phases run
thread by thread under a shared-memory race / uninitialised-read detector; its outputs must
equal the CPU kernels' (or twins') for every op, dtype, patch size, block size, partial
tile and input layout. What this cannot see: the GPU's own arithmetic (FMA contraction, the
approximate division / sqrt of the noise transform) and launch errors: tests/test_ops_cuda.py
on a GPU.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from relaydiff.ops import reference as R
from relaydiff.ops._philox import STREAM_WHITE, philox_normal

from cuda_emu import cases as K
from cuda_emu.emulator import KIND_NOISE, KIND_SCALE, KIND_TRANSFORM, Emulator, build, cuda_include


@pytest.fixture(scope="module")
def emu() -> Emulator:
    if shutil.which("g++") is None or cuda_include() is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_fp16.h) to build the emulator")
    return Emulator(build())


# Every dtype x patch size x shape, each with one of the layouts; the full layout matrix
# runs for float32 (all 16-byte paths) and bfloat16 (8 elements per 16-byte access).
CASES = [c for c in K.kernel_cases(full=True) if c.dtype in (torch.float32, torch.bfloat16)] + \
        [c for c in K.kernel_cases(full=False) if c.dtype in (torch.float64, torch.float16)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_matches_cpu(emu, case):
    K.assert_match(case.run(emu), case.run(K.cpu_backend()), case.dtype, case.id)


@pytest.mark.parametrize("case", K.noise_cases(), ids=lambda c: c.id)
def test_noise_matches_cpu(emu, case):
    """Wrap-around halos of every block size on images down to 1 pixel wide."""
    K.assert_match(case.run(emu), case.run(K.cpu_backend()), case.dtype, case.id)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_white_noise_is_the_generator(emu, dtype):
    """Stream 0 element by element, against the pure-PyTorch float64 Philox + Box-Muller."""
    like = torch.empty(2, 3, 37, 70, dtype=dtype)
    got = emu.mixed_noise(like, 0.0, 1, True, 2 ** 40 + 3)
    want = philox_normal(like.numel(), 2 ** 40 + 3, STREAM_WHITE).reshape(like.shape)
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)


def test_zero_size(emu):
    for shape in [(0, 3, 8, 8), (2, 0, 8, 8), (2, 3, 0, 8)]:
        x = torch.empty(shape)
        assert emu.patch_dct(x, 4).shape == shape
        assert emu.mixed_noise(x, 0.2, 4, True, 1).shape == shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rule(emu, dtype):
    """Kernel error vs the float64 oracle <= 2x the error of the twin run in the half type."""
    x = K.image((2, 3, 48, 80), dtype, "cpu", 5)
    sigma, tau = torch.tensor([0.5, 1.0], dtype=torch.float64), torch.tensor([0.3, 2.0], dtype=torch.float64)
    args = (sigma, tau, 4, 0.15, 4, 1e-3, True, 9)
    oracle = R.relay_corrupt_impl(x.double(), *args)
    err_kernel = (emu.relay_corrupt(x, *args).double() - oracle).abs().max()
    err_twin = (R.relay_corrupt_impl(x, *args).double() - oracle).abs().max()
    assert err_kernel <= 2 * err_twin


@pytest.mark.parametrize("dtype", K.DTYPES)
def test_shared_memory_fits(emu, dtype):
    """Every configuration fits an H100 block (227 KB) and two blocks per SM."""
    for kind, p, step in [(KIND_TRANSFORM, 16, 0), (KIND_SCALE, 16, 1), (KIND_NOISE, 1, 0)]:
        for s in (1, 4, 16):
            n = emu.smem_bytes(dtype, kind, p, step, s)
            assert 0 < n <= 113 * 1024, (dtype, kind, p, step, s, n)

