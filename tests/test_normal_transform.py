"""The float32 Box-Muller transform of csrc/common/philox.h, checked over every input.

tests/native/normal_transform.cpp is compiled with g++ (as the CPU kernels are, with
-ffp-contract=off) and walks all 2^23 radius inputs and all 2^24 angle inputs. It checks that
the conversion-free construction of u, the quadrant and the reduced angle gives exactly the
values of their plain definitions, and measures the transform's error against float64 libm.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "tests/native/normal_transform.cpp", ROOT / "csrc/common/philox.h"]


@pytest.fixture(scope="module")
def stats() -> dict[str, float]:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx})")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    cache = ROOT / "build" / "native"
    cache.mkdir(parents=True, exist_ok=True)
    exe = cache / f"normal_transform-{digest}"
    if not exe.exists():
        tmp = exe.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Werror",
                        str(SOURCES[0]), "-o", str(tmp)], check=True)
        tmp.rename(exe)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {k: float(v) for k, v in (kv.split("=") for kv in out.split())}


def test_conversion_free_inputs_are_exact(stats):
    """u = (1 + k 2^-23) - (1 - 2^-24), q and x from the integer angle: the same bits as
    unit_open / unit_halfopen and the float quadrant reduction, for every input."""
    assert stats["u_mismatch"] == 0
    assert stats["q_mismatch"] == 0
    assert stats["x_mismatch"] == 0


def test_transform_error_against_float64(stats):
    """Bounds a little above the measured maxima (radius 1.57e-7 relative, sin/cos 8.3e-8,
    normals 5.3e-7 for |n| <= 5.8): about 2 float32 ulps, 10x tighter than the 1e-5 that the
    op tests allow between devices, so a broken polynomial or reduction shows up here first."""
    assert stats["radius_rel"] < 2.5e-7, stats
    assert stats["trig_abs"] < 1.2e-7, stats
    assert stats["normal_abs"] < 1.0e-6, stats
