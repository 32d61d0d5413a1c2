"""The CUDA kernels on a GPU: against the CPU kernels and the reference twins for every op,
dtype, patch size, shape and layout, noise equal across devices element by element,
opcheck, torch.compile, streams, bad input, a large shape and 64-bit offsets.

Skipped without a CUDA device. With a device but without CUDA kernels in relaydiff._C the
tests skip too, unless RELAYDIFF_REQUIRE_CUDA=1 (bench/gpu_check.sh sets it): then they fail.
"""
from __future__ import annotations

import os

import pytest
import torch

import relaydiff.ops as O
from relaydiff.ops import _ext
from relaydiff.ops._philox import STREAM_BLOCK, STREAM_WHITE, philox_normal

from cuda_emu import cases as K

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

OPS = torch.ops.relaydiff


@pytest.fixture(scope="module", autouse=True)
def cuda_kernels():
    if not _ext.has_kernel("cuda"):
        msg = f"relaydiff._C has no CUDA kernels (backend: {_ext.backend()}, {_ext.load_error()})"
        if os.environ.get("RELAYDIFF_REQUIRE_CUDA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


# the full layout matrix for float32 and bfloat16, one layout per shape for the others
CASES = [c for c in K.kernel_cases(full=True) if c.dtype in (torch.float32, torch.bfloat16)] + \
        [c for c in K.kernel_cases(full=False) if c.dtype in (torch.float64, torch.float16)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_matches_cpu_and_twin(case):
    got = case.run(OPS, "cuda")
    K.assert_match(got, case.run(K.cpu_backend(), "cpu"), case.dtype, case.id + " vs CPU")
    if case.layout == "contiguous":
        K.assert_match(got, case.run(K.TWINS, "cuda"), case.dtype, case.id + " vs twin")


@pytest.mark.parametrize("case", K.noise_cases(), ids=lambda c: c.id)
def test_noise_matches_cpu(case):
    K.assert_match(case.run(OPS, "cuda"), case.run(K.cpu_backend(), "cpu"), case.dtype, case.id)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stream", [STREAM_WHITE, STREAM_BLOCK])
def test_noise_equal_across_devices(dtype, stream):
    """The same seed gives the same field on CUDA, on the CPU and in the float64 generator,
    element by element (float32: polynomial log/sincos, approximate division and sqrt)."""
    like = torch.empty(2, 3, 256, 322, dtype=dtype)
    seed = 2 ** 40 + 17
    if stream == STREAM_WHITE:
        f = lambda t: OPS.mixed_noise(t, 0.0, 1, True, seed)
    else:
        f = lambda t: OPS.block_noise(t, 1, seed)   # block size 1: the source field itself
    got = f(like.cuda()).cpu().double()
    want = philox_normal(like.numel(), seed, stream).reshape(like.shape)
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    torch.testing.assert_close(got, f(like).double(), atol=atol, rtol=0)


def _opcheck_samples():
    d = "cuda"
    x = torch.randn(2, 3, 16, 32, device=d)
    y = torch.randn(2, 3, 16, 32, device=d)
    v = lambda *a: torch.tensor(a, dtype=torch.float64, device=d)
    return {
        "patch_dct": (x, 4),
        "patch_idct": (x, 8),
        "patch_blur": (x, v(0.5, 2.0), 4, 1e-3),
        "block_noise": (x, 4, 3),
        "mixed_noise": (x, 0.15, 4, True, 3),
        "relay_corrupt": (x, v(0.5, 1.0), v(0.3, 1.5), 4, 0.15, 4, 1e-3, True, 5),
        "relay_step": (x, y, None, None, v(1.0, 2.0), v(0.5, 1.0), v(0.3, 1.5), v(0.2, 1.0),
                       0.2, 4, 0.15, 4, 1e-3, True, 5),
    }


@pytest.mark.parametrize("op", ["patch_dct", "patch_idct", "patch_blur", "block_noise",
                                "mixed_noise", "relay_corrupt", "relay_step"])
def test_opcheck(op):
    args = _opcheck_samples()[op]
    if op in ("patch_dct", "patch_idct", "patch_blur", "relay_corrupt"):
        args = (args[0].requires_grad_(),) + args[1:]
    torch.library.opcheck(getattr(OPS, op).default, args)


def test_compile_fullgraph():
    x = torch.randn(2, 3, 32, 64, device="cuda")
    sigma = torch.tensor([0.5, 1.0], device="cuda", dtype=torch.float64)

    def f(x):
        u = O.patch_idct(O.patch_dct(x, 4) * 2.0, 4)
        xt = O.relay_corrupt(u, sigma, 0.7, seed=3)
        return O.relay_step(xt, u, sigma, 0.5 * sigma, 0.7, 0.3, seed=4) + O.mixed_noise(x, seed=5)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


def test_gradients_on_cuda():
    x = torch.randn(1, 2, 8, 16, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: O.patch_dct(t, 4), (x,))
    assert torch.autograd.gradcheck(lambda t: O.relay_corrupt(t, 0.3, 0.8, seed=1), (x,))


def test_current_stream_and_device_guard():
    x = torch.randn(2, 3, 64, 64, device="cuda")
    want = O.relay_corrupt(x, 0.5, 1.0, seed=7)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = O.relay_corrupt(x, 0.5, 1.0, seed=7)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_zero_size():
    for shape in [(0, 3, 8, 8), (2, 0, 8, 8), (2, 3, 0, 8)]:
        x = torch.empty(shape, device="cuda")
        assert OPS.patch_dct(x, 4).shape == shape
        assert O.mixed_noise(x, seed=1).shape == shape
        assert O.relay_corrupt(x, 0.5, 0.5, seed=1).shape == shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rule(dtype):
    """Kernel error vs the float64 oracle <= 2x the error of the twin run in the half type."""
    x = K.image((4, 3, 64, 96), dtype, "cuda", 5)
    den = K.image((4, 3, 64, 96), dtype, "cuda", 6)
    v = lambda *a: torch.tensor(a, dtype=torch.float64, device="cuda")
    sig, tau = v(0.5, 1.0, 2.0, 0.1), v(0.3, 2.0, 0.0, 1.0)
    calls = {
        "patch_dct": lambda m, t: m.patch_dct(t, 4),
        "patch_blur": lambda m, t: m.patch_blur(t, tau, 8, 1e-3),
        "relay_corrupt": lambda m, t: m.relay_corrupt(t, sig, tau, 4, 0.15, 4, 1e-3, True, 9),
        "relay_step": lambda m, t: m.relay_step(t, den if t.dtype == dtype else den.double(), None,
                                                None, sig, 0.5 * sig, tau, 0.5 * tau, 0.2, 4,
                                                0.15, 4, 1e-3, True, 9),
    }
    for name, call in calls.items():
        oracle = call(K.TWINS, x.double())
        err_kernel = (call(OPS, x).double() - oracle).abs().max()
        err_twin = (call(K.TWINS, x).double() - oracle).abs().max()
        assert err_kernel <= 2 * err_twin, (name, float(err_kernel), float(err_twin))


def test_bad_input_device_mix():
    xc, xg = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8, device="cuda")
    sig_g = torch.ones(1, dtype=torch.float64, device="cuda")
    # public API: a clear ValueError naming the argument
    with pytest.raises(ValueError, match="denoised"):
        O.relay_step(xg, xc, 1.0, 0.5, 0.1, 0.1)
    with pytest.raises(ValueError, match="sigma"):
        O.relay_corrupt(xc, sig_g, 0.1)


# Direct op calls that the CUDA glue must reject, as (name, expected message, call). They run
# in a child process: one of them (patch_dct, H not a multiple of p) crashed the interpreter
# with SIGSEGV on an H100 once (bench/results/h100_2026-11-26.md), and a crash must fail this
# test with a diagnosis instead of killing the whole run.
_DIRECT_BAD_CALLS = r"""
import sys, torch
import relaydiff.ops
OPS = torch.ops.relaydiff
xc, xg = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8, device="cuda")
sig_c = torch.ones(1, dtype=torch.float64)
sig_g = torch.ones(1, dtype=torch.float64, device="cuda")
odd = torch.randn(1, 1, 6, 8, device="cuda")
one = torch.ones(1, dtype=torch.float64, device="cuda")
CALLS = {
    "corrupt_sigma_cpu": ("sigma is on cpu",
        lambda: OPS.relay_corrupt(xg, sig_c, sig_g, 4, 0.15, 4, 1e-3, True, 1)),
    "blur_x_cpu": ("x is on cpu", lambda: OPS.patch_blur(xc, sig_g, 4, 1e-3)),
    "step_denoised_cpu": ("denoised is on cpu",
        lambda: OPS.relay_step(xg, xc, None, None, sig_g, sig_g, sig_g, sig_g, 0.2, 4, 0.15, 4,
                               1e-3, True, 1)),
    "step_x_prop_cpu": ("x_prop",
        lambda: OPS.relay_step(xg, xg, xc, xg, sig_g, sig_g, sig_g, sig_g, 0.2, 4, 0.15, 4, 1e-3,
                               True, 1)),
    "dct_bad_patch": ("patch_size must be", lambda: OPS.patch_dct(xg, 3)),
    "dct_odd_shape": ("multiples of patch_size", lambda: OPS.patch_dct(odd, 4)),
    "idct_odd_shape": ("multiples of patch_size", lambda: OPS.patch_idct(odd, 4)),
    "blur_odd_shape": ("multiples of patch_size", lambda: OPS.patch_blur(odd, one, 4, 1e-3)),
    "corrupt_odd_shape": ("multiples of patch_size",
        lambda: OPS.relay_corrupt(odd, one, one, 4, 0.15, 4, 1e-3, True, 1)),
    "noise_big_block": ("block_size", lambda: OPS.mixed_noise(odd, 0.1, 17, True, 1)),
}
for name in (sys.argv[1:] or CALLS):
    want, call = CALLS[name]
    print("start", name, flush=True)
    try:
        call()
        print("no-error", name, flush=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        print("ok" if want in str(e) else "wrong-message", name, "|", first, flush=True)
torch.cuda.synchronize()
print("done", flush=True)
"""


def _run_direct_calls(*names, gdb=False):
    import shutil
    import subprocess
    import sys
    cmd = [sys.executable, "-X", "faulthandler", "-c", _DIRECT_BAD_CALLS, *names]
    debugger = shutil.which("gdb") or shutil.which("cuda-gdb")   # the GPU machines have cuda-gdb
    if gdb and debugger:
        cmd = [debugger, "-batch", "-ex", "run", "-ex", "bt 40", "--args"] + cmd
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_bad_input_direct_op_calls():
    """Each direct call raises a RuntimeError naming the problem, and nothing crashes."""
    r = _run_direct_calls()
    lines = r.stdout.splitlines()
    if r.returncode != 0 or "done" not in lines:
        started = [ln.split()[1] for ln in lines if ln.startswith("start ")]
        culprit = started[-1] if started else None
        report = [f"child exited with {r.returncode} during {culprit}", r.stdout[-2000:],
                  r.stderr[-3000:]]
        if culprit is not None:     # alone, and under gdb when there is one, for a backtrace
            alone = _run_direct_calls(culprit)
            report.append(f"{culprit} alone: exit {alone.returncode}: {alone.stdout[-500:]}")
            if alone.returncode != 0:
                g = _run_direct_calls(culprit, gdb=True)
                report.append("gdb:\n" + "\n".join(g.stdout.splitlines()[-60:]))
        pytest.fail("\n".join(report))
    bad = [ln for ln in lines if ln.startswith(("no-error", "wrong-message"))]
    assert not bad, bad
    assert sum(ln.startswith("ok ") for ln in lines) == 10, lines


def test_large_shape():
    """[32, 3, 1024, 1024]: the whole tensor against the CPU kernels."""
    x = K.image((32, 3, 1024, 1024), torch.float32, "cpu", 3)
    sigma = torch.linspace(0.1, 2.0, 32, dtype=torch.float64)
    tau = torch.linspace(0.0, 3.0, 32, dtype=torch.float64)
    cpu = K.cpu_backend()
    args = (sigma, tau, 4, 0.15, 4, 1e-3, True, 11)
    got = OPS.relay_corrupt(x.cuda(), *[a.cuda() if torch.is_tensor(a) else a for a in args])
    K.assert_match(got, cpu.relay_corrupt(x, *args), torch.float32, "relay_corrupt")
    u = OPS.patch_dct(x.cuda(), 8)
    K.assert_match(u, cpu.patch_dct(x, 8), torch.float32, "patch_dct")
    torch.testing.assert_close(OPS.patch_idct(u, 8).cpu(), x, atol=1e-5, rtol=1e-5)


def test_64bit_offsets():
    """More than 2^31 elements (4.3 GB in float16): the last rows against the CPU / generator."""
    h, w = 65536, 32832                      # 2.15e9 elements
    if torch.cuda.mem_get_info()[0] < 2 * h * w * 2 + (1 << 30):
        pytest.skip("needs ~10 GB of free GPU memory")
    tail = K.image((1, 1, 32, w), torch.float16, "cpu", 4)
    x = torch.zeros(1, 1, h, w, dtype=torch.float16, device="cuda")
    x[..., -32:, :] = tail.cuda()
    tau = torch.tensor([1.0], dtype=torch.float64)
    blurred = OPS.patch_blur(x, tau.cuda(), 4, 1e-3)[..., -32:, :].cpu()
    del x
    K.assert_match(blurred, K.cpu_backend().patch_blur(tail, tau, 4, 1e-3), torch.float16,
                   "blur of the last rows")
    like = torch.empty(1, 1, 1, 1, dtype=torch.float16, device="cuda").expand(1, 1, h, w)
    last_row = OPS.mixed_noise(like, 0.0, 1, True, 5)[0, 0, -1].cpu()
    want = philox_normal(w, 5, STREAM_WHITE, start=(h - 1) * w).to(torch.float16)
    K.assert_match(last_row, want, torch.float16, "white noise of the last row")
