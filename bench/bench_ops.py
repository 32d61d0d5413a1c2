"""CPU benchmarks of the relay ops (pytest-benchmark). Run:

    pytest bench/bench_ops.py --benchmark-group-by=param:shape,func --benchmark-columns=median,iqr,rounds

For each op and shape: the C++ kernel, the reference twin (pure PyTorch, its own Philox),
torch.compile of the twin, and the best plain-PyTorch composition (bench/composition.py,
torch.randn noise). `randn_like x2` is the floor any version pays to draw its two noise
fields with torch's generator.

torch.compile of the twins that draw noise is left out: inductor had not finished
compiling the pure-PyTorch Philox (10 unrolled rounds of int64 arithmetic) of
`mixed_noise` after 10 minutes on this 2-core machine (torch 2.13.0). The compiled
twin is measured for the noise-free `patch_dct`.
"""
from __future__ import annotations

import pytest
import torch

import relaydiff.ops as O
from relaydiff.ops import _ext
from relaydiff.ops import reference as R

import composition as C

SHAPES = {"8x3x256x256": (8, 3, 256, 256), "64x3x64x64": (64, 3, 64, 64)}

pytestmark = pytest.mark.skipif(not _ext.has_kernel("cpu"), reason="relaydiff._C not built")


def _inputs(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    den = torch.randn(shape, generator=g)
    b = shape[0]
    sig = torch.linspace(0.2, 2.0, b, dtype=torch.float64)
    tau = torch.linspace(0.1, 3.0, b, dtype=torch.float64)
    return x, den, sig, tau


_compiled = {}


def _compiled_twin(name, fn):
    if name not in _compiled:
        _compiled[name] = torch.compile(fn)
    return _compiled[name]


IMPLS = ["kernel", "twin", "compiled_twin", "composition"]


NOISE_FREE = {"patch_dct"}


def _run(benchmark, op, impl, shape):
    if impl == "compiled_twin" and op not in NOISE_FREE:
        pytest.skip("inductor does not finish compiling the twin's Philox (see module docstring)")
    x, den, sig, tau = _inputs(shape)
    benchmark.group = f"{op} {shape}"
    benchmark.extra_info["impl"] = impl
    if op == "relay_corrupt":
        fns = {"kernel": lambda: O.relay_corrupt(x, sig, tau, seed=1),
               "twin": lambda: R.relay_corrupt_impl(x, sig, tau, 4, 0.15, 4, 1e-3, True, 1),
               "compiled_twin": lambda: _compiled_twin(op, R.relay_corrupt_impl)(x, sig, tau, 4, 0.15, 4, 1e-3, True, 1),
               "composition": lambda: C.corrupt(x, sig, tau)}
    elif op == "relay_step":
        sn, tn = sig * 0.5, tau * 0.5
        fns = {"kernel": lambda: O.relay_step(x, den, sig, sn, tau, tn, seed=1),
               "twin": lambda: R.relay_step_impl(x, den, None, None, sig, sn, tau, tn, 0.2, 4, 0.15, 4, 1e-3, True, 1),
               "compiled_twin": lambda: _compiled_twin(op, R.relay_step_impl)(x, den, None, None, sig, sn, tau, tn, 0.2, 4, 0.15, 4, 1e-3, True, 1),
               "composition": lambda: C.step(x, den, sig, sn, tau, tn)}
    elif op == "patch_dct":
        fns = {"kernel": lambda: O.patch_dct(x, 4),
               "twin": lambda: R.patch_dct_impl(x, 4),
               "compiled_twin": lambda: _compiled_twin(op, R.patch_dct_impl)(x, 4),
               "composition": lambda: C.dct(x, 4)}
    elif op == "mixed_noise":
        fns = {"kernel": lambda: O.mixed_noise(x, seed=1),
               "twin": lambda: R.mixed_noise_impl(x, 0.15, 4, True, 1),
               "compiled_twin": lambda: _compiled_twin(op, R.mixed_noise_impl)(x, 0.15, 4, True, 1),
               "composition": lambda: C.mixed_noise(x, 0.15, 4)}
    fn = fns[impl]
    fn()  # warm-up (and compilation)
    benchmark.pedantic(fn, rounds=5 if impl in ("twin", "compiled_twin") else 20, warmup_rounds=1)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["relay_corrupt", "relay_step", "patch_dct", "mixed_noise"])
def test_op(benchmark, op, impl, shape):
    _run(benchmark, op, impl, SHAPES[shape])


@pytest.mark.parametrize("shape", list(SHAPES))
def test_randn_like_twice(benchmark, shape):
    x = torch.empty(SHAPES[shape])
    benchmark.group = f"randn_like x2 {SHAPES[shape]}"
    benchmark.pedantic(lambda: (torch.randn_like(x), torch.randn_like(x)), rounds=20, warmup_rounds=1)
