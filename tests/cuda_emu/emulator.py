"""The CUDA tile kernel run on the CPU (emulate.cpp), with the op schemas of csrc/ops.cpp.

``build()`` compiles emulate.cpp with g++ against the CUDA headers (for the half types)
into a cache folder keyed by the sources' hash; the functions below take CPU tensors and
run the kernel's four phases thread by thread, raising ``EmulationError`` on a race, an
uninitialised or out-of-range access, or an output element not written exactly once.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "tests/cuda_emu/emulate.cpp", ROOT / "csrc/cuda/relay_kernels.cuh",
           ROOT / "csrc/cuda/relay_launch.h", ROOT / "csrc/common/philox.h",
           ROOT / "csrc/common/relay_math.h"]
DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
KIND_TRANSFORM, KIND_SCALE, KIND_NOISE = 0, 1, 2


class EmulationError(RuntimeError):
    pass


class ImageRef(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("stride", ctypes.c_int64 * 4)]


def cuda_include() -> pathlib.Path | None:
    """The CUDA toolkit's include folder (cuda_fp16.h), or None."""
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(pathlib.Path(os.path.realpath(nvcc)).parents[1]))
    for r in roots:
        if r and (pathlib.Path(r) / "include/cuda_fp16.h").exists():
            return pathlib.Path(r) / "include"
    return None


def build(cache: pathlib.Path | None = None) -> ctypes.CDLL:
    inc = cuda_include()
    if inc is None:
        raise FileNotFoundError("CUDA headers (cuda_fp16.h) not found; set CUDA_HOME")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    cache = cache or ROOT / "build" / "cuda_emu"
    cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"emulate-{digest}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([os.environ.get("CXX", "g++"), "-std=c++17", "-O1", "-shared", "-fPIC",
                        "-Wall", "-Wextra", "-Werror", f"-I{inc}", str(SOURCES[0]), "-o", str(tmp)],
                       check=True)
        tmp.rename(lib)
    return _bind(ctypes.CDLL(str(lib)))


def _bind(so: ctypes.CDLL) -> ctypes.CDLL:
    I, D, P, S = ctypes.c_int, ctypes.c_double, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
    R, RP, U = ImageRef, ctypes.POINTER(ImageRef), ctypes.c_uint64
    sigs = {
        "rd_emu_patch_transform": [I, S, R, P, I, I],
        "rd_emu_patch_blur": [I, S, R, P, P, I, D],
        "rd_emu_block_noise": [I, S, P, I, U],
        "rd_emu_mixed_noise": [I, S, P, D, I, I, U],
        "rd_emu_relay_corrupt": [I, S, R, P, P, P, I, D, I, D, I, U],
        "rd_emu_relay_step": [I, S, R, R, RP, RP, P, P, P, P, P, D, I, D, I, D, I, U],
    }
    for name, args in sigs.items():
        fn = getattr(so, name)
        fn.argtypes = args
        fn.restype = ctypes.c_char_p
    so.rd_emu_smem_bytes.argtypes = [I, I, I, I, I]
    so.rd_emu_smem_bytes.restype = ctypes.c_int64
    return so


class Emulator:
    """The ops of csrc/ops.cpp on CPU tensors, through the emulated CUDA kernel."""

    def __init__(self, so: ctypes.CDLL):
        self.so = so

    @staticmethod
    def _ref(t: torch.Tensor) -> ImageRef:
        return ImageRef(t.data_ptr(), (ctypes.c_int64 * 4)(*t.stride()))

    @staticmethod
    def _shape(t: torch.Tensor):
        return (ctypes.c_int64 * 4)(*t.shape)

    @staticmethod
    def _vec(v: torch.Tensor) -> torch.Tensor:
        return v.to(torch.float64).contiguous()

    @staticmethod
    def _out(like: torch.Tensor) -> torch.Tensor:
        # poisoned: an element the kernel misses stays NaN (the emulator also counts writes)
        return torch.full(like.shape, float("nan"), dtype=like.dtype)

    @staticmethod
    def _check(msg) -> None:
        if msg is not None:
            raise EmulationError(msg.decode())

    def patch_dct(self, x, p, inverse=False):
        out = self._out(x)
        self._check(self.so.rd_emu_patch_transform(DTYPES[x.dtype], self._shape(x), self._ref(x),
                                                   out.data_ptr(), p, int(inverse)))
        return out

    def patch_idct(self, u, p):
        return self.patch_dct(u, p, inverse=True)

    def patch_blur(self, x, tau, p, min_scale):
        out, tau = self._out(x), self._vec(tau)
        self._check(self.so.rd_emu_patch_blur(DTYPES[x.dtype], self._shape(x), self._ref(x),
                                              out.data_ptr(), tau.data_ptr(), p, min_scale))
        return out

    def block_noise(self, like, s, seed):
        out = self._out(like)
        self._check(self.so.rd_emu_block_noise(DTYPES[like.dtype], self._shape(like), out.data_ptr(),
                                               s, seed))
        return out

    def mixed_noise(self, like, alpha, s, normalize, seed):
        out = self._out(like)
        self._check(self.so.rd_emu_mixed_noise(DTYPES[like.dtype], self._shape(like), out.data_ptr(),
                                               alpha, s, int(normalize), seed))
        return out

    def relay_corrupt(self, x0, sigma, tau, p, alpha, s, min_scale, normalize, seed):
        out, sigma, tau = self._out(x0), self._vec(sigma), self._vec(tau)
        self._check(self.so.rd_emu_relay_corrupt(
            DTYPES[x0.dtype], self._shape(x0), self._ref(x0), out.data_ptr(), sigma.data_ptr(),
            tau.data_ptr(), p, alpha, s, min_scale, int(normalize), seed))
        return out

    def relay_step(self, x, den, xp, dp, sigma, sigma_next, tau, tau_next, s_noise, p, alpha, s,
                   min_scale, normalize, seed):
        out = self._out(x)
        vecs = [self._vec(v) for v in (sigma, sigma_next, tau, tau_next)]
        xpr = ctypes.pointer(self._ref(xp)) if xp is not None else None
        dpr = ctypes.pointer(self._ref(dp)) if dp is not None else None
        self._check(self.so.rd_emu_relay_step(
            DTYPES[x.dtype], self._shape(x), self._ref(x), self._ref(den), xpr, dpr, out.data_ptr(),
            *[v.data_ptr() for v in vecs], s_noise, p, alpha, s, min_scale, int(normalize), seed))
        return out

    def smem_bytes(self, dtype, kind, p, step, s) -> int:
        return self.so.rd_emu_smem_bytes(DTYPES[dtype], kind, p, int(step), s)
