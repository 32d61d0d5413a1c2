"""The C++ checks' error messages when the extension carries its own copy of libstdc++.

On a GPU machine whose compiler (/opt/gcc) linked libstdc++ statically into relaydiff._C, a
bad direct call such as ``torch.ops.relaydiff.patch_dct(x, 3)`` segfaulted
(bench/results/h200_2026-12-04.md; on the H100, ``patch_dct`` of an H not a multiple of 4): TORCH_CHECK streams its arguments through std::ostream,
and inserting a number into a stream whose locale came from the process's other libstdc++
fails in num_put (strings print fine). Built the same way on this CPU, the number is
silently missing instead ("got "). The checks now format numbers and shapes themselves
(csrc/common/checks.h). This builds the CPU extension of this checkout with
``-static-libstdc++`` in a scratch folder (cached by source hash, ~1 min on 2 cores the first
time) and checks that bad direct calls name their numbers.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ["setup.py", "pyproject.toml", "csrc", "relaydiff"]

# (direct call, text its error must contain)
CALLS = textwrap.dedent("""
    import json, sys, torch
    import relaydiff, relaydiff.ops
    K = torch.ops.relaydiff
    x = torch.randn(2, 1, 8, 8)
    cases = {
        "patch_size": (lambda: K.patch_dct(x, 3), "got 3"),
        "odd_shape": (lambda: K.patch_dct(torch.randn(1, 1, 6, 8), 4), "patch_size=4; got shape [1, 1, 6, 8]"),
        "dims": (lambda: K.patch_dct(torch.randn(8, 8), 4), "got 2-D [8, 8]"),
        "alpha": (lambda: K.mixed_noise(x, -0.5, 2, True, 1), "got -0.5"),
        "block": (lambda: K.block_noise(torch.randn(1, 1, 2, 2), 5, 1), "block_size=5 is larger than the image [1, 1, 2, 2]"),
        "per_sample": (lambda: K.patch_blur(x, torch.ones(3), 4, 1e-3), "[B] = [2]; got [3]"),
        "tau_value": (lambda: K.patch_blur(x, torch.tensor([0.1, float("inf")], dtype=torch.float64), 4, 1e-3), "got inf"),
        "min_scale": (lambda: K.relay_corrupt(x, torch.ones(2), torch.ones(2), 4, 0.15, 4, 1.5, True, 1), "got 1.5"),
        "seed": (lambda: K.block_noise(x, 2, -3), "got -3"),
    }
    out = {"module": relaydiff.__file__}
    for name, (call, want) in cases.items():
        try:
            call()
            out[name] = [None, want]
        except RuntimeError as e:
            out[name] = [str(e).splitlines()[0], want]
    print(json.dumps(out))
""")


def _source_hash() -> str:
    h = hashlib.sha256()
    for rel in SOURCES:
        p = ROOT / rel
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*")
                                               if f.is_file() and f.suffix in {".py", ".cpp", ".h", ".cu", ".cuh", ".toml"})
        for f in files:
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def static_build() -> pathlib.Path:
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    work = ROOT / "build" / "static_libstdcxx" / _source_hash()
    if not (work / "ok").exists():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for rel in SOURCES:
            src = ROOT / rel
            if src.is_file():
                shutil.copy2(src, work / rel)
            else:
                shutil.copytree(src, work / rel, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        env = dict(os.environ, LDFLAGS="-static-libstdc++", RELAYDIFF_BUILD_CUDA="0",
                   MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
        r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=1200)
        if r.returncode != 0:
            if "relocation" in r.stderr or "cannot find -lstdc++" in r.stderr:
                pytest.skip("this toolchain cannot link libstdc++ statically into a shared object")
            pytest.fail("the -static-libstdc++ build failed:\n" + (r.stdout + r.stderr)[-3000:])
        (work / "ok").write_text("built\n")
    return work


def test_messages_name_their_numbers_with_a_private_libstdcxx(static_build):
    r = subprocess.run([sys.executable, "-c", CALLS], cwd=static_build, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(static_build)), timeout=300)
    assert r.returncode == 0, f"the child died ({r.returncode}):\n{r.stderr[-3000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert pathlib.Path(out.pop("module")).is_relative_to(static_build), "loaded the wrong relaydiff"
    bad = {name: got for name, (got, want) in out.items() if got is None or want not in got}
    assert not bad, f"messages without their numbers: {bad}"
