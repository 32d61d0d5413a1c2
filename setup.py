"""Builds relaydiff and its extension relaydiff._C against the installed torch.

    pip install -e . --no-build-isolation

CPU kernels are always built. CUDA kernels are built when torch has CUDA and nvcc is found
(CUDA_HOME), unless RELAYDIFF_BUILD_CUDA=0; RELAYDIFF_BUILD_CUDA=1 forces them (and fails
loudly if that is impossible). TORCH_CUDA_ARCH_LIST is honoured; its default here is
"8.0;9.0" (A100 and H100 class GPUs; add yours, e.g. "8.6;8.9", to the variable).
"""
import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _want_cuda() -> bool:
    flag = os.environ.get("RELAYDIFF_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no"):
        return False
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag in ("1", "true", "yes"):
        if not available:
            sys.exit("RELAYDIFF_BUILD_CUDA=1 but torch has no CUDA (torch.version.cuda="
                     f"{torch.version.cuda}) or nvcc was not found (CUDA_HOME={cpp_extension.CUDA_HOME})")
        return True
    return available


def extensions():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/ops.cpp") + rel("csrc/cpu/*.cpp")
    # -ffp-contract=off: no FMA contraction, so the CPU kernels give the same bits on every
    # x86-64 (the noise generator is compiled for several instruction sets). -g0 undoes the
    # -g in Python's CFLAGS (halves the build time). No -march=native: wheels must be portable.
    # -fopenmp: at::parallel_for only runs in parallel in code compiled with OpenMP.
    cxx = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-g0", "-fopenmp"]
    link = ["-fopenmp"]
    if os.environ.get("RELAYDIFF_DEBUG"):
        cxx = ["-O0", "-g", "-fopenmp"]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
        # Approximate float division and sqrt (<= 2 ulp; the Box-Muller transform spells out
        # the same instructions in philox.h); CUDA noise stays within ~1e-6 of the CPU's
        # (docs/cuda.md). Not --use_fast_math: it also flushes denormals to zero.
        nvcc = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr", "-prec-div=false",
                "-prec-sqrt=false"]
        min_blocks = os.environ.get("RELAYDIFF_CUDA_MIN_BLOCKS", "")  # occupancy experiment knob
        if min_blocks:
            if not min_blocks.isdigit() or not 1 <= int(min_blocks) <= 8:
                raise SystemExit(f"RELAYDIFF_CUDA_MIN_BLOCKS must be an integer in 1..8; got {min_blocks!r}")
            nvcc.append(f"-DRELAYDIFF_CUDA_MIN_BLOCKS={int(min_blocks)}")
        return [cpp_extension.CUDAExtension("relaydiff._C", sources,
                                            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                            extra_link_args=link, py_limited_api=False)]
    return [cpp_extension.CppExtension("relaydiff._C", sources, extra_compile_args={"cxx": cxx},
                                       extra_link_args=link)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
