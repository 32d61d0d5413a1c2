"""pytest-benchmark of the CUDA kernels vs the reference twins (eager and torch.compile).

    pytest bench/bench_ops_cuda.py --benchmark-columns=median,rounds

Each benchmark's extra_info holds the bytes that must move (inputs read once + output
written once), the achieved GB/s and its fraction of the device-to-device copy bandwidth
measured in the same session. Every call is followed by a synchronize, so the times are
wall times of whole calls; bench/gpu_bench.py times with CUDA events instead (the numbers
in docs/cuda.md). Skipped without a CUDA device or without CUDA kernels.
"""
from __future__ import annotations

import pytest
import torch

from relaydiff.ops import _ext

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.has_kernel("cuda")),
                                reason="needs a CUDA device and relaydiff's CUDA kernels")

from gpu_bench import DTYPES, SHAPES, copy_bandwidth, input_sets, make_ops, row_bytes  # noqa: E402

OPS = make_ops()
# torch.compile of the twins takes long to compile: only these get a compiled variant
COMPILED = {("relay_corrupt", SHAPES[1], torch.float32), ("patch_dct", SHAPES[1], torch.float32)}


@pytest.fixture(scope="module")
def copy_gbs():
    return copy_bandwidth()


def _bench(benchmark, fn, sets, nbytes, copy_gbs):
    state = {"i": 0}

    def call():
        fn(*sets[state["i"] % len(sets)])
        state["i"] += 1
        torch.cuda.synchronize()

    call()
    benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=2)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(bytes=nbytes, GBps=nbytes / median / 1e9,
                                frac_copy=nbytes / median / 1e9 / copy_gbs, copy_GBps=copy_gbs)


PARAMS = [(op, shape, dt) for op in OPS for shape in SHAPES for dt in DTYPES]
IDS = [f"{op}-{'x'.join(map(str, s))}-{str(d).replace('torch.', '')}" for op, s, d in PARAMS]


@pytest.mark.parametrize("impl", ["kernel", "eager", "compiled"])
@pytest.mark.parametrize("op,shape,dtype", PARAMS, ids=IDS)
def test_op(benchmark, copy_gbs, impl, op, shape, dtype):
    n_in, kernel, twin = OPS[op]
    if impl == "compiled" and (op, shape, dtype) not in COMPILED:
        pytest.skip("compiled only for " + ", ".join(o for o, _, _ in sorted(COMPILED, key=str)))
    fn = {"kernel": kernel, "eager": twin}.get(impl)
    if impl == "compiled":
        fn = torch.compile(twin, fullgraph=True, dynamic=False)
    benchmark.group = f"{op} {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')}"
    sets = input_sets(n_in, shape, dtype)
    _bench(benchmark, fn, sets if impl == "kernel" else sets[:2], row_bytes(n_in, shape, dtype),
           copy_gbs)
